"""What went wrong in a results job, model by model and object by object: each failure
logged at ERROR without patient data, counted, and named on the job (``last_error`` and
``not_written`` in its payload), while the job ends done with the other objects. Errors that
mean the job cannot run now (:data:`JOB_ERRORS`) are raised again: the job is retried."""

from __future__ import annotations

import logging

from pydicom import Dataset
from pydicom.multival import MultiValue
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from dicomnode import metrics
from dicomnode.db.models import Job
from dicomnode.logs import patient_values, without_patient_data
from dicomnode.models.registry import ModelCard
from dicomnode.pipeline.sessions import ModelLoadError
from dicomnode.results.agreement import MAX_ANALYSES_AGAIN
from dicomnode.worklist.policy import NOT_RUN

# The pipeline's logger, as before the results job had its own module: its lines unchanged.
log = logging.getLogger("dicomnode.pipeline")

# Errors that mean the job cannot run now (database, disk or memory), not that one model or
# builder cannot handle the study: they fail the whole results job, which is retried. A
# model whose file cannot be loaded is the worker's to leave out of every study (it runs the
# job again at once without it, and names it on the job), not one study's failure.
JOB_ERRORS = (OSError, MemoryError, SQLAlchemyError, ModelLoadError)

_FAILED = {
    "run": "its run failed, none of its result objects is written",
    "all": "its result objects could not be prepared, none is written",
}


class ResultFailures:
    """The models and result objects of a results job that raised: each is logged at ERROR
    (no patient data), counted, and named on the job (``last_error``, and ``not_written`` in
    its payload) while the job ends done with the others' objects. Errors of
    :data:`JOB_ERRORS` are raised again."""

    def __init__(self, job_id: int, study_id: int):
        self.job_id = job_id
        self.study_id = study_id
        self.sources: list[Dataset] = []
        self.not_written: list[dict[str, str]] = []

    def add(self, card: ModelCard, kind: str, error: Exception) -> None:
        if isinstance(error, JOB_ERRORS):
            raise error
        reason = _without_patient_data(f"{type(error).__name__}: {error}", self.sources)
        metrics.RESULT_OBJECTS_FAILED.labels(card.model.name, kind).inc()
        log.error(
            "results job %d study_id=%d: model %s %s: %s; the study's other result objects are "
            "written: %s",
            self.job_id,
            self.study_id,
            card.model.name,
            card.model.version,
            _FAILED.get(kind, f"a {kind} result object could not be built and is not written"),
            reason,
        )
        # The traceback only when debugging (the error's own text may quote patient data).
        log.debug("results job %d: traceback of the error above", self.job_id, exc_info=error)
        self.not_written.append(
            {"model": card.model.name, "version": card.model.version, "kind": kind, "error": reason}
        )

    def left_out(self, card: ModelCard, reason: str) -> None:
        """Name a model the worker left out (its file cannot be loaded; one ERROR said so when
        it was left out) that would have run on the study: not run, none of its objects."""
        self.not_written.append(
            {
                "model": card.model.name,
                "version": card.model.version,
                "kind": "run",
                "error": f"{NOT_RUN}: the model cannot be loaded ({reason})"[:1000],
            }
        )

    def disagrees(self, card: ModelCard, how: str) -> None:
        """Name a triage model run again whose findings differ from the study's (``how``) after
        :data:`~dicomnode.results.agreement.MAX_ANALYSES_AGAIN` analyses in a row: none of its
        objects is written, as they would not say what the worklist says."""
        error = (
            f"its findings differ from the study's ({how}) after "
            f"{MAX_ANALYSES_AGAIN} analyses again; none of its objects is written: check that "
            "every worker runs the same model cards"
        )
        log.warning(
            "results job %d study_id=%d: model %s %s: %s",
            self.job_id,
            self.study_id,
            card.model.name,
            card.model.version,
            error,
        )
        self.not_written.append(
            {
                "model": card.model.name,
                "version": card.model.version,
                "kind": "all",
                "error": error[:1000],
            }
        )

    def summary(self) -> str:
        """'model kind, ...' of what was not written."""
        return ", ".join(f"{entry['model']} {entry['kind']}" for entry in self.not_written)

    def record(self, session: Session) -> None:
        """Name what was not written on the results job (in the caller's transaction)."""
        job = session.get(Job, self.job_id)
        if job is None:
            return
        payload = {k: v for k, v in (job.payload or {}).items() if k != "not_written"}
        if self.not_written:
            payload["not_written"] = self.not_written
            listed = "; ".join(
                f"{entry['model']} {entry['kind']}: {entry['error']}" for entry in self.not_written
            )
            job.last_error = f"not written: {listed}"[:2000]
        job.payload = payload


def _without_patient_data(text: str, sources: list[Dataset]) -> str:
    """``text`` without the patient's name, IDs, accession number and birth date as the
    study's images give them (``logs.without_patient_data``)."""
    values: set[str] = set()
    for ds in sources:
        identifiers = []
        for keyword in ("PatientID", "OtherPatientIDs", "AccessionNumber"):
            value = ds.get(keyword)
            identifiers += value if isinstance(value, (list, MultiValue)) else [value]
        values |= patient_values(
            str(ds.get("PatientName", "") or ""),
            identifiers,
            str(ds.get("PatientBirthDate", "") or ""),
        )
    return without_patient_data(text, values)
