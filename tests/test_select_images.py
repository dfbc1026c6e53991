"""Which images the repository's cards select beyond modality, body part and view: CT
localisers and non-axial planes, colour images for image-to-image models, multi-frame images,
derived and For Processing radiographs, and the node's own results coming back."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydantic import ValidationError

from dicomnode import EQUIPMENT_MANUFACTURER
from dicomnode.findings import Algorithm, CodedConcept, DerivedImage, Finding, ImageFindings
from dicomnode.ingest.arrival import instance_facts
from dicomnode.models.registry import ModelCard, SelectionRules, discover_cards, load_card
from dicomnode.pipeline.select import (
    image_facts,
    image_plane,
    rules_match,
    select_models,
)
from dicomnode.results.derived import build_derived
from dicomnode.results.overlay import build_overlay
from dicomnode.synth.ct import make_ct_series
from dicomnode.synth.cxr import make_cxr
from dicomnode.tomlfile import ConfigError

REPO = Path(__file__).resolve().parents[1]
CT_CARDS = ["ct-lung-seg-demo", "ct-nodule-demo"]
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
MULTIFRAME_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"


@pytest.fixture(scope="module")
def cards() -> list[ModelCard]:
    return discover_cards([REPO / "models"])


@pytest.fixture(scope="module")
def cxr_cards(cards: list[ModelCard]) -> list[str]:
    return sorted(c.model.name for c in cards if c.model.name.startswith("cxr-"))


def selected(cards: list[ModelCard], ds: pydicom.Dataset) -> list[str]:
    return sorted(card.model.name for card in select_models(cards, image_facts(ds)))


@pytest.fixture(scope="module")
def ct_slice() -> pydicom.Dataset:
    images, _ = make_ct_series(7, rows=64, slices=3)
    ds = images[1]
    ds.BodyPartExamined = "CHEST"
    return ds


@pytest.fixture(scope="module")
def chest_pa() -> pydicom.Dataset:
    return make_cxr(8, size=128)[0]


def _copy(ds: pydicom.Dataset, **attributes: object) -> pydicom.Dataset:
    out = copy.deepcopy(ds)
    for keyword, value in attributes.items():
        setattr(out, keyword, value)
    return out


# CT: localisers and planes ----------------------------------------------------------------


def test_an_axial_ct_slice_is_still_selected_by_the_ct_cards(cards, ct_slice) -> None:
    assert selected(cards, ct_slice) == CT_CARDS


def test_a_ct_localiser_is_selected_by_no_card(cards, ct_slice) -> None:
    localiser = _copy(ct_slice, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    assert selected(cards, localiser) == []
    # Even one that claims an axial plane: the Image Type says what it is.
    assert image_plane(image_facts(localiser).slice_normal, 20) == "AXIAL"


@pytest.mark.parametrize("emptied", ["RescaleIntercept", "RescaleSlope"])
@pytest.mark.parametrize("how", ["missing", "empty"])
def test_a_ct_slice_without_hounsfield_units_is_selected_by_no_card(
    cards, ct_slice, emptied: str, how: str
) -> None:
    """Without Rescale Intercept and Slope a CT's stored values are no Hounsfield units (the
    phantoms store HU + 1024): a CT model's fixed window would see a shifted picture."""
    slice_ = copy.deepcopy(ct_slice)
    if how == "missing":
        del slice_[emptied]
    else:
        slice_[emptied].value = None
    assert selected(cards, slice_) == []
    # A radiograph needs no rescale: its chest cards still take it.
    radiograph = make_cxr(8, size=128)[0]
    for keyword in ("RescaleIntercept", "RescaleSlope"):
        if keyword in radiograph:
            del radiograph[keyword]
    assert selected(cards, radiograph)


@pytest.mark.parametrize(
    ("orientation", "plane"),
    [
        ([1, 0, 0, 0, 0, -1], "CORONAL"),
        ([0, 1, 0, 0, 0, -1], "SAGITTAL"),
        ([1, 0, 0, 0, math.cos(math.radians(40)), math.sin(math.radians(40))], "OBLIQUE"),
    ],
)
def test_non_axial_ct_images_of_the_ct_class_are_not_selected(
    cards, ct_slice, orientation: list[float], plane: str
) -> None:
    reformat = _copy(ct_slice, ImageOrientationPatient=orientation)
    assert image_plane(image_facts(reformat).slice_normal, 20) == plane
    assert str(reformat.SOPClassUID) == "1.2.840.10008.5.1.4.1.1.2"
    assert selected(cards, reformat) == []


