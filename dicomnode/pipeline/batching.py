"""Micro-batching across callers: concurrent requests for one model coalesced into one run
(a micro-batch of at most ``[inference] batch_size`` images, collected for at most
``max_wait_ms``), each caller given back exactly its own rows; the batch sizes a model runs.
"""

from __future__ import annotations

import copy
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from dicomnode.models.registry import ModelCard
from dicomnode.pipeline.pinned import pin, unpin


def batch_limit(session: ort.InferenceSession, input_name: str, configured: int) -> int:
    """Most images per run: the configured batch size, or the model's fixed batch dimension."""
    shape = next(i.shape for i in session.get_inputs() if i.name == input_name)
    fixed = shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None
    return min(configured, fixed) if fixed else configured


def batch_buckets(limit: int) -> tuple[int, ...]:
    """The batch sizes a GPU model runs: the powers of two below ``limit``, and ``limit``.

    A batch is padded to the next of these sizes, so that the device sees few distinct
    input shapes: the CUDA provider picks its convolution algorithms (cuDNN's exhaustive
    search) once per new shape, which costs more than the run itself. Each size is run once
    when the model is warmed up.
    """
    sizes, size = [], 1
    while size < limit:
        sizes.append(size)
        size *= 2
    return (*sizes, limit)


def _held_lock() -> threading.Lock:
    lock = threading.Lock()
    lock.acquire()
    return lock


@dataclass(eq=False)
class _Request:
    batch: np.ndarray
    outputs: list[np.ndarray] | None = None
    error: BaseException | None = None
    # Held until the outputs are in: the caller blocks acquiring it, the dispatcher releases
    # it (a bare lock wakes one waiter more cheaply than an Event's condition).
    done: threading.Lock = field(default_factory=_held_lock)
    size: int = field(init=False)
    # The next request of the same batch, woken by this one's caller once it is awake.
    then: _Request | None = None

    def __post_init__(self) -> None:
        self.size = int(self.batch.shape[0])

    def result(self) -> list[np.ndarray]:
        self.done.acquire()
        if self.then is not None:
            self.then.done.release()
        if self.error is not None:
            raise self.error
        assert self.outputs is not None
        return self.outputs


@dataclass
class _Batch:
    """Requests collected into one run, and their images joined (or why they could not be)."""

    requests: list[_Request]
    joined: np.ndarray | BaseException


@dataclass
class BatchStats:
    """What a batcher did: model runs, the requests and images they served."""

    runs: int = 0
    requests: int = 0
    images: int = 0
    largest: int = 0


# An output's per-image shape and element type, for a buffer it can be written into.
OutputSpec = tuple[tuple[int, ...], np.dtype]
# onnxruntime's element type names (``tensor(float)``) as numpy types.
_ELEMENT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(bool)": np.bool_,
}


def output_specs(session: ort.InferenceSession, names: list[str]) -> list[OutputSpec] | None:
    """Per-image shape and element type of the named outputs, in that order; None unless
    every one has a batch axis of free size and fixed other axes (buffers can then be made
    for it ahead of the run)."""
    outputs = {o.name: o for o in session.get_outputs()}
    specs: list[OutputSpec] = []
    for name in names:
        output = outputs[name]
        shape = list(output.shape)
        element = _ELEMENT_TYPES.get(output.type)
        if (
            element is None
            or not shape
            or isinstance(shape[0], int)
            or not all(isinstance(d, int) and d > 0 for d in shape[1:])
        ):
            return None
        specs.append((tuple(shape[1:]), np.dtype(element)))
    return specs


