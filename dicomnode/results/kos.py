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
    study_uid = one_study(selected, "the KOS's images and results")
    note = (
        f"Images with critical findings of {algorithm.name} {algorithm.version} "
        f"({algorithm.manufacturer}), not verified by a physician"
    )
    if algorithm.research_demo:
        note = f"{RESEARCH_DEMO_NOTICE}. {note}"
    content = hd.ko.KeyObjectSelection(
        document_title=OF_INTEREST,
        referenced_objects=selected,
        observer_device_context=device_observer(algorithm),
        description=note[:_DESCRIPTION_MAX],
    )
    kos = hd.ko.KeyObjectSelectionDocument(
        **character_set(selected[0]),
        evidence=selected,
        content=content,
        series_instance_uid=result_series_uid(study_uid, algorithm, "kos"),
        series_number=KOS_SERIES_NUMBER,
        sop_instance_uid=result_instance_uid(uids, algorithm, "kos"),
        instance_number=1,
        manufacturer=EQUIPMENT_MANUFACTURER,
        series_description=series_description(algorithm, "KOS"),
    )
    copy_patient_study(selected[0], kos)
    return kos
