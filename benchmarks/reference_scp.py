"""A bare pynetdicom Storage SCP: the reference that benchmarks/ingest.py compares with.

It does what any pynetdicom SCP must do and nothing else: accept every storage SOP class
and transfer syntax, and write each received data set's bytes to a file in a folder
without fsync, without parsing, without a database. What dicomnode does on top of this
(limits, validation, durable spool, index rows) is what the benchmark's c/b ratio costs.

Usage: python benchmarks/reference_scp.py --port 11113 --folder /tmp/ref [--max-pdu 0]
Prints ``ready`` once it listens; stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification


def make_ae(ae_title: str, max_pdu: int, max_associations: int) -> AE:
    """An AE accepting every storage SOP class in every transfer syntax."""
    ae = AE(ae_title=ae_title)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    ae.maximum_pdu_size = max_pdu
    ae.maximum_associations = max_associations
    ae.require_called_aet = False
    return ae


def store_handler(folder: Path):
    """A C-STORE handler writing the received bytes (with file meta) to ``folder``."""

    def handle_store(event: evt.Event) -> int:
        name = str(event.request.AffectedSOPInstanceUID)
        with open(folder / f"{name}.dcm", "wb") as handle:
            handle.write(event.encoded_dataset(include_meta=True))
        return 0x0000

    return handle_store


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ae-title", default="REFERENCE")
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument(
        "--max-pdu", type=int, default=0, help="maximum PDU size offered (0 = unlimited)"
    )
    parser.add_argument("--max-associations", type=int, default=64)
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    ae = make_ae(args.ae_title, args.max_pdu, args.max_associations)
    server = ae.start_server(
        (args.host, args.port),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, store_handler(args.folder))],
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print("ready", flush=True)
    stop.wait()
    server.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
