"""Result objects written for a PACS: SR, SC overlay, SEG, GSPS, derived images and KOS."""

from dicomnode.results.derived import build_derived
from dicomnode.results.gsps import build_gsps
from dicomnode.results.kos import build_kos
from dicomnode.results.overlay import build_overlay
from dicomnode.results.seg import build_seg
from dicomnode.results.sr import build_sr
from dicomnode.results.uids import KINDS, result_instance_uid, result_series_uid, result_uid

__all__ = [
    "KINDS",
    "build_derived",
    "build_gsps",
    "build_kos",
    "build_overlay",
    "build_seg",
    "build_sr",
    "result_instance_uid",
    "result_series_uid",
    "result_uid",
]
