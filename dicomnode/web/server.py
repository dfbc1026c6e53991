"""uvicorn's server for serve's web page and API, woken when told to stop rather than ten times
a second.

uvicorn's ``Server.main_loop`` sleeps 0.1 s at a time to see whether ``should_exit`` has been
set (by its signal handler, or by serve's threads), and updates the Date header every tenth
time: ten wake-ups a second of an idle node's serve process, most of what it did idle. Here
setting ``should_exit`` wakes the loop, which otherwise sleeps a second, the Date header's
resolution. The rest of uvicorn is used as it is; tests/test_serve_idle.py pins the
``main_loop`` this replaces.
"""

from __future__ import annotations

import asyncio
import contextlib

import uvicorn

# The Date header is to the second: uvicorn updates it once a second too.
TICK_SECONDS = 1.0


class WebServer(uvicorn.Server):
    """:class:`uvicorn.Server` whose main loop waits for ``should_exit``, not polls it."""

    def __init__(self, config: uvicorn.Config) -> None:
        self._should_exit = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._exit_requested: asyncio.Event | None = None
        super().__init__(config)

    @property
    def should_exit(self) -> bool:  # type: ignore[override]
        return self._should_exit

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        # Set from any thread (serve's) or from uvicorn's signal handler (the main thread).
        self._should_exit = value
        loop, requested = self._loop, self._exit_requested
        if value and loop is not None and requested is not None:
            # RuntimeError: the loop has closed (main_loop has returned).
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(requested.set)

    async def main_loop(self) -> None:
        """uvicorn's ``main_loop``: ``on_tick`` once a second (the Date header) and at once
        when ``should_exit`` is set, until it returns True."""
        self._exit_requested = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        try:
            # Counter 0: on_tick updates the Date header on every tenth count.
            while not await self.on_tick(0):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(TICK_SECONDS):
                        await self._exit_requested.wait()
                # Set back to False meanwhile (nothing does today): wait again, not spin.
                self._exit_requested.clear()
        finally:
            self._loop = None
