"""Which models run on which image: selection rules, body part spellings, view routing."""

from __future__ import annotations

import pytest
from pydicom import Dataset

from dicomnode.findings import CodedConcept, Finding
from dicomnode.models.registry import ModelCard
from dicomnode.pipeline.select import body_part, image_facts, routed_view, rules_match, with_view


def _image(**attributes: str) -> Dataset:
    ds = Dataset()
    ds.Modality = attributes.pop("Modality", "DX")
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    ("attributes", "expected"),
    [
        ({"BodyPartExamined": "CHEST"}, "CHEST"),
        ({"BodyPartExamined": "THORAX"}, "CHEST"),
        ({"BodyPartExamined": "chest_pa"}, "CHEST"),
        ({"BodyPartExamined": "LUNG"}, "CHEST"),
        ({"BodyPartExamined": "KNEE"}, "KNEE"),
        ({"StudyDescription": "XR Chest 2 views"}, "CHEST"),
        ({"ProtocolName": "Thorax p.a."}, "CHEST"),
        ({"SeriesDescription": "CXR portable"}, "CHEST"),
        ({"StudyDescription": "XR Knee left"}, ""),
        ({}, ""),
        # Body Part Examined wins over a description.
        ({"BodyPartExamined": "ABDOMEN", "StudyDescription": "chest and abdomen"}, "ABDOMEN"),
    ],
)
def test_body_part_reads_the_chest_spelled_many_ways(attributes: dict, expected: str) -> None:
    assert body_part(_image(**attributes)) == expected


def _card(**select: list[str]) -> ModelCard:
    return ModelCard.model_validate(
        {
            "model": {"name": "m", "version": "1", "task": "classification", "onnx": "m.onnx"},
            "input": {"shape": [1, 8, 8]},
            "outputs": [{"name": "p", "kind": "probabilities"}],
            "labels": [
                {"index": i, "code_value": v, "code_scheme": "SCT", "code_meaning": v,
                 "fact_value": v}
                for i, v in enumerate(["PA", "AP", "LATERAL"])
            ],
            "select": select,
        }
    )  # fmt: skip


def test_rules_need_every_non_empty_rule_to_admit_the_image() -> None:
    chest_pa = image_facts(_image(BodyPartExamined="THORAX", ViewPosition="PA"))
    card = _card(modalities=["DX", "CR"], body_parts=["CHEST"], views=["PA", "AP"])
    assert rules_match(card.select, chest_pa)
    assert not rules_match(card.select, with_view(chest_pa, "LATERAL"))
    assert not rules_match(
        card.select, image_facts(_image(Modality="CT", BodyPartExamined="CHEST"))
    )
    no_view = image_facts(_image(BodyPartExamined="CHEST"))
    assert not rules_match(card.select, no_view)  # an unknown view is not PA
    assert rules_match(_card(modalities=["DX"]).select, no_view)  # empty rules admit anything


def test_router_sets_the_view_of_its_most_probable_label_when_above_threshold() -> None:
    card = _card()

    def findings(*probabilities: float) -> list[Finding]:
        return [
            Finding(CodedConcept(v, "SCT", v), p, 0.5, False)
            for v, p in zip(["PA", "AP", "LATERAL"], probabilities, strict=True)
        ]

    assert routed_view(card, findings(0.1, 0.2, 0.9)) == "LATERAL"
    assert routed_view(card, findings(0.3, 0.4, 0.3)) is None  # nobody sure: keep the header
    assert routed_view(card, []) is None
