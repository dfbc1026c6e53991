"""The header check before acknowledgement (dicomnode.ingest.validate.check_dataset) on data
sets built byte by byte: what decoding can refuse is refused, and text, which pydicom with
reading validation off decodes whatever it holds, is not decoded then."""

from __future__ import annotations

import struct
from io import BytesIO

import pydicom
import pydicom.config
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian

from dicomnode.ingest.validate import InvalidDataset, check_dataset


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _dataset(*raw_elements: bytes) -> Dataset:
    """A data set read back (values still raw) from a few SOP elements and ``raw_elements``,
    which must come after (0008,0018) in tag order."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.3.4"
    encoded = DicomBytesIO()
    encoded.is_little_endian, encoded.is_implicit_VR = True, False
    write_dataset(encoded, ds)
    return pydicom.dcmread(BytesIO(encoded.getvalue() + b"".join(raw_elements)), force=True)


@pytest.fixture(params=[pydicom.config.IGNORE, pydicom.config.RAISE], ids=["ignore", "raise"])
def validation_mode(request, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", request.param)
    return request.param


@pytest.mark.parametrize(
    "raw",
    [
        _element(0x0020, 0x0013, b"IS", b"1e999"),  # Instance Number too large for an int
        _element(0x0028, 0x0010, b"US", b"\x01\x02\x03\x04\x05\x06\x07"),  # Rows, 7 bytes
        _element(0x0028, 0x0030, b"FD", b"\x00" * 5),  # not a whole double
    ],
    ids=["IS-overflow", "US-odd-length", "FD-short"],
)
def test_values_that_do_not_decode_are_refused_in_any_mode(raw: bytes, validation_mode) -> None:
    with pytest.raises(InvalidDataset, match="does not decode"):
        check_dataset(_dataset(raw), ExplicitVRLittleEndian)


def test_a_declared_length_beyond_what_was_sent_is_refused_for_text_too(validation_mode) -> None:
    cut = _element(0x0010, 0x0010, b"PN", b"Doe^Jane")[:-4]  # the stream ends 4 bytes short
    with pytest.raises(InvalidDataset, match="declares 8 bytes, 4 sent"):
        check_dataset(_dataset(cut), ExplicitVRLittleEndian)


def test_text_is_decoded_only_where_decoding_can_refuse_it(validation_mode) -> None:
    """An invalid UID is text: with validation off pydicom keeps it as it is (the listener
    stores what was sent), with validation raising it refuses it."""
    ds = _dataset(_element(0x0020, 0x000D, b"UI", b"1.2.abc"))
    if validation_mode == pydicom.config.IGNORE:
        check_dataset(ds, ExplicitVRLittleEndian)
        assert ds.get_item(0x0020000D, keep_deferred=True).value == b"1.2.abc"  # not decoded
    else:
        with pytest.raises(InvalidDataset, match=r"\(0020,000D\) does not decode"):
            check_dataset(ds, ExplicitVRLittleEndian)


def test_implicit_vr_text_is_recognised_from_the_dictionary(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.IGNORE)
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.3.4"
    ds.PatientName = "Doe^Jane"
    ds.Rows = 16
    encoded = DicomBytesIO()
    encoded.is_little_endian, encoded.is_implicit_VR = True, True
    write_dataset(encoded, ds)
    read = pydicom.dcmread(BytesIO(encoded.getvalue()), force=True)
    check_dataset(read, "1.2.840.10008.1.2")
    # Rows (US) was decoded to be checked; Patient's Name (PN) was left as sent.
    assert not isinstance(read.get_item(0x00280010, keep_deferred=True), tuple)
    assert isinstance(read.get_item(0x00100010, keep_deferred=True), tuple)
