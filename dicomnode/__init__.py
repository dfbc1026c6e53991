"""dicomnode: a DICOM-native AI triage node (research demo models, not for clinical use)."""

__version__ = "0.1.0"

RESEARCH_DEMO_NOTICE = "Research demo, not for clinical use"

# Manufacturer of every object the node writes (SR, SEG, overlays, GSPS, KOS, derived images):
# how the node knows its own results when a PACS routes them back.
EQUIPMENT_MANUFACTURER = "dicomnode"


def made_by_this_node(manufacturer: object) -> bool:
    """Whether an object whose Manufacturer is ``manufacturer`` is one the node wrote (case
    and spaces aside; the phantoms' "dicomnode synth" is not)."""
    return str(manufacturer or "").strip().lower() == EQUIPMENT_MANUFACTURER
