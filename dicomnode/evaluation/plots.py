"""PNG plots of an evaluation result (matplotlib, Agg backend): ROC, FROC, confusion matrix,
Dice per case and landmark distance errors."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

DEMO = "Research demo, not for clinical use"


def _title(result: dict, what: str) -> str:
    return f"{result['model']} {result['version']}: {what}\n{DEMO}"


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def roc_plot(result: dict, path: Path) -> Path | None:
    """ROC curves of every label with an AUC."""
    curves = {n: v for n, v in result.get("labels", {}).items() if v.get("roc")}
    if not curves:
        return None
    figure, axes = plt.subplots(figsize=(5.5, 5.5))
    for name, item in curves.items():
        # Landmarks name theirs presence_auc.
        prefix = "auc" if "auc" in item else "presence_auc"
        axes.step(
            item["roc"]["fpr"],
            item["roc"]["tpr"],
            where="post",
            label=f"{name} AUC {item[prefix]:.3f} "
            f"[{item[prefix + '_ci_low']:.3f}, {item[prefix + '_ci_high']:.3f}]",
        )
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axes.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01))
    axes.set_title(_title(result, "ROC"), fontsize=9)
    axes.legend(fontsize=7, loc="lower right")
    return _save(figure, path)


def froc_plot(result: dict, path: Path) -> Path | None:
    """FROC curves (sensitivity against false positives per case, log scale)."""
    curves = {n: v for n, v in result.get("labels", {}).items() if v.get("curve")}
    if not curves:
        return None
    figure, axes = plt.subplots(figsize=(6, 4.5))
    for name, item in curves.items():
        fp = [max(v, 1e-3) for v in item["curve"]["fp_per_case"]]
        axes.step(
            fp, item["curve"]["sensitivity"], where="post", label=f"{name} CPM {item['cpm']:.3f}"
        )
        axes.plot(item["fp_rates"], item["sensitivities"], "o", markersize=4)
    axes.set_xscale("log")
    unit = next(iter(curves.values()))["case_unit"]
    axes.set(
        xlabel=f"false positives per {unit}", ylabel="sensitivity", xlim=(0.1, 10), ylim=(0, 1.01)
    )
    axes.set_title(_title(result, "FROC"), fontsize=9)
    axes.legend(fontsize=7, loc="lower right")
    axes.grid(True, which="both", alpha=0.3)
    return _save(figure, path)


def confusion_plot(result: dict, path: Path) -> Path | None:
    """The router's confusion matrix (rows = truth)."""
    if "confusion" not in result:
        return None
    classes, matrix = result["classes"], result["confusion"]
    figure, axes = plt.subplots(figsize=(4.5, 4.5))
    axes.imshow(matrix, cmap="Blues")
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            axes.text(j, i, str(value), ha="center", va="center", fontsize=9)
    axes.set_xticks(range(len(classes)), classes)
    axes.set_yticks(range(len(classes)), classes)
    axes.set(xlabel="predicted", ylabel="truth")
    axes.set_title(_title(result, f"accuracy {result['accuracy']:.3f}"), fontsize=9)
    return _save(figure, path)


def dice_plot(result: dict, path: Path) -> Path | None:
    """Dice per case and label (box plot)."""
    items = {n: v["per_case"] for n, v in result.get("labels", {}).items() if v.get("per_case")}
    if not items:
        return None
    figure, axes = plt.subplots(figsize=(5, 4))
    axes.boxplot(list(items.values()), tick_labels=list(items))
    axes.set(ylabel="Dice", ylim=(0, 1.01))
    axes.set_title(_title(result, "Dice per case"), fontsize=9)
    return _save(figure, path)


def distance_plot(result: dict, path: Path) -> Path | None:
    """Cumulative distribution of landmark distance errors (mm)."""
    items = {
        n: v["distances_mm"] for n, v in result.get("labels", {}).items() if v.get("distances_mm")
    }
    if not items:
        return None
    figure, axes = plt.subplots(figsize=(5.5, 4))
    for name, values in items.items():
        values = sorted(values)
        axes.step(
            values, [(i + 1) / len(values) for i in range(len(values))], where="post", label=name
        )
    axes.axvline(10, color="grey", linestyle=":")
    axes.set(xlabel="distance error (mm)", ylabel="fraction of images", ylim=(0, 1.01))
    axes.set_title(_title(result, "landmark distance"), fontsize=9)
    axes.legend(fontsize=7)
    return _save(figure, path)


PLOTS = {
    "roc.png": roc_plot,
    "froc.png": froc_plot,
    "confusion.png": confusion_plot,
    "dice.png": dice_plot,
    "landmark_distance.png": distance_plot,
}


def write_plots(result: dict, out: Path) -> list[Path]:
    """Every plot that fits the result, as PNG files in ``out``."""
    written = []
    for name, plot in PLOTS.items():
        path = plot(result, out / name)
        if path is not None:
            written.append(path)
    return written