def test_a_tilted_gantry_axial_slice_is_still_axial(cards, ct_slice) -> None:
    tilt = math.radians(15)
    tilted = _copy(ct_slice, ImageOrientationPatient=[1, 0, 0, 0, math.cos(tilt), math.sin(tilt)])
    assert selected(cards, tilted) == CT_CARDS
    # The tolerance is the card's: a strict card refuses it.
    strict = SelectionRules(orientations=["AXIAL"], orientation_tolerance_deg=10)
    assert not rules_match(strict, image_facts(tilted))


def test_a_series_with_a_localiser_keeps_only_its_axial_slices(cards) -> None:
    images, _ = make_ct_series(3, rows=64, slices=6)
    for ds in images:
        ds.BodyPartExamined = "CHEST"
    localiser = _copy(
        images[3],
        SOPInstanceUID=pydicom.uid.generate_uid(),
        ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
        ImageOrientationPatient=[1, 0, 0, 0, 0, -1],
    )
    for name in CT_CARDS:
        card = next(c for c in cards if c.model.name == name)
        chosen = [ds for ds in [localiser, *images] if rules_match(card.select, image_facts(ds))]
        assert chosen == images


def test_an_image_without_orientation_has_no_plane(chest_pa) -> None:
    facts = image_facts(chest_pa)
    assert facts.slice_normal is None
    assert image_plane(facts.slice_normal, 20) == ""
    assert not rules_match(SelectionRules(orientations=["AXIAL"]), facts)
    assert rules_match(SelectionRules(), facts)


# Chest radiographs --------------------------------------------------------------------------


def test_a_pa_chest_radiograph_is_still_selected_by_every_chest_card(
    cards, cxr_cards, chest_pa
) -> None:
    assert selected(cards, chest_pa) == cxr_cards
    cr, _ = make_cxr(9, size=128, modality="CR", view="AP")
    assert "PresentationIntentType" not in cr  # CR has no such attribute: not refused for it
    assert selected(cards, cr) == cxr_cards


@pytest.mark.parametrize("photometric", ["RGB", "YBR_FULL", "PALETTE COLOR"])
def test_colour_images_go_to_classifiers_but_not_to_bone_suppression(
    cards, cxr_cards, chest_pa, photometric: str
) -> None:
    samples = 1 if photometric == "PALETTE COLOR" else 3
    colour = _copy(
        chest_pa,
        SOPClassUID=SECONDARY_CAPTURE,
        SamplesPerPixel=samples,
        PhotometricInterpretation=photometric,
    )
    assert selected(cards, colour) == [n for n in cxr_cards if n != "cxr-bone-suppression-demo"]


def test_monochrome_only_needs_one_sample_and_a_monochrome_interpretation(chest_pa) -> None:
    rules = SelectionRules(monochrome_only=True)
    assert rules_match(rules, image_facts(chest_pa))
    assert rules_match(rules, image_facts(_copy(chest_pa, PhotometricInterpretation="MONOCHROME1")))
    assert not rules_match(rules, image_facts(_copy(chest_pa, SamplesPerPixel=3)))


def test_multi_frame_images_are_selected_by_no_chest_card(cards, chest_pa) -> None:
    pixels = chest_pa.pixel_array
    multi = _copy(
        chest_pa,
        SOPClassUID=MULTIFRAME_WORD_SC,
        NumberOfFrames=2,
        PixelData=np.concatenate([pixels, pixels[::-1]]).astype("<u2").tobytes(),
    )
    assert selected(cards, multi) == []
    assert selected(cards, _copy(chest_pa, NumberOfFrames=1)) != []
    assert rules_match(SelectionRules(max_frames=2), image_facts(multi))


def test_derived_radiographs_of_another_maker_are_not_selected_by_the_chest_cards(
    cards, chest_pa
) -> None:
    derived = _copy(chest_pa, ImageType=["DERIVED", "SECONDARY"], Manufacturer="Vendor")
    assert selected(cards, derived) == []


def test_for_processing_radiographs_are_not_selected(cards, chest_pa) -> None:
    assert selected(cards, _copy(chest_pa, PresentationIntentType="FOR PROCESSING")) == []
    # The For Processing SOP class says so even where the attribute is missing.
    raw = _copy(chest_pa, SOPClassUID=DX_FOR_PROCESSING)
    del raw.PresentationIntentType
    assert image_facts(raw).presentation_intent == "FOR PROCESSING"
    assert selected(cards, raw) == []


