"""Heat maps are resampled to the source image only when the result objects need them (after
the priority is committed), and then equal the maps resampled at once: real demo models (the
pneumothorax CNN with its CAM, the TB ensemble averaging its members' maps). Absent findings'
maps are never resampled: nothing localises them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicomnode.models.registry import discover_cards
from dicomnode.pipeline.analyse import StageTimes
from dicomnode.pipeline.outputs import result_objects
from dicomnode.pipeline.runtime import Runtime
from dicomnode.pipeline.tasks import run_model
from dicomnode.synth.cxr import make_cxr

MODELS = Path(__file__).resolve().parent.parent / "models"


@pytest.mark.parametrize(
    ("name", "phantom"),
    [
        ("cxr-pneumothorax-demo", {"pneumothorax": True}),
        ("cxr-tb-ensemble-demo", {"findings": ("tuberculosis",)}),
    ],
)
def test_heat_maps_wait_for_the_result_objects(name: str, phantom: dict) -> None:
    cards = {card.model.name: card for card in discover_cards([MODELS])}
    card = cards[name]
    ds, _ = make_cxr(21, size=384, columns=320, **phantom)
    runtime = Runtime(["CPUExecutionProvider"])

    eager = run_model(card, [ds], runtime, StageTimes(), cards)
    deferred = run_model(card, [ds], runtime, StageTimes(), cards, defer_heatmaps=True)

    now, later = eager.images[0].findings[0], deferred.images[0].findings[0]
    assert now.present
    assert now.heatmap is not None and now.heatmap.shape == (ds.Rows, ds.Columns)
    assert later.probability == now.probability
    assert (later.heatmap, later.peak) == (None, None)
    assert later.deferred_heatmap is not None

    kinds = {kind for kind, _ in result_objects(deferred, card)}

    assert "sr" in kinds and "overlay" in kinds
    assert later.deferred_heatmap is None
    np.testing.assert_array_equal(later.heatmap, now.heatmap)
    assert later.peak == now.peak


def test_an_absent_findings_heat_map_is_never_resampled() -> None:
    cards = {card.model.name: card for card in discover_cards([MODELS])}
    card = cards["cxr-pneumothorax-demo"]
    ds, _ = make_cxr(22, pneumothorax=False, size=384, columns=320)
    run = run_model(
        card, [ds], Runtime(["CPUExecutionProvider"]), StageTimes(), cards, defer_heatmaps=True
    )
    finding = run.images[0].findings[0]
    assert not finding.present and finding.deferred_heatmap is not None

    kinds = [kind for kind, _ in result_objects(run, card)]

    assert kinds == ["sr", "overlay"]
    assert (finding.heatmap, finding.peak) == (None, None)