class MicroBatcher:
    """Coalesces concurrent requests into one call of ``execute`` along the first axis.

    Dispatcher threads (``in_flight`` of them, started on demand, gone after
    ``IDLE_SECONDS`` without requests) run the batches; callers only queue their request
    and wait on its own lock, so a finished batch wakes exactly its callers. One dispatcher
    at a time collects: the oldest waiting request leads, and the collector waits up to
    ``max_wait`` seconds for requests of the same image shape until ``max_batch`` images are
    queued, or until ``nobody_else()`` says no other request can come. It then hands the
    collecting over, joins the batch, runs it and gives each request its rows of every
    output. A failing run fails every request in it. While a batch runs (onnxruntime
    releases the GIL) the next one queues up; with ``in_flight`` 2 the next one is also
    joined and started (on a GPU: copied to the device) meanwhile.

    A finished batch's callers are woken after a full batch queued behind it has been taken
    and joined (else at once), and in a chain: the dispatcher wakes the first, each caller
    the next. Woken together before the join, they took the GIL and a core from it (on two
    cores the join took 2-3 times as long, and the eight wakes ~100 us more, while
    onnxruntime waited); now they wake while the next batch runs.

    With ``outputs`` (each output's per-image shape and type), each dispatcher also keeps a
    reused buffer per output and ``execute`` writes a batch's outputs into them (its second
    argument); each request then gets a copy of its rows.

    ``faults`` looks at a batch's outputs once, in the dispatcher: None when every row is
    usable, else per row why not (None for a usable row). A request with such a row fails with
    a ValueError saying why; the others in the batch get their outputs. (Checked by each
    caller on its own rows instead, the checks cost several times more: the callers woken by
    a batch contend for the GIL while the next batch runs.)
    """

    IDLE_SECONDS = 30.0

    def __init__(
        self,
        execute: Callable[[np.ndarray, list[np.ndarray] | None], list[np.ndarray]],
        max_batch: int,
        max_wait: float,
        nobody_else: Callable[[], bool] = lambda: False,
        buckets: tuple[int, ...] = (),
        in_flight: int = 1,
        pinned: bool = False,
        outputs: list[OutputSpec] | None = None,
        faults: Callable[[list[np.ndarray], int], list[str | None] | None] | None = None,
    ):
        self.execute = execute
        self.faults = faults
        self.max_batch = max(1, max_batch)
        self.max_wait = max_wait
        self.nobody_else = nobody_else
        self.buckets = buckets
        self.in_flight = max(1, in_flight)
        self.stats = BatchStats()
        # Each dispatcher joins its batches in one buffer of its own, reused: a fresh array
        # of a batch's size each run costs page faults that take longer than a GPU's run.
        # For a GPU the buffer is pinned (page-locked), so that uploads from it are DMA.
        self.pinned = pinned
        self.outputs = outputs
        self._local = threading.local()
        self._cond = threading.Condition()
        self._queue: deque[_Request] = deque()
        self._queued = 0  # images in the queue
        self._dispatchers = 0  # threads alive
        # Held by the one dispatcher that collects the next batch (the others run theirs).
        self._collecting = threading.Lock()

    def submit(self, batch: np.ndarray) -> list[np.ndarray]:
        """Run ``batch`` (N, ...) possibly together with others; returns its N rows per output."""
        request = _Request(batch)
        with self._cond:
            self._queue.append(request)
            self._queued += request.size
            while self._dispatchers < self.in_flight:
                self._dispatchers += 1
                threading.Thread(
                    target=self._dispatch, name="dicomnode-batcher", daemon=True
                ).start()
            # The dispatcher waits for the first request, then for a full batch, for the
            # last caller that can come, or for its deadline: it is woken only for these,
            # not for every request.
            if len(self._queue) == 1 or self._queued >= self.max_batch or self.nobody_else():
                self._cond.notify()
        return request.result()

    @property
    def dispatchers(self) -> int:
        """Dispatcher threads alive now."""
        return self._dispatchers

    def _dispatch(self) -> None:
        batch: _Batch | None = None  # collected and joined, to run next
        while True:
            if batch is None:
                with self._collecting, self._cond:
                    idle_until = time.monotonic() + self.IDLE_SECONDS
                    while not self._queue:
                        remaining = idle_until - time.monotonic()
                        if remaining <= 0:
                            self._dispatchers -= 1
                            self._drop_buffer()
                            return
                        self._cond.wait(remaining)
                    group = self._collect()
                batch = self._joined(group)
            self._run(batch)
            # A full batch already queued is taken and joined before this one's callers are
            # woken, and they are woken in a chain (see the class's docstring).
            finished, batch = batch.requests, self._full_batch()
            for request, following in itertools.pairwise(finished):
                request.then = following
            finished[0].done.release()

    def _full_batch(self) -> _Batch | None:
        """The next batch, joined, if a full one is queued and no other dispatcher is
        collecting; else None (and the requests stay queued)."""
        if not self._collecting.acquire(blocking=False):
            return None
        try:
            with self._cond:
                if self._queued < self.max_batch:
                    return None
                group = self._collect()
        finally:
            self._collecting.release()
        return self._joined(group)

    def _joined(self, group: list[_Request]) -> _Batch:
        try:
            return _Batch(group, self._join(group))
        except BaseException as exc:  # handed to every caller of this batch
            return _Batch(group, exc)

    def _collect(self) -> list[_Request]:
        """The oldest request and those queued behind it of the same shape, up to
        ``max_batch`` images; waits (lock held, released while waiting) for a full batch,
        the oldest request's deadline, or ``nobody_else()``."""
        deadline = time.monotonic() + self.max_wait
        while self._queued < self.max_batch and not self.nobody_else():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._cond.wait(remaining)
        leader = self._queue.popleft()
        group, images = [leader], leader.size
        while self._queue:
            following = self._queue[0]
            if following.batch.shape[1:] != leader.batch.shape[1:]:
                break
            if images + following.size > self.max_batch:
                break
            group.append(self._queue.popleft())
            images += following.size
        self._queued -= images
        return group

    def _join(self, group: list[_Request]) -> np.ndarray:
        """The group's images as one batch, padded with blank images to the next bucket
        size; a lone request that needs no padding runs as it came."""
        first = group[0].batch
        rows = sum(r.size for r in group)
        size = next((b for b in self.buckets if b >= rows), rows)
        if len(group) == 1 and size == rows:
            return first
        buffer = getattr(self._local, "buffer", None)
        if buffer is None or buffer.shape[0] < size or buffer.shape[1:] != first.shape[1:]:
            self._drop_buffer()
            buffer = np.empty((max(size, self.max_batch), *first.shape[1:]), first.dtype)
            self._local.buffer = buffer
            self._local.pinned = self.pinned and pin(buffer)
        np.concatenate([r.batch for r in group], out=buffer[:rows])
        buffer[rows:size] = 0
        return buffer[:size]

    def _output_buffers(self, size: int) -> list[np.ndarray] | None:
        """Where ``execute`` writes the outputs of a batch of ``size`` images: this
        dispatcher's buffers (made, and pinned like the join buffer, on first use)."""
        if self.outputs is None:
            return None
        held = getattr(self._local, "outputs", None)
        if held is None or held[0][0].shape[0] < size:
            self._drop_output_buffers()
            rows = max(size, self.max_batch)
            buffers = [np.empty((rows, *shape), dtype) for shape, dtype in self.outputs]
            held = [(buffer, self.pinned and pin(buffer)) for buffer in buffers]
            self._local.outputs = held
        return [buffer[:size] for buffer, _ in held]

    def _drop_buffer(self) -> None:
        """Let go of this dispatcher's join buffer (unpinned first), and its output buffers."""
        buffer = getattr(self._local, "buffer", None)
        if buffer is not None and self._local.pinned:
            unpin(buffer)
        self._local.buffer = None
        self._drop_output_buffers()

    def _drop_output_buffers(self) -> None:
        for buffer, pinned in getattr(self._local, "outputs", None) or []:
            if pinned:
                unpin(buffer)
        self._local.outputs = None

    def _run(self, batch: _Batch) -> None:
        """Run a joined batch and give each request its outputs or its error (its caller is
        not woken here)."""
        group, joined = batch.requests, batch.joined
        outputs: list[list[np.ndarray]] = []
        error: BaseException | None = None
        faults: list[str | None] | None = None
        try:
            if isinstance(joined, BaseException):
                raise joined
            buffers = self._output_buffers(joined.shape[0])
            values = self.execute(joined, buffers)
            faults = self.faults(values, joined.shape[0]) if self.faults is not None else None
            if joined is group[0].batch and buffers is None:
                outputs.append(values)
            elif any(v.shape[:1] != joined.shape[:1] for v in values):
                raise ValueError("an output has no batch axis; the model cannot be batched")
            else:
                # Rows of reused buffers are copied: the next batch overwrites them.
                start = 0
                for request in group:
                    stop = start + request.size
                    rows = [v[start:stop] for v in values]
                    outputs.append(rows if buffers is None else [r.copy() for r in rows])
                    start = stop
        except BaseException as exc:  # handed to every caller of this batch
            error = exc
        with self._cond:
            self.stats.runs += 1
            self.stats.requests += len(group)
            images = sum(r.size for r in group)
            self.stats.images += images
            self.stats.largest = max(self.stats.largest, images)
        start = 0
        for index, request in enumerate(group):
            fault = None
            if error is None and faults is not None:
                fault = next(filter(None, faults[start : start + request.size]), None)
            start += request.size
            if error is not None:
                request.error = error if index == 0 else _copied(error)
            elif fault is not None:
                request.error = ValueError(fault)
            else:
                request.outputs = outputs[index]

    def wake(self) -> None:
        """Let a collecting dispatcher look again whether anybody else may still come.

        With nothing queued no dispatcher is collecting, and nothing is done: the queue is
        read without the lock, and a request queued after this look is looked at by its own
        submission, which sees the waiting counted before this call. (Every analysis calls
        this for every other model's batcher each time it waits on one.)
        """
        if not self._queue:
            return
        with self._cond:
            self._cond.notify_all()


def non_finite_rows(
    card: ModelCard, values: list[np.ndarray], rows: int
) -> list[str | None] | None:
    """Per row of a batch of ``rows`` images, why its outputs (in card order) are unusable:
    NaN or infinity in one; None when every row is usable (one pass over each output)."""
    faults: list[str | None] | None = None
    for spec, value in zip(card.outputs, values, strict=True):
        finite = np.isfinite(value)
        if finite.all():
            continue
        bad = (
            ~finite.reshape(rows, -1).all(axis=1)
            if value.ndim and value.shape[0] == rows
            else np.ones(rows, bool)  # no batch axis: every row is suspect
        )
        faults = faults or [None] * rows
        for row in np.flatnonzero(bad):
            faults[row] = faults[row] or (
                f"{card.model.name}: output {spec.name!r} contains NaN or infinity"
            )
    return faults


def _copied(error: BaseException) -> BaseException:
    """A copy of ``error`` for another thread to raise (tracebacks are per raise)."""
    try:
        return copy.copy(error)
    except Exception:
        return error
