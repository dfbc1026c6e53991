"""Check destinations by C-ECHO (Verification SCU), as ``dicomnode destinations echo`` does."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dicomnode.config import Destination

# What pynetdicom logs when a timeout ended the wait: the TCP connect or TLS handshake
# ("TCP Initialisation Error: timed out"), the association request (ACSE) or the C-ECHO
# response (DIMSE), or no data at all (network).
_TIMED_OUT = ("timed out", "timeout reached")
# pynetdicom's line when the destination accepted the association but none of its contexts.
_NO_CONTEXTS = "No accepted presentation contexts"


@dataclass(frozen=True)
class EchoOutcome:
    """How one destination answered: ``answered`` when its C-ECHO status was Success;
    ``outcome`` the one line that says so (``OK (12 ms)``) or why not."""

    destination: Destination
    answered: bool
    outcome: str


def address(destination: Destination) -> str:
    """``AE@host:port``."""
    return f"{destination.ae_title}@{destination.host}:{destination.port}"


def _timed_out(reason: str, timeout: float) -> str:
    if any(words in reason for words in _TIMED_OUT):
        return f"timed out after {timeout:g} s: {reason}"
    return reason


def echo(
    destination: Destination, calling_ae: str, timeout: float, base_dir: Path | None = None
) -> EchoOutcome:
    """C-ECHO ``destination`` from ``calling_ae`` over the association an export would use
    (its TLS, ``TCP_NODELAY``), waiting at most ``timeout`` seconds for each step, the TCP
    connection included. The time in ``OK (12 ms)`` is the association's and the echo's,
    its release not counted."""
    # Imported here: ``destinations list`` prints with this module's other functions and
    # needs none of pydicom and pynetdicom (~0.2 s a process).
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom.sop_class import Verification

    from dicomnode.export.scu import ContextsNotAccepted, DestinationUnavailable, associate

    started = time.perf_counter()
    contexts = [(Verification, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])]
    try:
        with associate(destination, calling_ae, contexts, timeout, base_dir) as (assoc, lines):
            said = len(lines)
            try:
                status = assoc.send_c_echo()
            except ValueError:  # its Verification presentation context was rejected
                return EchoOutcome(destination, False, "Verification not accepted")
            except RuntimeError:  # the peer aborted the association as it was established
                why = "; ".join(lines[said:]) or "aborted"
                return EchoOutcome(
                    destination, False, f"association ended before the C-ECHO ({why})"
                )
            answered_in = time.perf_counter() - started
            code = getattr(status, "Status", None)
            if code is None:
                why = "; ".join(lines[said:]) or "the association ended"
                return EchoOutcome(
                    destination, False, _timed_out(f"no C-ECHO response ({why})", timeout)
                )
            if code != 0x0000:
                return EchoOutcome(destination, False, f"C-ECHO status 0x{code:04X}")
    except (DestinationUnavailable, ContextsNotAccepted) as exc:
        reason = exc.reason
        if _NO_CONTEXTS in reason:
            reason = "Verification not accepted (no accepted presentation contexts)"
        return EchoOutcome(destination, False, _timed_out(reason, timeout))
    return EchoOutcome(destination, True, f"OK ({answered_in * 1000:.0f} ms)")


def columns(destination: Destination) -> tuple[str, str, str]:
    """The columns that name a destination in both commands' lines: name, ``AE@host:port``,
    TLS or not."""
    return destination.name, address(destination), "TLS" if destination.tls else "no TLS"


def list_columns(destination: Destination) -> tuple[str, ...]:
    """``destinations list``'s columns: :func:`columns`, then its outputs and timeout."""
    return (
        *columns(destination),
        "outputs " + (",".join(destination.outputs) or "all"),
        f"timeout {destination.timeout_seconds:g} s",
    )


def widths(rows: Sequence[Sequence[str]]) -> list[int]:
    """The width of each column of ``rows``: its widest cell."""
    return [max(len(cell) for cell in column) for column in zip(*rows, strict=True)]


def line(cells: Sequence[str], column_widths: Sequence[int]) -> str:
    """``cells`` padded to ``column_widths``, two spaces apart; the last cell not padded."""
    leading = cells[:-1]
    padded = [
        cell.ljust(width)
        for cell, width in zip(leading, column_widths[: len(leading)], strict=True)
    ]
    return "  ".join([*padded, cells[-1]])
