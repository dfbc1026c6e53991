"""Compressed transfer syntaxes arrive from dcmtk storescu and are stored as received."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from conftest import dcmtk
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from test_scp import Node, start_node

from dicomnode.db.models import Instance

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"

# (file shipped in pydicom's wheel, storescu option proposing its transfer syntax)
CASES = [
    ("SC_rgb_dcmtk_+eb+cr.dcm", "-xy", "1.2.840.10008.1.2.4.50"),  # JPEG Baseline
    ("JPEG-lossy.dcm", "-xx", "1.2.840.10008.1.2.4.51"),  # JPEG Extended 12 bit
    ("SC_rgb_jpeg_gdcm.dcm", "-xs", "1.2.840.10008.1.2.4.70"),  # JPEG Lossless SV1
    ("MR_small_jpeg_ls_lossless.dcm", "-xt", "1.2.840.10008.1.2.4.80"),  # JPEG-LS lossless
    ("MR_small_jp2klossless.dcm", "-xv", "1.2.840.10008.1.2.4.90"),  # JPEG 2000 lossless
    ("JPEG2000.dcm", "-xw", "1.2.840.10008.1.2.4.91"),  # JPEG 2000
    ("MR_small_RLE.dcm", "-xr", "1.2.840.10008.1.2.5"),  # RLE Lossless
    ("image_dfl.dcm", "-xd", "1.2.840.10008.1.2.1.99"),  # Deflated Explicit VR LE
    ("MR_small_implicit.dcm", "-xi", "1.2.840.10008.1.2"),  # Implicit VR LE
]


@pytest.fixture
def scp(tmp_path: Path, sessions: sessionmaker[Session]) -> Iterator[Node]:
    yield from start_node(tmp_path, sessions)


@pytest.mark.parametrize(("name", "option", "transfer_syntax"), CASES, ids=[c[2] for c in CASES])
def test_stored_as_received(scp: Node, name: str, option: str, transfer_syntax: str) -> None:
    source = TEST_FILES / name
    original = pydicom.dcmread(source)
    assert original.file_meta.TransferSyntaxUID == transfer_syntax
    sent = subprocess.run(
        [dcmtk("storescu"), option, "-aec", "DICOMNODE", "127.0.0.1", str(scp.port), str(source)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    assert sent.returncode == 0, sent.stdout + sent.stderr
    with scp.sessions() as session:
        row = session.scalars(
            select(Instance).where(Instance.sop_instance_uid == str(original.SOPInstanceUID))
        ).one()
    assert row.transfer_syntax_uid == transfer_syntax
    stored = pydicom.dcmread(row.path)
    assert stored.file_meta.TransferSyntaxUID == transfer_syntax
    # No re-encoding: the (compressed) pixel data bytes are the sender's.
    assert stored.PixelData == original.PixelData
