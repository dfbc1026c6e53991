"""analyse_study and its results job on a real database: which result objects a study gets,
where they go, and that they are written after the priority is committed, the same whether the
analysis is handed over in memory or recomputed from the stored images.

What is produced follows the model card's [results] produce; where each object is sent follows
each destination's ``outputs`` (a PACS that wants only SR gets only SR).
"""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from conftest import referenced_uids, spool_and_index, spool_late_instance
from sqlalchemy import func, select

from dicomnode.config import Destination, Settings
from dicomnode.db.models import FindingRow, Instance, Job, ResultObject, Study
from dicomnode.jobs.queue import Postponed
from dicomnode.models.registry import ModelCard, ResultsSpec, load_card
from dicomnode.pipeline.analyse import StageTimes, analyse_study, mark_failed
from dicomnode.pipeline.handover import Handover
from dicomnode.pipeline.runtime import Runtime
from dicomnode.results.job import write_results
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


def _results_job(session, study_id: int) -> Job:
    """The study's newest results job."""
    return session.scalars(
        select(Job).where(Job.study_id == study_id, Job.kind == "results").order_by(Job.id.desc())
    ).first()


def _write(
    session, settings: Settings, cards, runtime, study_id: int, handover: Handover | None = None
) -> StageTimes:
    """Run the study's queued results job as the worker does (taking what was handed over)."""
    job = _results_job(session, study_id)
    assert job is not None and job.state == "queued"
    triaged = handover.take(job.id) if handover is not None else None
    times = write_results(
        session,
        settings,
        cards,
        runtime,
        study_id,
        job.id,
        triaged,
        job.payload["instances_up_to"],
    )
    job.state = "done"
    session.commit()
    return times


def _analyse(
    session, settings: Settings, cards, runtime, study_id: int, handover: Handover | None = None
) -> tuple[StageTimes, StageTimes]:
    """The analyse job, then its results job."""
    triaged = analyse_study(session, settings, cards, runtime, study_id, handover)
    return triaged, _write(session, settings, cards, runtime, study_id, handover)


def _exports(session, study_id: int, after: int = 0) -> dict[str, list[str]]:
    """Destination name -> result kinds queued for it (by export jobs after job id ``after``)."""
    kinds = {r.id: r.kind for r in session.scalars(select(ResultObject))}
    sent: dict[str, list[str]] = {}
    exports = select(Job).where(Job.kind == "export", Job.study_id == study_id, Job.id > after)
    for job in session.scalars(exports):
        sent.setdefault(job.payload["destination"], []).append(kinds[job.payload["result_id"]])
    return {name: sorted(values) for name, values in sent.items()}


def test_each_destination_gets_the_kinds_it_asks_for(sessions, tmp_path: Path, runtime) -> None:
    settings = _settings(tmp_path)
    card = load_card(PNEUMOTHORAX)
    with sessions() as session:
        study_id = _ingest(session, settings, 930_001, pneumothorax=True)
        times, written = _analyse(session, settings, [card], runtime, study_id)
        # The priority is committed (seconds from the start) before the results are written.
        assert times.seconds["triaged"] > 0 and written.seconds["results"] > 0
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
            _analyse(session, settings, [only_sr], runtime, study_id)
        assert _exports(session, critical) == {"pacs": ["sr"], "sr-only": ["sr"]}
        assert _exports(session, normal) == {"pacs": ["sr"], "sr-only": ["sr"]}
        # A normal study has no critical image: the default produce would give it no KOS either.
        _analyse(session, settings, [card], runtime, normal)
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
        _analyse(session, settings, [card], runtime, study_id)
        study = session.get(Study, study_id)
        assert study.analysis_status == "analysed" and study.tier == "critical"
        assert "cannot decode" in study.analysis_error
        assert "1.2.840.10008.1.2.4.50" in study.analysis_error or "JPEG" in study.analysis_error

        # A study with nothing decodable fails at once (no retries: the file will not change).
        only_bad = _undecodable(session, settings, 930_007)
        analyse_study(session, settings, [card], runtime, only_bad)
        study = session.get(Study, only_bad)
        assert study.analysis_status == "failed" and "cannot decode" in study.analysis_error
        assert _results_job(session, only_bad) is None


def test_priority_is_committed_with_a_queued_results_job_and_no_result_yet(
    sessions, tmp_path: Path, runtime
) -> None:
    settings = _settings(tmp_path)
    card = load_card(PNEUMOTHORAX)
    handover = Handover(256 * 1024 * 1024)
    with sessions() as session:
        study_id = _ingest(session, settings, 930_011, pneumothorax=True)
        analyse_study(session, settings, [card], runtime, study_id, handover)
    # What another connection sees: the analysis job's one commit.
    with sessions() as session:
        study = session.get(Study, study_id)
        assert (study.analysis_status, study.tier) == ("analysed", "critical")
        job = _results_job(session, study_id)
        (instance,) = session.scalars(select(Instance.id))
        # What a recomputation reads: the instances this analysis read.
        assert job.state == "queued" and job.payload == {"instances_up_to": instance}
        assert session.scalars(select(ResultObject)).all() == []
        assert session.scalars(select(Job).where(Job.kind == "export")).all() == []
    assert not (settings.storage_path / "results").exists()
    # The decoded 512 px image (and its presentation, model outputs) is kept for that job.
    assert len(handover) == 1 and 512 * 512 * 2 < handover.nbytes < 32 * 1024 * 1024
    with sessions() as session:
        written = _write(session, settings, [card], runtime, study_id, handover)
        assert "recompute" not in written.seconds
        assert len(handover) == 0 and handover.nbytes == 0
        assert _exports(session, study_id) == {"pacs": ["kos", "overlay", "sr"], "sr-only": ["sr"]}


