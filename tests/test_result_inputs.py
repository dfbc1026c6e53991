"""What a result object was made from (dicomnode.results.inputs): pure, on hand-made data
sets and the repository's model cards."""

from __future__ import annotations

from pathlib import Path

from pydicom import Dataset

from dicomnode.config import Settings
from dicomnode.models.registry import load_card
from dicomnode.results.inputs import (
    StudyInstance,
    inputs_digest,
    node_context,
    object_inputs,
    reads_across_slices,
    referenced_results,
)

MODELS = Path(__file__).resolve().parent.parent / "models"
PNEUMOTHORAX = load_card(MODELS / "cxr_pneumothorax_demo.toml")
CT_NODULE = load_card(MODELS / "ct_nodule_demo.toml")

INSTANCES = {
    "1.1": StudyInstance("9.1", "100:/a"),
    "1.2": StudyInstance("9.1", "100:/b"),
    "1.3": StudyInstance("9.1", "100:/c"),
    "2.1": StudyInstance("9.2", "100:/d"),
}


def _referencing(*uids: str) -> Dataset:
    ds = Dataset()
    items = []
    for uid in uids:
        item = Dataset()
        item.ReferencedSOPInstanceUID = uid
        items.append(item)
    ds.SourceImageSequence = items
    return ds


def test_an_object_is_made_from_the_study_instances_it_references() -> None:
    ds = _referencing("1.2", "7.7")  # 7.7: not one of the study's instances
    assert object_inputs(ds, INSTANCES, whole_series=False) == {"1.2"}
    assert object_inputs(ds, INSTANCES, whole_series=True) == {"1.1", "1.2", "1.3"}
    assert object_inputs(_referencing(), INSTANCES, whole_series=True) == set()


def test_models_reading_across_slices_depend_on_the_whole_series() -> None:
    assert not reads_across_slices(PNEUMOTHORAX)
    assert reads_across_slices(CT_NODULE)


def test_the_digest_changes_with_each_input_and_is_empty_without_any() -> None:
    context = node_context(Settings(), [PNEUMOTHORAX])
    digest = inputs_digest(context, PNEUMOTHORAX, "overlay", {"1.1"}, INSTANCES)
    assert digest == inputs_digest(context, PNEUMOTHORAX, "overlay", {"1.1"}, INSTANCES)
    other_copy = {**INSTANCES, "1.1": StudyInstance("9.1", "101:/a")}
    others = [
        inputs_digest(context, PNEUMOTHORAX, "overlay", {"1.1", "1.2"}, INSTANCES),
        inputs_digest(context, PNEUMOTHORAX, "overlay", {"1.1"}, other_copy),
        inputs_digest(context, PNEUMOTHORAX, "gsps", {"1.1"}, INSTANCES),
        inputs_digest(context, CT_NODULE, "overlay", {"1.1"}, INSTANCES),
        inputs_digest(
            node_context(Settings(node={"ae_title": "OTHER"}), [PNEUMOTHORAX]),
            PNEUMOTHORAX,
            "overlay",
            {"1.1"},
            INSTANCES,
        ),
        inputs_digest(
            node_context(Settings(), [PNEUMOTHORAX, CT_NODULE]),
            PNEUMOTHORAX,
            "overlay",
            {"1.1"},
            INSTANCES,
        ),
    ]
    assert digest not in others and len(set(others)) == len(others)
    assert inputs_digest(context, PNEUMOTHORAX, "overlay", set(), INSTANCES) == ""


def test_the_result_objects_an_object_references_count_by_their_current_uids() -> None:
    """A KOS selecting the study's image 1.1 and result objects 7.7 and 7.8: those count (by
    the UIDs the job's renaming gave them), a new version of one changes the digest; an object
    referencing none of them keeps the digest it had."""
    kos = _referencing("1.1", "7.7", "7.8")
    assert referenced_results(kos, INSTANCES) == {"7.7", "7.8"}
    assert referenced_results(_referencing("1.1"), INSTANCES) == set()
    context = node_context(Settings(), [PNEUMOTHORAX])
    digest = inputs_digest(context, PNEUMOTHORAX, "kos", {"1.1"}, INSTANCES, {"7.7", "7.8"})
    assert digest == inputs_digest(context, PNEUMOTHORAX, "kos", {"1.1"}, INSTANCES, ["7.8", "7.7"])
    assert digest != inputs_digest(context, PNEUMOTHORAX, "kos", {"1.1"}, INSTANCES, {"7.7", "7.9"})
    assert digest != inputs_digest(context, PNEUMOTHORAX, "kos", {"1.1"}, INSTANCES)
    assert inputs_digest(context, PNEUMOTHORAX, "overlay", {"1.1"}, INSTANCES, ()) == (
        inputs_digest(context, PNEUMOTHORAX, "overlay", {"1.1"}, INSTANCES)
    )
