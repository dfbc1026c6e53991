"""The anatomic region a source image shows and, for a paired body part, its side, as codes.

The results say the side of a hand or knee each in their IOD's own place: a SEG's segments as
an Anatomic Region with a modifier, a TID 1500 SR's measurement groups as a Finding Site with
a Laterality. Both take the region and side from here, so that they name the same ones."""

from __future__ import annotations

import functools

import highdicom as hd
import pydicom

from dicomnode.results.source import paired_side

# CID 244 Laterality: the side of a paired body part.
SIDES = {"R": ("24028007", "SCT", "Right"), "L": ("7771000", "SCT", "Left")}

__all__ = ["SIDES", "paired_region", "region_code", "side_code"]


def paired_region(source: pydicom.Dataset) -> tuple[hd.sr.CodedConcept, hd.sr.CodedConcept] | None:
    """The region and side (CID 244) of the paired body part ``source`` shows; None for an
    unpaired part (a chest), an unknown side, or a region no code names."""
    side = paired_side(source)
    if side is None:
        return None
    region = region_code(source)
    if region is None:
        return None
    return region, side_code(side)


def side_code(side: str) -> hd.sr.CodedConcept:
    """The CID 244 code of ``side``, R or L."""
    return hd.sr.CodedConcept(*SIDES[side])


def region_code(source: pydicom.Dataset) -> hd.sr.CodedConcept | None:
    """The region ``source`` shows: its Anatomic Region Sequence code, else its Body Part
    Examined's (PS3.16 Annex L); None when neither names one. A new concept on each call: a
    caller may add modifiers to it."""
    regions = source.get("AnatomicRegionSequence") or []
    if regions:
        item = regions[0]
        try:
            return hd.sr.CodedConcept(
                str(item.CodeValue), str(item.CodingSchemeDesignator), str(item.CodeMeaning)
            )
        except (AttributeError, TypeError, ValueError):
            pass  # not a whole code: Body Part Examined may still name the region
    mapped = _annex_l_regions().get(str(source.get("BodyPartExamined") or "").strip())
    if mapped is None:
        return None
    code = mapped[0]
    return hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning)


@functools.cache
def _annex_l_regions() -> dict[str, tuple[hd.sr.CodedConcept, bool]]:
    """Body Part Examined -> its Anatomic Region code (PS3.16 Annex L), as highdicom has it.
    The table is not part of highdicom's public API: should it move, no region is named (the
    results stay valid, without their side) rather than the writers failing to import."""
    try:
        from highdicom._standard_utils import get_anatomic_region_map
    except ImportError:
        return {}
    return get_anatomic_region_map()
