"""analyse_study on a real database: which result objects a study gets and where they go.

What is produced follows the model card's [results] produce; where each object is sent follows
each destination's ``outputs`` (a PACS that wants only SR gets only SR).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import spool_and_index
from sqlalchemy import select

from dicomnode.config import Destination, Settings
from dicomnode.db.models import FindingRow, Job, ResultObject, Study
from dicomnode.models.registry import ModelCard, ResultsSpec, load_card
from dicomnode.pipeline.analyse import analyse_study
from dicomnode.pipeline.runtime import Runtime
from dicomnode.synth.cxr import make_cxr

REPO = Path(__file__).resolve().parent.parent
PNEUMOTHORAX = REPO / "models" / "cxr_pneumothorax_demo.toml"


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    return Runtime(["CPUExecutionProvider"])


def _settings(tmp_path: Path) -> Settings:
    return Settings(
        storage={"path": tmp_path / "storage"},
        destinations=[
            Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=104),
            Destination(name="sr-only", ae_title="RIS", host="127.0.0.1", port=105, outputs=["sr"]),
        ],
    )


def _ingest(session, settings: Settings, seed: int, pneumothorax: bool) -> int:
    ds, _ = make_cxr(seed, pneumothorax=pneumothorax)  # 512 px, as the model was trained
    return spool_and_index(session, settings.storage_path, ds)[0]


def _exports(session, study_id: int) -> dict[str, list[str]]:
    """Destination name -> result kinds queued for it."""
    kinds = {r.id: r.kind for r in session.scalars(select(ResultObject))}
    sent: dict[str, list[str]] = {}
    for job in session.scalars(select(Job).where(Job.kind == "export", Job.study_id == study_id)):
        sent.setdefault(job.payload["destination"], []).append(kinds[job.payload["result_id"]])
    return {name: sorted(values) for name, values in sent.items()}


def test_each_destination_gets_the_kinds_it_asks_for(sessions, tmp_path: Path, runtime) -> None:
    settings = _settings(tmp_path)
    card = load_card(PNEUMOTHORAX)
    with sessions() as session:
        study_id = _ingest(session, settings, 930_001, pneumothorax=True)
        times = analyse_study(session, settings, [card], runtime, study_id)
        # The priority is committed (seconds from the start) before the results are written.
        assert times.seconds["triaged"] > 0 and times.seconds["results"] > 0
        rows = session.scalars(select(ResultObject).where(ResultObject.study_id == study_id))
        assert sorted(r.kind for r in rows) == ["kos", "overlay", "sr"]
        assert _exports(session, study_id) == {
            "pacs": ["kos", "overlay", "sr"],
            "sr-only": ["sr"],
        }
        (finding,) = session.scalars(select(FindingRow).where(FindingRow.study_id == study_id))
        assert finding.critical and finding.probability >= finding.threshold
        assert session.get(Study, study_id).tier == "critical"


def test_card_results_produce_limits_what_is_written(sessions, tmp_path: Path, runtime) -> None:
    settings = _settings(tmp_path)
    card: ModelCard = load_card(PNEUMOTHORAX)
    only_sr = card.model_copy(update={"results": ResultsSpec(produce=["sr"])})
    only_sr.card_path = card.card_path
    with sessions() as session:
        critical = _ingest(session, settings, 930_003, pneumothorax=True)
        normal = _ingest(session, settings, 930_002, pneumothorax=False)
        for study_id in (critical, normal):
            analyse_study(session, settings, [only_sr], runtime, study_id)
        assert _exports(session, critical) == {"pacs": ["sr"], "sr-only": ["sr"]}
        assert _exports(session, normal) == {"pacs": ["sr"], "sr-only": ["sr"]}
        # A normal study has no critical image: the default produce would give it no KOS either.
        analyse_study(session, settings, [card], runtime, normal)
        rows = session.scalars(select(ResultObject).where(ResultObject.study_id == normal))
        assert sorted(r.kind for r in rows) == ["overlay", "sr"]


def _undecodable(session, settings: Settings, seed: int, study_uid: str | None = None) -> int:
    """Ingest a phantom whose JPEG Baseline pixel data is garbage."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    ds, _ = make_cxr(seed, bits=8, **({"study_instance_uid": study_uid} if study_uid else {}))
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xe0 not a JPEG stream at all"])
    ds["PixelData"].VR = "OB"
    ds.PhotometricInterpretation = "MONOCHROME2"
    return spool_and_index(session, settings.storage_path, ds)[0]


def test_an_undecodable_image_is_left_out_and_named(sessions, tmp_path: Path, runtime) -> None:
    settings = _settings(tmp_path)
    card = load_card(PNEUMOTHORAX)
    with sessions() as session:
        study_id = _ingest(session, settings, 930_005, pneumothorax=True)
        uid = session.get(Study, study_id).study_instance_uid
        assert _undecodable(session, settings, 930_006, study_uid=uid) == study_id
        analyse_study(session, settings, [card], runtime, study_id)
        study = session.get(Study, study_id)
        assert study.analysis_status == "analysed" and study.tier == "critical"
        assert "cannot decode" in study.analysis_error
        assert "1.2.840.10008.1.2.4.50" in study.analysis_error or "JPEG" in study.analysis_error

        # A study with nothing decodable fails at once (no retries: the file will not change).
        only_bad = _undecodable(session, settings, 930_007)
        analyse_study(session, settings, [card], runtime, only_bad)
        study = session.get(Study, only_bad)
        assert study.analysis_status == "failed" and "cannot decode" in study.analysis_error