# The node's own results -----------------------------------------------------------------------


def test_the_nodes_own_results_are_never_selected_even_by_a_card_without_rules(
    cards, chest_pa
) -> None:
    algorithm = Algorithm(name="cxr-bone-suppression-demo", version="1.0.0")
    derived = build_derived(
        DerivedImage(chest_pa, chest_pa.pixel_array * 0.9, "bone suppression"), algorithm
    )
    finding = Finding(CodedConcept("36118008", "SCT", "Pneumothorax"), 0.9, 0.5, True)
    overlay = build_overlay(ImageFindings(chest_pa, [finding]), algorithm)
    # What a PACS routing them back sends: the derived image is DX For Presentation, chest, PA.
    assert (derived.Modality, image_facts(derived).view) == ("DX", "PA")
    # Their Image Type already keeps them from the chest cards; the built-in rule catches them
    # for any card, and whatever else the node writes.
    everything = SelectionRules(excluded_image_types=[], excluded_presentation_intents=[])
    for result in (derived, overlay):
        # Ingest knows them too, and starts no new analysis for them (ingest/index.py).
        assert instance_facts(result).own_result
        assert selected(cards, result) == []
        assert not rules_match(everything, image_facts(result))
        original = _copy(result, ImageType=["ORIGINAL", "PRIMARY"])
        assert not rules_match(everything, image_facts(original))
    # Synthetic phantoms ("dicomnode synth") are not the node's results.
    assert chest_pa.Manufacturer != EQUIPMENT_MANUFACTURER
    assert rules_match(everything, image_facts(chest_pa))
    assert not instance_facts(chest_pa).own_result


# Facts and card schema ------------------------------------------------------------------------


def test_image_facts_survive_malformed_headers(chest_pa) -> None:
    odd = _copy(
        chest_pa,
        ImageType="ORIGINAL",
        ImageOrientationPatient=[1, 0, 0, 0, 1],
        NumberOfFrames="",
    )
    facts = image_facts(odd)
    assert facts.image_types == ("ORIGINAL",)
    assert facts.slice_normal is None
    assert facts.number_of_frames == 1
    parallel = image_facts(_copy(chest_pa, ImageOrientationPatient=[1, 0, 0, 1, 0, 0]))
    assert parallel.slice_normal is None


def test_defaults_refuse_localisers_raw_data_and_multi_frame_images() -> None:
    rules = SelectionRules()
    assert rules.excluded_image_types == ["LOCALIZER"]
    assert rules.excluded_presentation_intents == ["FOR PROCESSING"]
    assert rules.max_frames == 1
    assert rules.orientations == [] and rules.monochrome_only is False


def _write_card(tmp_path: Path, select: str) -> Path:
    (tmp_path / "m.onnx").write_bytes(b"")
    path = tmp_path / "m.toml"
    path.write_text(
        '[model]\nname = "m"\nversion = "1"\ntask = "classification"\nonnx = "m.onnx"\n'
        '[input]\nshape = [1, 8, 8]\n[[outputs]]\nname = "p"\nkind = "probabilities"\n'
        f"[select]\n{select}\n"
    )
    return path


def test_a_card_without_the_new_rules_still_loads(tmp_path: Path) -> None:
    card = load_card(_write_card(tmp_path, 'modalities = ["DX"]'))
    assert card.select.excluded_image_types == ["LOCALIZER"]


@pytest.mark.parametrize(
    "select",
    [
        'exclude_image_types = ["DERIVED"]',  # misspelt key
        'orientations = ["AXAIL"]',  # unknown plane
        "max_frames = 0",
        "orientation_tolerance_deg = 60",
    ],
)
def test_card_schema_refuses_unknown_keys_and_values(tmp_path: Path, select: str) -> None:
    with pytest.raises((ConfigError, ValidationError)):
        load_card(_write_card(tmp_path, select))


def test_orientations_are_read_in_any_case(tmp_path: Path) -> None:
    card = load_card(_write_card(tmp_path, 'orientations = ["axial"]'))
    assert card.select.orientations == ["AXIAL"]


def test_every_selection_rule_is_documented() -> None:
    text = (REPO / "docs" / "model-cards.md").read_text()
    missing = [name for name in SelectionRules.model_fields if f"`{name}`" not in text]
    assert missing == []
