"""dicomnode: a DICOM-native AI triage node (research demo models, not for clinical use)."""

__version__ = "0.1.0"

RESEARCH_DEMO_NOTICE = "Research demo, not for clinical use"
