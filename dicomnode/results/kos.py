"""Key Object Selection document flagging the images with critical AI findings (IHE AIR)."""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import pydicom

from dicomnode import EQUIPMENT_MANUFACTURER, RESEARCH_DEMO_NOTICE
from dicomnode.findings import Algorithm
from dicomnode.results.reference import sanitised_reference
from dicomnode.results.source import character_set, check_source, copy_patient_study, one_study
from dicomnode.results.sr import device_observer, series_description
from dicomnode.results.uids import result_instance_uid, result_series_uid

KOS_SERIES_NUMBER = 9906
# CID 7010 Key Object Selection Document Title: the flagged images deserve a look.
OF_INTEREST = hd.sr.CodedConcept("113000", "DCM", "Of Interest")
_DESCRIPTION_MAX = 1024  # the note is a TEXT content item (UT would allow more; keep it short)


def build_kos(
    critical: Sequence[pydicom.Dataset],
    algorithm: Algorithm,
    results: Sequence[pydicom.Dataset] = (),
) -> pydicom.Dataset:
    """Return a KOS "Of Interest" selecting ``critical`` source images and the ``results``.

    One document per model version and selection: the same selection on a re-run gives the
    same instance, another one (late instances) a new one, since a UID names one content.
    """
    if not critical:
        raise ValueError("build_kos needs at least one source image with a critical finding")
    # The source images' headers as the document takes them over (invalid values emptied or
    # left out); the results are the node's own.
    selected = [
        sanitised_reference(check_source(ds, f"critical[{index}]"))
        for index, ds in enumerate(critical)
    ] + [check_source(ds, f"results[{index}]") for index, ds in enumerate(results)]
    uids = [str(ds.SOPInstanceUID) for ds in selected]
    if len(set(uids)) != len(uids):
        raise ValueError("build_kos got the same instance more than once")
    one_study(selected, "the KOS's images and results")  # raises for more than one study
    note = (
        f"Images with critical findings of {algorithm.name} {algorithm.version} "
        f"({algorithm.manufacturer}), not verified by a physician"
    )
    return key_object_document(
        OF_INTEREST,
        selected,
        selected[0],
        algorithm,
        note,
        kind="kos",
        series_number=KOS_SERIES_NUMBER,
        sop_instance_uid=result_instance_uid(uids, algorithm, "kos"),
        description="KOS",
    )


def key_object_document(
    title: hd.sr.CodedConcept,
    referenced: Sequence[pydicom.Dataset],
    study: pydicom.Dataset,
    algorithm: Algorithm,
    note: str,
    *,
    kind: str,
    series_number: int,
    sop_instance_uid: str,
    description: str,
) -> pydicom.Dataset:
    """A Key Object Selection Document of ``algorithm`` titled ``title``, selecting the
    ``referenced`` objects (its evidence too), in the patient and study of ``study``, with
    ``note`` as its Key Object Description (the research-demo notice first for a demo model),
    in the result series of ``kind``."""
    if algorithm.research_demo:
        note = f"{RESEARCH_DEMO_NOTICE}. {note}"
    content = hd.ko.KeyObjectSelection(
        document_title=title,
        referenced_objects=referenced,
        observer_device_context=device_observer(algorithm),
        description=note[:_DESCRIPTION_MAX],
    )
    kos = hd.ko.KeyObjectSelectionDocument(
        **character_set(study),
        evidence=referenced,
        content=content,
        series_instance_uid=result_series_uid(str(study.StudyInstanceUID), algorithm, kind),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=EQUIPMENT_MANUFACTURER,
        series_description=series_description(algorithm, description),
    )
    copy_patient_study(study, kos)
    return kos
