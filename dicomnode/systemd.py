"""sd_notify over ``NOTIFY_SOCKET`` (READY, WATCHDOG, RELOADING, STOPPING); no-op elsewhere."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

log = logging.getLogger("dicomnode.systemd")


class Notifier:
    """Sends state lines to the service manager's datagram socket, if there is one."""

    def __init__(self, address: str | None = None):
        address = os.environ.get("NOTIFY_SOCKET", "") if address is None else address
        # A leading "@" names a socket in the abstract namespace.
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        if self.address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def notify(self, state: str) -> bool:
        """Send one state message (e.g. ``READY=1``); False when not under systemd or on error."""
        if self._socket is None:
            return False
        try:
            self._socket.sendto(state.encode(), self.address)
            return True
        except OSError as exc:
            log.warning("sd_notify %s failed: %s", state.split("=")[0], exc)
            return False

    def reloading(self) -> None:
        """Tell systemd a reload started (it waits for the next READY=1)."""
        self.notify(
            f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
        )


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when not asked for."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) <= 0 or (pid.isdigit() and int(pid) != os.getpid()):
        return None
    return int(usec) / 2_000_000


def run_watchdog(notifier: Notifier, stop: threading.Event, healthy=lambda: True) -> None:
    """Ping the watchdog every WATCHDOG_USEC/2 while ``healthy()`` holds and until ``stop``."""
    interval = watchdog_interval()
    if interval is None or not notifier.enabled:
        return
    while not stop.wait(interval):
        if healthy():
            notifier.notify("WATCHDOG=1")
        else:
            log.error("health check failed; withholding the systemd watchdog ping")
