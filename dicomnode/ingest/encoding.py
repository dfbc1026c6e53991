"""The two byte strings the listener writes for every instance, encoded directly, and the
request it reads for every instance, decoded directly.

pynetdicom builds both through pydicom data sets: a C-STORE-RSP's command set (a
``Dataset`` encoded twice, once for its group length) and the File Meta Information it
writes ahead of a received data set (a ``FileMetaDataset`` built and written by
``write_file_meta_info``): about 0.28 and 0.23 ms of Python per instance, together a tenth
of a CT slice's time here. Their layouts are fixed (PS3.7 E.1 and 9.3.1.2 for the command
set, Implicit VR Little Endian; PS3.10 7.1 for the file meta, Explicit VR Little Endian),
so the listener writes them itself; tests/test_encoding.py holds both to pydicom's and
pynetdicom's bytes.

The other way, pynetdicom turns a received C-STORE-RQ's command set into its primitive by
converting every element through pydicom (about 0.13 ms of the receiving thread per
instance); :func:`decode_store_request` reads the few values from the elements as read and
sets them through the primitive's own (validating) setters. Anything it does not expect is
left to pynetdicom.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.dataelem import DataElement, RawDataElement
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dimse_primitives import C_STORE

C_STORE_RSP_COMMAND = 0x8001
NO_DATA_SET = 0x0101
FILE_META_VERSION = b"\x00\x01"
# A C-STORE-RQ's command set (PS3.7 9.3.1.1), element numbers of group 0000: those that are
# primitive parameters, by how they are encoded (Implicit VR Little Endian), and those that
# are not (Command Group Length, Command Field, Command Data Set Type).
_REQUEST_UIDS = {0x0002: "AffectedSOPClassUID", 0x1000: "AffectedSOPInstanceUID"}
_REQUEST_NUMBERS = {
    0x0110: "MessageID",
    0x0700: "Priority",
    0x1031: "MoveOriginatorMessageID",
}
_REQUEST_AE_TITLES = {0x1030: "MoveOriginatorApplicationEntityTitle"}
_REQUEST_STRUCTURE = frozenset((0x0000, 0x0100, 0x0800))
_REQUEST_PARAMETERS = {**_REQUEST_UIDS, **_REQUEST_NUMBERS, **_REQUEST_AE_TITLES}


def _even(value: str, pad: bytes) -> bytes:
    encoded = str(value).encode("ascii")
    return encoded + pad if len(encoded) % 2 else encoded


def _command_element(element: int, value: bytes) -> bytes:
    """A group-0000 element in Implicit VR Little Endian."""
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def encode_store_response(primitive: C_STORE) -> bytes | None:
    """The command set of a C-STORE-RSP as pynetdicom would send it; None if ``primitive``
    carries more than a status (an Error Comment, an Offending Element): pynetdicom's."""
    if (
        primitive.MessageIDBeingRespondedTo is None
        or primitive.Status is None
        or primitive.ErrorComment is not None
        or primitive.OffendingElement is not None
    ):
        return None
    sop_class, sop_instance = primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID
    elements = b"".join(
        (
            _command_element(0x0002, _even(sop_class, b"\x00")) if sop_class else b"",
            _command_element(0x0100, _us(C_STORE_RSP_COMMAND)),
            _command_element(0x0120, _us(primitive.MessageIDBeingRespondedTo)),
            _command_element(0x0800, _us(NO_DATA_SET)),
            _command_element(0x0900, _us(primitive.Status)),
            _command_element(0x1000, _even(sop_instance, b"\x00")) if sop_instance else b"",
        )
    )
    return _command_element(0x0000, struct.pack("<I", len(elements))) + elements


@dataclass(frozen=True)
class FileMeta:
    """The File Meta Information of a received data set (pynetdicom's ``create_file_meta``
    arguments; the implementation is pynetdicom's, as it writes)."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    implementation_uid: str = PYNETDICOM_IMPLEMENTATION_UID
    implementation_version: str = PYNETDICOM_IMPLEMENTATION_VERSION


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """A group-0002 element in Explicit VR Little Endian."""
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def encode_file_meta(meta: FileMeta) -> bytes:
    """The File Meta Information group as pydicom's ``write_file_meta_info`` writes it
    (without the preamble and ``DICM`` prefix)."""
    elements = b"".join(
        (
            _meta_element(0x0001, b"OB", FILE_META_VERSION),
            _meta_element(0x0002, b"UI", _even(meta.sop_class_uid, b"\x00")),
            _meta_element(0x0003, b"UI", _even(meta.sop_instance_uid, b"\x00")),
            _meta_element(0x0010, b"UI", _even(meta.transfer_syntax, b"\x00")),
            _meta_element(0x0012, b"UI", _even(meta.implementation_uid, b"\x00")),
            _meta_element(0x0013, b"SH", _even(meta.implementation_version, b" ")),
        )
    )
    return _meta_element(0x0000, b"UL", struct.pack("<I", len(elements))) + elements


def decode_store_request(command_set: Dataset) -> C_STORE | None:
    """The parameters of a C-STORE-RQ's primitive, as pynetdicom's ``message_to_primitive``
    sets them, from its decoded command set; None where an element is not one of those
    (PS3.7 9.3.1.1), is empty, or holds more than one value (pynetdicom's way then).

    The primitive's setters validate the values as they do for pynetdicom (an invalid UID
    raises there as here). The data set and presentation context are the caller's."""
    primitive = C_STORE()
    for tag, item in command_set.items():
        if tag >> 16 != 0x0000:
            return None
        element = tag & 0xFFFF
        if element in _REQUEST_STRUCTURE:
            continue
        name = _REQUEST_PARAMETERS.get(element)
        value = None if name is None else _request_value(element, item)
        if value is None:
            return None
        setattr(primitive, name, value)
    return primitive


def _request_value(element: int, item: RawDataElement | DataElement) -> int | str | None:
    """One value of a request's command element; None if it is empty or holds several."""
    number = element in _REQUEST_NUMBERS
    if not isinstance(item, RawDataElement):
        # Converted already (pynetdicom reads a chunked request's UIDs for the file meta).
        value = item.value
        if item.VM != 1 or not isinstance(value, int if number else str):
            return None
        return value
    raw = item.value
    if not raw:
        return None
    if number:
        return int.from_bytes(raw, "little") if len(raw) == 2 else None
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    if "\\" in text:
        return None
    return text.rstrip("\0 ") if element in _REQUEST_UIDS else text.strip()