# Written by the result builders from the clock or at random on every write (a re-run of the
# same model on the same image differs only in these).
VOLATILE = {
    "InstanceCreationDate",
    "InstanceCreationTime",
    "ContentDate",
    "ContentTime",
    "DateOfSecondaryCapture",
    "TimeOfSecondaryCapture",
    "ContributionDateTime",
    "DimensionOrganizationUID",
}


def _content(path: Path) -> bytes:
    """A result file without the elements that change on every write."""
    ds = pydicom.dcmread(path)

    def drop(dataset, element) -> None:
        if element.keyword in VOLATILE:
            del dataset[element.tag]

    ds.walk(drop)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _written(session, study_id: int, after: int) -> dict:
    """Everything the results job left: rows, files by SOP Instance UID (bytes but for the
    creation times), exports (queued after job id ``after``)."""
    rows = session.scalars(
        select(ResultObject).where(ResultObject.study_id == study_id).order_by(ResultObject.id)
    ).all()
    return {
        "rows": [
            (
                r.sop_instance_uid,
                r.kind,
                r.model_name,
                r.sop_class_uid,
                r.series_instance_uid,
                r.path,
            )
            for r in rows
        ],
        "files": {r.sop_instance_uid: _content(Path(r.path)) for r in rows},
        "exports": _exports(session, study_id, after),
    }


def test_results_are_identical_handed_over_or_recomputed(sessions, tmp_path: Path, runtime) -> None:
    # Every CXR demo model: view router, classifiers with heat maps, the TB ensemble (a mean
    # of deferred maps), detection, and the models left to the results job (segmentation,
    # image-to-image, landmark).
    cards = [load_card(path) for path in sorted((REPO / "models").glob("cxr_*.toml"))]
    settings = _settings(tmp_path)
    handover = Handover(256 * 1024 * 1024)
    with sessions() as session:
        ds, _ = make_cxr(930_021, findings=("pneumothorax", "effusion"), view="PA")
        study_id = spool_and_index(session, settings.storage_path, ds)[0]
        _, handed_over = _analyse(session, settings, cards, runtime, study_id, handover)
        first = _written(session, study_id, after=0)
        kinds = {row[1] for row in first["rows"]}
        assert {"sr", "overlay", "seg", "derived", "kos"} <= kinds, kinds
        assert "recompute" not in handed_over.seconds

        # The same results job again without the analysis in memory (another worker, a
        # restart, a retry): it loads the image and runs the triage models again.
        job = _results_job(session, study_id)
        job.state = "queued"
        session.commit()
        last = session.scalar(select(func.max(Job.id)))
        recomputed = _write(session, settings, cards, runtime, study_id, handover=None)
        assert recomputed.seconds["recompute"] > 0
        second = _written(session, study_id, after=last)
    assert second["rows"] == first["rows"]
    # The same objects: none is exported again (the first job's exports are queued).
    assert first["exports"] and second["exports"] == {}
    for uid, data in first["files"].items():
        assert second["files"][uid] == data, f"result {uid} differs when recomputed"


def test_a_newer_analysis_supersedes_a_waiting_results_job(sessions, tmp_path: Path, runtime):
    settings = _settings(tmp_path)
    card = load_card(PNEUMOTHORAX)
    with sessions() as session:
        study_id = _ingest(session, settings, 930_031, pneumothorax=True)
        analyse_study(session, settings, [card], runtime, study_id)
        older = _results_job(session, study_id)
        # A late instance: until its analysis has run (or failed), the results job waits.
        late = spool_late_instance(session, settings.storage_path, study_id, 930_032)
        with pytest.raises(Postponed, match="pending"):
            _write(session, settings, [card], runtime, study_id)
        assert session.scalars(select(ResultObject)).all() == []

        # The newer analysis queues its own results job: the older one writes nothing.
        analyse_study(session, settings, [card], runtime, study_id)
        newer = _results_job(session, study_id)
        assert newer.id > older.id
        times = write_results(session, settings, [card], runtime, study_id, older.id)
        assert f"superseded by results job {newer.id}" in str(times)
        assert session.scalars(select(ResultObject)).all() == []
        _write(session, settings, [card], runtime, study_id)
        assert late in referenced_uids(session, study_id)


def test_a_failed_newer_analysis_leaves_the_results_of_the_findings_shown(
    sessions, tmp_path: Path, runtime
):
    # The study keeps the findings and priority of its last analysis when a newer one fails:
    # the result objects of that analysis are written, from the images it read.
    settings = _settings(tmp_path)
    card = load_card(PNEUMOTHORAX)
    with sessions() as session:
        study_id = _ingest(session, settings, 930_041, pneumothorax=True)
        analyse_study(session, settings, [card], runtime, study_id)
        (first,) = session.scalars(select(Instance.sop_instance_uid))
        late = spool_late_instance(session, settings.storage_path, study_id, 930_042)
        study = session.get(Study, study_id)
        study.analysis_status = "queued"
        session.commit()
        with pytest.raises(Postponed):
            _write(session, settings, [card], runtime, study_id)
        mark_failed(session, study_id, "RuntimeError: out of memory")
        # Nothing was handed over: the triage models run again, on the first image only.
        times = _write(session, settings, [card], runtime, study_id)
        assert times.seconds["recompute"] > 0
        kinds = session.scalars(select(ResultObject.kind).where(ResultObject.study_id == study_id))
        assert sorted(kinds) == ["kos", "overlay", "sr"]
        assert first in referenced_uids(session, study_id)
        assert late not in referenced_uids(session, study_id)
        study = session.get(Study, study_id)
        assert (study.analysis_status, study.tier) == ("failed", "critical")
