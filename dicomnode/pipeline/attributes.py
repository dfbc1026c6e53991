"""Header attributes as the model-input path reads them: an empty attribute is an absent one.

Modalities and archives write Type 1 and Type 2 attributes with zero length (an empty Rescale
Intercept, VOI LUT Function or Image Orientation Patient). pydicom gives them as None, '' or an
empty sequence, which ``float()`` and pydicom's own LUT functions refuse: they take a present
attribute for a usable one. Reading every attribute through ``value_or_none`` gives the
selection rules, the decoder and the preprocessing one meaning for both: absent.
"""

from __future__ import annotations

from typing import Any

from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence


def value_or_none(ds: Dataset, keyword: str) -> Any | None:
    """The value of ``keyword`` in ``ds``; None when it is absent or empty (zero length, blank
    text, no sequence items, or a multi-valued attribute whose every value is empty)."""
    if keyword not in ds:
        return None
    value = ds[keyword].value
    return None if _empty(value) else value


def _empty(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()  # text is padded with spaces to an even length
    if isinstance(value, bytes):
        return not value  # binary values (OW LUT Data): any byte is a value
    if isinstance(value, (list, tuple, MultiValue, Sequence)):
        return all(_empty(item) for item in value)
    return False
