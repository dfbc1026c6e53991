"""Analyses kept in memory for their results job, so that it need not run the models again.

The analyse job commits a study's priority and queues a ``results`` job; the same worker
process usually claims that job soon after, and takes the study's decoded images and model
runs from here. Nothing depends on it: a results job that finds nothing (another process, a
restart, a retry, an entry left out for memory) loads the images and runs the models itself.
The entries hold large arrays (decoded pixels, presentation pixels, model outputs behind
deferred heat maps), so their estimated size is bounded.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import numpy as np

log = logging.getLogger("dicomnode.pipeline")


def array_bytes(value: Any, seen: set[int] | None = None) -> int:
    """Bytes of the numpy arrays reachable from ``value`` through the containers the model
    runs use (lists, tuples, dicts, dataclasses, partials, pydicom datasets' pixel data);
    each buffer counted once."""
    seen = set() if seen is None else seen
    if value is None or isinstance(value, (str, int, float, bool)):
        return 0
    if isinstance(value, np.ndarray):
        base = value
        while isinstance(base.base, np.ndarray):
            base = base.base
        if id(base) in seen:
            return 0
        seen.add(id(base))
        return int(base.nbytes)
    if id(value) in seen:
        return 0
    seen.add(id(value))
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if hasattr(value, "PixelData") and hasattr(value, "file_meta"):  # a pydicom Dataset
        pixel_data = value.get("PixelData")
        cached = getattr(value, "_pixel_array", None)
        return (len(pixel_data) if pixel_data else 0) + array_bytes(cached, seen)
    if isinstance(value, dict):
        return sum(array_bytes(v, seen) for v in value.values())
    if isinstance(value, (list, tuple, set, frozenset)):
        return sum(array_bytes(v, seen) for v in value)
    if isinstance(value, partial):
        return array_bytes(value.args, seen) + array_bytes(value.keywords, seen)
    if hasattr(value, "__dict__"):
        return array_bytes(vars(value), seen)
    return 0


class Handover:
    """Bounded in-process store of analyses waiting for their results job, keyed by its id.

    Thread-safe. When a new entry does not fit in ``max_bytes``, the entries whose jobs are
    no longer waiting (``still_queued`` says which are) are dropped first; if it still does not
    fit, it is not kept (its results job will recompute).
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: dict[int, tuple[Any, int]] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def put(
        self,
        job_id: int,
        analysis: Any,
        nbytes: int,
        still_queued: Callable[[Iterable[int]], set[int]] | None = None,
    ) -> bool:
        """Keep ``analysis`` (estimated ``nbytes``) for results job ``job_id``; False if it
        does not fit."""
        if nbytes > self.max_bytes:
            log.info("results job %d: analysis of %.0f MB not kept", job_id, nbytes / 1e6)
            return False
        with self._lock:
            if self._bytes + nbytes > self.max_bytes and still_queued is not None:
                waiting = still_queued(list(self._entries))
                for stale in [key for key in self._entries if key not in waiting]:
                    self._bytes -= self._entries.pop(stale)[1]
            if self._bytes + nbytes > self.max_bytes:
                log.info(
                    "results job %d: analysis of %.0f MB not kept (%d kept, %.0f of %.0f MB)",
                    job_id,
                    nbytes / 1e6,
                    len(self._entries),
                    self._bytes / 1e6,
                    self.max_bytes / 1e6,
                )
                return False
            self._entries[job_id] = (analysis, nbytes)
            self._bytes += nbytes
            return True

    def take(self, job_id: int) -> Any | None:
        """The analysis kept for ``job_id``, removed from the store; None if there is none."""
        with self._lock:
            entry = self._entries.pop(job_id, None)
            if entry is None:
                return None
            self._bytes -= entry[1]
            return entry[0]

    def discard(self, job_id: int) -> None:
        self.take(job_id)
