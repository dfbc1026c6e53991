"""Every result of a radiograph of a paired body part (a hand, a knee) passes dciodvfy and keeps
the side it shows, whether the source says it as General Series Laterality or as Image
Laterality, as the results of a chest radiograph do.

Each IOD says the side its own way: a Secondary Capture overlay and a GSPS in General Series
Laterality; a derived DX image in Image Laterality (DX Anatomy Imaged); a Segmentation in each
segment's Anatomic Region Sequence with a laterality modifier (Segment Description, CID 244),
since dciodvfy allows no General Series Laterality in a SEG and Frame Anatomy is not one of the
Segmentation IOD's functional groups; a TID 1500 SR in each finding's measurement group, as its
Finding Site (the region) with a Laterality modifier (CID 244). A KOS has no place to keep it."""

from __future__ import annotations

from collections.abc import Iterator

import highdicom as hd
import pytest
from dciodvfy import dciodvfy_errors
from defective_sources import conforming
from pydicom.dataset import Dataset
from test_results_bad_values import every_result

# id: (modality, Body Part Examined, the source's Anatomic Region code or None, the side, the
# attribute that says it). A CR has no Anatomic Region Sequence: its SEG names the region by
# Body Part Examined (PS3.16 Annex L).
CASES = {
    "DX hand, Laterality R": ("DX", "HAND", ("85562004", "Hand"), "R", "Laterality"),
    "DX hand, Image Laterality R": ("DX", "HAND", ("85562004", "Hand"), "R", "ImageLaterality"),
    "CR knee, Laterality L": ("CR", "KNEE", None, "L", "Laterality"),
    "CR knee, Image Laterality L": ("CR", "KNEE", None, "L", "ImageLaterality"),
}
REGIONS = {"HAND": "85562004", "KNEE": "72696002"}
# CID 244 Laterality.
SIDE_MODIFIERS = {"R": "24028007", "L": "7771000"}
# TID 1500 concept names: Measurement Group, Finding Site, Laterality.
MEASUREMENT_GROUP = ("125007", "DCM")
FINDING_SITE = ("363698007", "SCT")
LATERALITY = ("272741003", "SCT")


def paired_source(
    kind: str, body_part: str, region: tuple[str, str] | None, side: str, keyword: str
) -> Dataset:
    """The synthetic ``kind`` radiograph relabelled as ``body_part``, its side in ``keyword``
    only."""
    source = conforming(kind)
    for attribute in ("Laterality", "ImageLaterality", "AnatomicRegionSequence"):
        if attribute in source:
            delattr(source, attribute)
    source.BodyPartExamined = body_part
    if region is not None:
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = region[0], "SCT", region[1]
        source.AnatomicRegionSequence = [code]
    setattr(source, keyword, side)
    return source


@pytest.mark.parametrize("case", CASES)
def test_every_result_of_a_paired_body_part_is_valid_and_keeps_its_side(case: str) -> None:
    kind, body_part, region, side, keyword = CASES[case]
    source = paired_source(kind, body_part, region, side, keyword)

    results = every_result(source)

    for result_kind, result in results.items():
        assert dciodvfy_errors(result) == [], result_kind
    for result_kind in ("overlay", "gsps"):
        assert results[result_kind].Laterality == side, result_kind
    derived = results["derived"]
    assert side in (derived.get("Laterality"), derived.get("ImageLaterality"))
    seg = results["seg"]
    assert "Laterality" not in seg
    for segment in seg.SegmentSequence:
        (anatomic_region,) = segment.AnatomicRegionSequence
        assert anatomic_region.CodeValue == REGIONS[body_part]
        (modifier,) = anatomic_region.AnatomicRegionModifierSequence
        assert (modifier.CodeValue, modifier.CodingSchemeDesignator) == (
            SIDE_MODIFIERS[side],
            "SCT",
        )
    assert source.get(keyword) == side
    groups = measurement_groups(results["sr"])
    assert len(groups) == 3  # every finding of every_result's evaluation
    for group in groups:
        (site,) = [item for item in group.ContentSequence if concept_name(item) == FINDING_SITE]
        assert site.RelationshipType == "HAS CONCEPT MOD"
        assert code_of(site) == (REGIONS[body_part], "SCT")
        (laterality,) = site.ContentSequence
        assert concept_name(laterality) == LATERALITY
        assert laterality.RelationshipType == "HAS CONCEPT MOD"
        assert code_of(laterality) == (SIDE_MODIFIERS[side], "SCT")
    # highdicom reads the site and its side back.
    report = hd.sr.Comprehensive3DSR.from_dataset(results["sr"])
    for group in report.content.get_planar_roi_measurement_groups():
        (site,) = group.finding_sites
        assert (site.value.value, site.laterality.value) == (
            REGIONS[body_part],
            SIDE_MODIFIERS[side],
        )


def walk(items) -> Iterator[Dataset]:
    for item in items:
        yield item
        yield from walk(item.get("ContentSequence", []))


def concept_name(item: Dataset) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return (code.CodeValue, code.CodingSchemeDesignator)


def code_of(item: Dataset) -> tuple[str, str]:
    code = item.ConceptCodeSequence[0]
    return (code.CodeValue, code.CodingSchemeDesignator)


def measurement_groups(sr: Dataset) -> list[Dataset]:
    return [
        item
        for item in walk(sr.ContentSequence)
        if item.ValueType == "CONTAINER" and concept_name(item) == MEASUREMENT_GROUP
    ]


@pytest.mark.parametrize("kind", ["DX", "CR"])
def test_a_chest_seg_names_no_anatomic_region(kind: str) -> None:
    """A chest is unpaired: its SEG's segments say no side, and name no region either."""
    results = every_result(conforming(kind))
    assert dciodvfy_errors(results["seg"]) == []
    assert all(
        "AnatomicRegionSequence" not in segment for segment in results["seg"].SegmentSequence
    )


@pytest.mark.parametrize("kind", ["DX", "CR"])
def test_a_chest_sr_names_no_finding_site(kind: str) -> None:
    """A chest is unpaired: its SR's measurement groups get no Finding Site, even where the
    source names its region (Anatomic Region Sequence) or carries a stray Laterality."""
    source = conforming(kind)
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "43799004", "SCT", "Chest"
    source.AnatomicRegionSequence = [code]
    source.Laterality = "R"
    sr = every_result(source)["sr"]
    assert dciodvfy_errors(sr) == []
    assert len(measurement_groups(sr)) == 3
    assert not [item for item in walk(sr.ContentSequence) if concept_name(item) == FINDING_SITE]
