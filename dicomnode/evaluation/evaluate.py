"""``dicomnode models eval``: run a model card on a synthetic data set exactly as the node runs
it and measure it against the ground truth.

Images are read from disk, filtered by the card's selection rules (the header's modality, body
part and view), grouped as the node groups them (a CXR image per study, a CT series with its
slices) and passed to :func:`dicomnode.pipeline.tasks.run_model`. The result is a plain dict
(``metrics.json``); :mod:`dicomnode.evaluation.plots` draws its curves.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from dicomnode.evaluation import collect, dataset, plots, summary
from dicomnode.models.registry import ModelCard
from dicomnode.pipeline.analyse import StageTimes
from dicomnode.pipeline.runtime import Runtime
from dicomnode.pipeline.select import image_facts, rules_match
from dicomnode.pipeline.tasks import run_model

# CXR images handed to run_model at once (the node runs one study at a time; batching more
# images changes no output, only the speed).
BATCH = 16

CASE_UNIT = {"cxr": "image", "ct": "series"}


def evaluate(
    card: ModelCard,
    data: dataset.EvalData,
    runtime: Runtime | None = None,
    members: dict[str, ModelCard] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Evaluate ``card`` on ``data``; ``members`` are the cards by name (for ensembles)."""
    runtime = runtime or Runtime(["CPUExecutionProvider"])
    collector = collect.collector_for(card)
    times = StageTimes()
    started = time.perf_counter()
    n_cases = n_images = skipped = done = 0
    for group in dataset.batches(data.cases, BATCH):
        frames: collect.Frames = {}
        images = []
        for case in group:
            datasets = dataset.read_images(case)
            selected = [ds for ds in datasets if rules_match(card.select, image_facts(ds))]
            skipped += len(datasets) - len(selected)
            if not selected:
                continue
            n_cases += 1
            for index, ds in enumerate(datasets):
                frames[str(ds.SOPInstanceUID)] = (case, index)
            images.extend(selected)
        if images:
            n_images += len(images)
            run = run_model(card, images, runtime, times, members or {})
            collector.add(run, frames)
        done += len(group)
        if progress is not None:
            progress(done, len(data.cases))
    if n_cases == 0:
        raise ValueError(
            f"{card.model.name}: its selection rules admit none of the {data.n_images} images "
            f"of {data.folder} (modalities {card.select.modalities or 'any'}, views "
            f"{card.select.views or 'any'})"
        )
    result: dict[str, object] = {
        "model": card.model.name,
        "version": card.model.version,
        "task": card.model.task,
        "evaluation": collect.evaluation_kind(card),
        "research_demo": card.model.disclaimer if card.model.research_demo else "",
        "data": str(data.folder),
        "data_kind": data.kind,
        "case_unit": CASE_UNIT[data.kind],
        "n_cases": n_cases,
        "n_images": n_images,
        "skipped_by_selection_rules": skipped,
        "seconds": round(time.perf_counter() - started, 2),
        "stage_seconds": {k: round(v, 3) for k, v in times.seconds.items()},
    }
    result.update(collector.result())
    return result


def write_outputs(result: dict, out: Path) -> list[Path]:
    """``metrics.json`` and the PNG plots of ``result`` in ``out``; returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "metrics.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return [path, *plots.write_plots(result, out)]


def table(result: dict) -> str:
    return "\n".join(summary.table_lines(result))
