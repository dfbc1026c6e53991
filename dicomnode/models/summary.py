"""One-line summaries of model cards: what ``dicomnode models list`` prints (plain or as the
Markdown table of the README)."""

from __future__ import annotations

from dicomnode.models.registry import ModelCard

# Headline held-out metrics, first match wins: (card metric key, how it is named).
_SINGLE = (
    ("heldout_auc", "AUC"),
    ("auc", "AUC"),
    ("heldout_macro_auc", "mean AUC"),
    ("heldout_mean_auc", "mean AUC"),
    ("macro_auc", "mean AUC"),
    ("heldout_accuracy", "accuracy"),
    ("accuracy", "accuracy"),
    ("heldout_dice", "Dice"),
    ("heldout_dice_mean", "Dice"),
    ("heldout_psnr_output", "PSNR dB"),
)
_SEVERAL = (
    ("cpm", "CPM"),
    ("froc_sensitivity_at_1_fp", "sens@1FP/image"),
    ("froc_sensitivity_at_4_fp", "sens@4FP/image"),
    ("heldout_cpm", "CPM"),
    ("heldout_sensitivity_at_1_fp_per_scan", "sens@1FP/scan"),
    ("heldout_sensitivity_at_4_fp_per_scan", "sens@4FP/scan"),
    ("presence_auc", "presence AUC"),
    ("tip_distance_median_mm", "median tip error mm"),
    ("tip_within_10_mm", "tip within 10 mm"),
)


def _value(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _interval(card: ModelCard, key: str) -> str:
    base = key.removesuffix("_mean")
    low = card.metrics.get(f"{key}_ci_low", card.metrics.get(f"{base}_ci_low"))
    high = card.metrics.get(f"{key}_ci_high", card.metrics.get(f"{base}_ci_high"))
    if low is None or high is None:
        return ""
    return f" (95% CI {_value(low)}-{_value(high)})"


def headline_metrics(card: ModelCard) -> str:
    """The card's main held-out metric(s) in words, e.g. "AUC 0.923 (95% CI 0.897-0.950)"."""
    metrics = card.metrics
    for key, name in _SINGLE:
        if key in metrics:
            text = f"{name} {_value(metrics[key])}{_interval(card, key)}"
            if key == "heldout_psnr_output" and "heldout_psnr_input" in metrics:
                text += f" (input {_value(metrics['heldout_psnr_input'])})"
            return text
    found = [f"{name} {_value(metrics[key])}" for key, name in _SEVERAL if key in metrics]
    return ", ".join(found) or "no held-out metrics on the card"


def input_summary(card: ModelCard) -> str:
    spec = card.input
    text = "x".join(str(side) for side in spec.shape[1:])
    if spec.slices > 1:
        text += f", {spec.slices} adjacent slices"
    if spec.window:
        text += f", window {spec.window[0]:g}/{spec.window[1]:g}"
    where = "/".join(card.select.modalities) or "any modality"
    if card.select.views:
        where += " " + "/".join(card.select.views)
    if card.select.orientations:
        where += " " + "/".join(plane.lower() for plane in card.select.orientations)
    return f"{where}, {text}"


def task_summary(card: ModelCard) -> str:
    text = card.model.task
    if card.model.sets == "view":
        text += " (view router)"
    if not card.model.standalone:
        text += " (ensemble member)"
    if card.ensemble is not None:
        text += ": mean of " + " + ".join(f"`{name}`" for name in card.ensemble.members)
    return text


def findings_summary(card: ModelCard) -> str:
    labels = [
        label.code_meaning + (" (critical)" if label.critical else "") for label in card.labels
    ]
    return ", ".join(labels) or card.model.description.split(".")[0]


def list_line(card: ModelCard) -> str:
    """One line of ``dicomnode models list``."""
    notice = " (research demo, not for clinical use)" if card.model.research_demo else ""
    onnx = card.onnx_path.name if card.model.onnx else "no ONNX of its own"
    return (
        f"{card.model.name} {card.model.version} [{task_summary(card)}] {onnx}; "
        f"{input_summary(card)}; {findings_summary(card)}; held-out: "
        f"{headline_metrics(card)}{notice}"
    )


def markdown_table(cards: list[ModelCard]) -> str:
    """The cards as the Markdown table of the README."""
    rows = [
        "| model | task | input | finds / makes | held-out (phantoms) |",
        "|---|---|---|---|---|",
    ]
    for card in sorted(cards, key=lambda c: c.model.name):
        rows.append(
            f"| `{card.model.name}` | {task_summary(card)} | {input_summary(card)} | "
            f"{findings_summary(card)} | {headline_metrics(card)} |"
        )
    return "\n".join(rows)
