"""Fuzz the C-STORE handler: mutated encodings of a valid image, fed as pynetdicom would.

Hypothesis mutates the bytes of a valid Explicit VR Little Endian image (overwrite bytes,
flip bits, insert, delete, truncate, plant huge lengths) and each result goes through
``StorageSCP.store`` on a real spool and SQLite database. A crash is an exception out of the
handler, a status other than success / out of resources / mismatch / cannot understand,
or a success whose file does not read back.

    python benchmarks/fuzz_store.py [--cases 1000]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pynetdicom.dsutils import encode
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Settings
from dicomnode.db.session import make_engine, make_sessionmaker, upgrade
from dicomnode.ingest.scp import StorageSCP, offline_store_event

ALLOWED = {0x0000, 0xA700, 0xA900, 0xC000}
PREFIX = "1.2.826.0.1.3680043.8.498."


def seed_dataset() -> Dataset:
    """A small valid Secondary Capture image (16 x 16, 8 bit) with a nested sequence."""
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid(PREFIX)
    ds.StudyInstanceUID = generate_uid(PREFIX)
    ds.SeriesInstanceUID = generate_uid(PREFIX)
    ds.PatientName = "Fuzz^Patient"
    ds.PatientID = "FUZZ-1"
    ds.StudyDate = "20240501"
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.InstanceNumber = 1
    item = Dataset()
    item.CodeValue = "T-D3000"
    item.CodingSchemeDesignator = "SRT"
    item.CodeMeaning = "Chest"
    ds.AnatomicRegionSequence = [item]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.arange(256, dtype=np.uint8).tobytes()
    return ds


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with 1 to 8 random edits."""
    buffer = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        if not buffer:
            break
        at = draw(st.integers(0, len(buffer) - 1))
        kind = draw(st.sampled_from(["byte", "bit", "insert", "delete", "truncate", "length"]))
        if kind == "byte":
            buffer[at] = draw(st.integers(0, 255))
        elif kind == "bit":
            buffer[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            buffer[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del buffer[at : at + draw(st.integers(1, 16))]
        elif kind == "truncate":
            del buffer[at:]
        else:
            huge = draw(st.sampled_from([0xFFFFFFFF, 0xFFFFFFF0, 0x7FFFFFFF, 0x10000000]))
            buffer[at : at + 4] = huge.to_bytes(4, "little")
    return bytes(buffer)


@dataclass
class Harness:
    """A StorageSCP (not listening) over a spool and SQLite database in ``folder``."""

    folder: Path
    crashes: list[str] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    cases: int = 0

    def __post_init__(self) -> None:
        url = f"sqlite:///{self.folder / 'fuzz.db'}"
        upgrade(url)
        self.engine = make_engine(url)
        self.sessions: sessionmaker[Session] = make_sessionmaker(self.engine)
        config = Settings.model_validate(
            {
                "storage": {"path": str(self.folder / "storage"), "min_free_bytes": 0},
                "node": {"max_instance_bytes": 1 << 20},
            }
        )
        self.scp = StorageSCP(config, self.sessions)
        self.seed = seed_dataset()
        self.encoded = encode(self.seed, False, True)

    def feed(self, data: bytes) -> None:
        """One case: record the status, or the crash and its reason."""
        self.cases += 1
        event = offline_store_event(
            data,
            sop_class_uid=str(self.seed.SOPClassUID),
            sop_instance_uid=str(self.seed.SOPInstanceUID),
            transfer_syntax=ExplicitVRLittleEndian,
        )
        try:
            status = self.scp.store(event)
        except Exception as exc:
            self.crashes.append(f"{type(exc).__name__}: {exc}")
            return
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status not in ALLOWED:
            self.crashes.append(f"status 0x{status:04X}")
        elif status == 0x0000:
            stored = list((self.folder / "storage").rglob("*.dcm"))
            try:
                for path in stored:
                    pydicom.dcmread(path, stop_before_pixels=True)
            except Exception as exc:
                self.crashes.append(f"stored file does not read back: {exc}")

    def close(self) -> None:
        self.engine.dispose()


def run(folder: Path, cases: int) -> Harness:
    """Feed ``cases`` mutated encodings through the handler in ``folder``."""
    harness = Harness(folder)

    @settings(
        max_examples=cases,
        database=None,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(mutated(harness.encoded))
    def case(data: bytes) -> None:
        harness.feed(data)

    try:
        case()
    finally:
        harness.close()
    return harness


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000)
    args = parser.parse_args(argv)
    # The refusals are logged at WARNING; a thousand of them would drown the summary.
    logging.disable(logging.ERROR)
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory(prefix="dicomnode-fuzz-") as folder:
        harness = run(Path(folder), args.cases)
    statuses = ", ".join(f"0x{k:04X}={v}" for k, v in sorted(harness.statuses.items()))
    print(f"cases={harness.cases} crashes={len(harness.crashes)} statuses: {statuses}")
    for crash in harness.crashes[:20]:
        print(f"  crash: {crash}")
    return 1 if harness.crashes else 0


if __name__ == "__main__":
    sys.exit(main())
