"""Which models run on which images: the model cards' selection rules (pure)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from pydicom import Dataset

from dicomnode.findings import Finding
from dicomnode.models.registry import ModelCard, SelectionRules


@dataclass(frozen=True)
class ImageFacts:
    modality: str
    body_part: str
    view: str
    sop_class_uid: str


# Words in Body Part Examined or in the descriptions that mean the chest. Sites spell it many
# ways, and many chest radiographs carry no Body Part Examined at all.
CHEST_WORDS = ("CHEST", "THORAX", "TORAX", "THORAKS", "LUNG", "CXR", "PULM", "POUMON")
DESCRIPTIONS = (
    "ProtocolName",
    "SeriesDescription",
    "StudyDescription",
    "PerformedProcedureStepDescription",
)


def body_part(ds: Dataset) -> str:
    """Body Part Examined, with the chest's other spellings (THORAX, LUNG, CHEST_PA, ...) read
    as CHEST; when absent, CHEST if a protocol or description names the chest."""
    value = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    if value:
        return "CHEST" if any(word in value for word in CHEST_WORDS) else value
    for keyword in DESCRIPTIONS:
        text = str(ds.get(keyword, "") or "").upper()
        if any(word in text for word in CHEST_WORDS):
            return "CHEST"
    return ""


def image_facts(ds: Dataset) -> ImageFacts:
    """The attributes that selection rules look at."""
    return ImageFacts(
        modality=str(ds.get("Modality", "")).upper(),
        body_part=body_part(ds),
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


def routed_view(card: ModelCard, findings: list[Finding]) -> str | None:
    """The view a router card (``model.sets = "view"``) assigns: its most probable label's
    fact_value when that label clears its threshold, else None (keep the header's view)."""
    if not findings:
        return None
    best = max(findings, key=lambda f: f.probability)
    if not best.present:
        return None
    label = next((lb for lb in card.labels if lb.concept == best.concept), None)
    return label.fact_value.upper() if label and label.fact_value else None


def with_view(facts: ImageFacts, view: str) -> ImageFacts:
    """The same facts with the view replaced (by a router's decision)."""
    return replace(facts, view=view.upper())
