"""The whole model zoo through a real node: studies sent by storescu come back at a dcmtk PACS
as the result objects each model card asks for, and nowhere else.

A frontal chest X-ray gets every frontal model's objects (SR, overlay, SEG, derived image,
GSPS where something was found); a lateral radiograph without View Position is routed by the
view classifier and gets none of the frontal models' objects; a CT series gets the CT models'
objects (a multi-frame SEG over all its slices). Expected series are computed from the cards
(result series UIDs are deterministic), so a model added to ``models/`` is covered too. Every
object the PACS receives passes dciodvfy.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from conftest import (
    REPO,
    RunningNode,
    StoreSCP,
    start_node,
    stop_node,
    wait_for,
    write_config,
)
from dciodvfy import dciodvfy_errors

from dicomnode.models.registry import ModelCard, discover_cards
from dicomnode.pipeline.select import image_facts, rules_match, with_view
from dicomnode.results.uids import result_series_uid
from dicomnode.synth.ct import make_ct_series
from dicomnode.synth.cxr import make_cxr

# Card result kinds -> the kind names of the result UIDs.
UID_KIND = {"sr": "sr", "overlay": "sc", "seg": "seg", "gsps": "gsps", "derived": "derived"}


@pytest.fixture
def zoo_node(tmp_path: Path, pacs: StoreSCP) -> Iterator[tuple[RunningNode, StoreSCP]]:
    """A node on SQLite with the repository's models, exporting to a dcmtk storescp."""
    config, port, web_port = write_config(
        tmp_path, f"sqlite:///{tmp_path / 'dicomnode.db'}", destinations=[pacs]
    )
    node = start_node(tmp_path, config, port, web_port)
    yield node, pacs
    stop_node(node)


def _standalone(cards: list[ModelCard]) -> list[ModelCard]:
    return [c for c in cards if c.model.standalone]


def _applies(card: ModelCard, ds: pydicom.Dataset, view: str | None = None) -> bool:
    facts = image_facts(ds)
    return rules_match(card.select, with_view(facts, view) if view else facts)


def _always(card: ModelCard) -> set[str]:
    """Kinds a model writes whatever it finds (KOS, GSPS and detection overlays depend on
    what is found and are not expected here)."""
    produces = set(card.produces)
    task = card.model.task
    if task in ("detection", "landmark"):
        return produces & {"sr"}
    if task == "segmentation":
        return produces & {"seg"}
    if task == "image-to-image":
        return produces & {"derived"}
    return produces & {"sr", "overlay"}


def test_zoo_results_reach_the_pacs_for_the_right_images(zoo_node, tmp_path: Path) -> None:
    node, pacs = zoo_node
    cards = _standalone(discover_cards([REPO / "models"]))
    frontal, _ = make_cxr(940_001, findings=["nodule", "effusion", "tube"], size=1024)
    lateral, _ = make_cxr(940_002, view="LATERAL", size=1024)
    del lateral.ViewPosition  # the view classifier must find it
    series = make_ct_series(940_003, rows=192, slices=20)
    ct = list(series[0] if isinstance(series, tuple) else series)
    folders = {"frontal": [frontal], "lateral": [lateral], "ct": ct}
    for name, images in folders.items():
        folder = tmp_path / name
        folder.mkdir()
        paths = []
        for index, ds in enumerate(images):
            paths.append(folder / f"{index:03d}.dcm")
            ds.save_as(paths[-1], enforce_file_format=True)
        sent = node.storescu(*paths)
        assert sent.returncode == 0, sent.stderr

    expected: set[str] = set()
    forbidden: set[str] = set()
    studies = {name: str(images[0].StudyInstanceUID) for name, images in folders.items()}
    for card in cards:
        for name, images in folders.items():
            routed = "LATERAL" if name == "lateral" else None
            uids = {
                result_series_uid(studies[name], card.algorithm, UID_KIND[kind])
                for kind in UID_KIND
            }
            if card.model.sets == "view" and name != "ct":
                expected.add(result_series_uid(studies[name], card.algorithm, "sr"))
            elif _applies(card, images[0], routed):
                expected |= {
                    result_series_uid(studies[name], card.algorithm, UID_KIND[kind])
                    for kind in _always(card)
                }
            elif not card.model.sets:
                forbidden |= uids
    assert any(c.model.sets == "view" for c in cards), "the zoo has a view router"
    assert {"segmentation", "image-to-image", "classification"} <= {c.model.task for c in cards}

    def whole_ct_seg(ds: pydicom.Dataset) -> bool:
        # The quiet period may end while a slow sender is still sending; the late slices re-run
        # the analysis, and the final SEG covers every slice.
        return (
            ds.SOPClassUID.name == "Segmentation Storage"
            and str(ds.StudyInstanceUID) == studies["ct"]
            and int(ds.NumberOfFrames) >= len(ct)
            and int(ds.NumberOfFrames) % len(ct) == 0
        )

    def arrived() -> list[pydicom.Dataset] | None:
        try:
            objects = [pydicom.dcmread(p) for p in pacs.received()]
        except (pydicom.errors.InvalidDicomError, EOFError, OSError):
            return None  # storescp is still writing one: look again
        done = expected <= {str(ds.SeriesInstanceUID) for ds in objects} and any(
            whole_ct_seg(ds) for ds in objects
        )
        return objects if done else None

    try:
        objects = wait_for(arrived, timeout=240, interval=1.0, what="every model's results")
    except AssertionError:
        got = {str(ds.SeriesInstanceUID) for ds in (pydicom.dcmread(p) for p in pacs.received())}
        raise AssertionError(
            f"missing {len(expected - got)} of {len(expected)} result series (or the whole-series "
            "CT SEG); node log:\n" + node.log.read_text()[-3000:]
        ) from None
    received = {str(ds.SeriesInstanceUID) for ds in objects}
    assert not received & forbidden, "a model wrote results for an image its rules exclude"
    for ds in objects:
        assert str(ds.StudyInstanceUID) in studies.values()
        assert dciodvfy_errors(ds) == [], (ds.SOPClassUID.name, ds.SeriesDescription)
    rows = {row["study_instance_uid"]: row for row in node.worklist()}
    assert all(rows[uid]["analysis_status"] == "analysed" for uid in studies.values())
