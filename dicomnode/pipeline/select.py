"""Which models run on which images: the model cards' selection rules (pure)."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom import Dataset

from dicomnode.models.registry import ModelCard, SelectionRules


@dataclass(frozen=True)
class ImageFacts:
    modality: str
    body_part: str
    view: str
    sop_class_uid: str


def image_facts(ds: Dataset) -> ImageFacts:
    """The attributes that selection rules look at."""
    return ImageFacts(
        modality=str(ds.get("Modality", "")).upper(),
        body_part=str(ds.get("BodyPartExamined", "")).upper(),
        view=str(ds.get("ViewPosition", "")).upper(),
        sop_class_uid=str(ds.get("SOPClassUID", "")),
    )


def _admits(allowed: list[str], value: str) -> bool:
    return not allowed or value.upper() in {item.upper() for item in allowed}


def rules_match(rules: SelectionRules, facts: ImageFacts) -> bool:
    """True when every non-empty rule admits the image (empty rule = any value)."""
    return (
        _admits(rules.modalities, facts.modality)
        and _admits(rules.body_parts, facts.body_part)
        and _admits(rules.views, facts.view)
        and (not rules.sop_classes or facts.sop_class_uid in rules.sop_classes)
    )


def select_models(cards: list[ModelCard], facts: ImageFacts) -> list[ModelCard]:
    """The models whose rules admit this image."""
    return [card for card in cards if rules_match(card.select, facts)]
