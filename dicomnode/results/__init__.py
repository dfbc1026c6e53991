"""Result objects written for a PACS: TID 1500 SR and Secondary Capture overlays."""

from dicomnode.results.overlay import build_overlay
from dicomnode.results.sr import build_sr
from dicomnode.results.uids import result_instance_uid, result_series_uid, result_uid

__all__ = [
    "build_overlay",
    "build_sr",
    "result_instance_uid",
    "result_series_uid",
    "result_uid",
]
