"""ONNX Runtime: one warm session per model, providers with CPU fallback, batching across
studies.

Concurrent callers of :meth:`Runtime.run` for the same model are coalesced into one
``session.run`` (a micro-batch of at most ``[inference] batch_size`` images, collected for at
most ``max_wait_ms``); each caller gets back exactly its own rows. A caller does not wait
for others that cannot come: when every analysis registered with :meth:`Runtime.caller` is
already waiting on a model, a batch runs at once. Thread counts and the execution mode come
from ``[inference]``; on GPU providers inputs and outputs go through onnxruntime's IO binding.
"""

from __future__ import annotations

import copy
import functools
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from dicomnode.config import InferenceSettings
from dicomnode.models.registry import ModelCard
from dicomnode.pipeline.pinned import pin, unpin

log = logging.getLogger("dicomnode.runtime")

# Set by ``dicomnode serve`` for the worker processes it starts: how many share the host's cores.
WORKERS_ON_HOST = "DICOMNODE_WORKERS_ON_HOST"

# Providers whose memory is not the host's: IO binding saves copies there.
DEVICE_PROVIDERS = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}
EXECUTION_MODES = {
    "sequential": ort.ExecutionMode.ORT_SEQUENTIAL,
    "parallel": ort.ExecutionMode.ORT_PARALLEL,
}


class ModelLoadError(Exception):
    """The ONNX file is missing, corrupt, or does not match its card. ``model``: the card's
    model name, so that a worker can leave that model out and run the others."""

    def __init__(self, message: str, model: str = ""):
        super().__init__(message)
        self.model = model


@functools.cache
def _preload_cuda_libraries() -> None:
    """Load CUDA and cuDNN from NVIDIA's pip packages (onnxruntime-gpu's ``cuda``/``cudnn``
    extras), where they are installed; system-wide libraries are found without this."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception as exc:  # a missing package only means the system's libraries are used
        log.info("no CUDA libraries preloaded from pip packages: %s", exc)


def usable_providers(wanted: list[str]) -> list[str]:
    """The configured providers this onnxruntime build has, in order, always ending in CPU."""
    available = set(ort.get_available_providers())
    chosen = [p for p in wanted if p in available]
    if any(p in DEVICE_PROVIDERS for p in chosen):
        _preload_cuda_libraries()
    missing = [p for p in wanted if p not in available]
    if missing:
        log.warning("execution providers not available in this onnxruntime: %s", missing)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def cpu_cores() -> int:
    """Cores this process may use: its CPU affinity and, in a container, the container's CPU
    quota rounded up (loky reads both; a systemd unit's ``CPUQuota=`` is not seen), shared
    with the other worker processes ``dicomnode serve`` started on this host."""
    from loky.backend.context import cpu_count  # 70 ms to import: only where runs are sized

    siblings = int(os.environ.get(WORKERS_ON_HOST, "1") or 1)
    return max(1, cpu_count() // max(1, siblings))


def intra_op_threads(settings: InferenceSettings, on_cpu: bool) -> int:
    """Threads of one run: ``[inference] intra_op_threads``, or when 0 one on the CPU (a run
    per core at once, see ``cpu_in_flight``) and onnxruntime's default on a device."""
    return settings.intra_op_threads or (1 if on_cpu else 0)


def cpu_in_flight(settings: InferenceSettings) -> int:
    """Batches of a model run at once on the CPU when ``in_flight`` is 0: as many as the cores
    hold runs of ``intra_op_threads`` threads. One thread per run, a run per core, gives the
    small demo models 5-45 % more images per second than one run on every core (whose
    parallel sections wait for the slowest thread), and far more when other work takes a core
    (benchmarks/README.md, Inference)."""
    return max(1, cpu_cores() // intra_op_threads(settings, on_cpu=True))


def session_options(settings: InferenceSettings, on_cpu: bool = True) -> ort.SessionOptions:
    """Session options from ``[inference]``: thread pools and execution mode."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = intra_op_threads(settings, on_cpu)
    options.inter_op_num_threads = settings.inter_op_threads
    options.execution_mode = EXECUTION_MODES[settings.execution_mode]
    return options


def load_session(
    card: ModelCard,
    providers: list[str],
    settings: InferenceSettings | None = None,
    *,
    log_level: int = logging.INFO,
) -> ort.InferenceSession:
    """Open the card's ONNX file and check its input against the card; ``log_level`` of the
    "loaded, running on" line (DEBUG for a load that only checks the file)."""
    settings = settings or InferenceSettings()
    path = card.onnx_path
    if not path.is_file():
        raise ModelLoadError(f"{card.model.name}: ONNX file {path} does not exist", card.model.name)
    usable = usable_providers(providers)
    on_cpu = usable[0] == "CPUExecutionProvider"
    try:
        session = ort.InferenceSession(
            str(path), sess_options=session_options(settings, on_cpu), providers=usable
        )
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelLoadError(
            f"{card.model.name}: cannot load {path}: {exc}", card.model.name
        ) from exc
    inputs = {i.name: i for i in session.get_inputs()}
    if card.input.name not in inputs:
        raise ModelLoadError(
            f"{card.model.name}: {path} has no input {card.input.name!r} (has {sorted(inputs)})",
            card.model.name,
        )
    declared = list(inputs[card.input.name].shape[1:])
    expected = list(card.input.shape)
    if any(isinstance(d, int) and d != e for d, e in zip(declared, expected, strict=False)) or len(
        declared
    ) != len(expected):
        raise ModelLoadError(
            f"{card.model.name}: input {card.input.name!r} of {path} has shape {declared}, "
            f"the card says {expected}",
            card.model.name,
        )
    outputs = {o.name for o in session.get_outputs()}
    for spec in card.outputs:
        if spec.name not in outputs:
            raise ModelLoadError(
                f"{card.model.name}: {path} has no output {spec.name!r} (has {sorted(outputs)})",
                card.model.name,
            )
    running = session.get_providers()
    log.log(
        log_level,
        "model %s %s loaded, running on %s (configured %s; intra-op threads %s, inter-op %s, %s)",
        card.model.name,
        card.model.version,
        running[0],
        ", ".join(providers),
        intra_op_threads(settings, on_cpu) or "auto",
        settings.inter_op_threads or "auto",
        settings.execution_mode,
    )
    if providers and running[0] != providers[0]:
        log.warning(
            "model %s: %s is not used; it runs on %s", card.model.name, providers[0], running[0]
        )
    return session


# Verdicts of onnx_problem by the state of the files they judged (path, mtime, size).
_VERDICTS: dict[tuple[object, ...], str] = {}


def onnx_problem(card: ModelCard) -> str:
    """Why the card's ONNX file cannot run ('' when it loads on the CPU and matches the
    card): missing, truncated, corrupt, or another model's. Judged once per state of the
    card and ONNX files, so that a readiness probe can ask every time."""
    files = [card.onnx_path, *([card.card_path] if card.card_path else [])]
    try:
        key = tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    except OSError:
        return f"ONNX file {card.onnx_path} does not exist"
    if key not in _VERDICTS:
        try:
            # Only a check (readiness, check-config, a reload's validation): the line that
            # says a model was loaded and where it runs is the worker's own load's, at INFO;
            # this one at INFO read as if every model were reloaded on the CPU.
            load_session(card, ["CPUExecutionProvider"], log_level=logging.DEBUG)
            _VERDICTS[key] = ""
        except ModelLoadError as exc:
            _VERDICTS[key] = str(exc)
    return _VERDICTS[key]


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


@dataclass
class _Model:
    """A loaded model: its session, how it runs, and its batcher."""

    card: ModelCard
    session: ort.InferenceSession
    provider: str
    io_binding: bool
    batcher: MicroBatcher = field(init=False)
    names: list[str] = field(init=False)  # the card's outputs, in order
    # Records a run's seconds in dicomnode_inference_seconds{model,provider} (the labelled
    # child looked up once, not per run).
    observe: Callable[[float], None] = field(init=False)

    def __post_init__(self) -> None:
        self.names = [spec.name for spec in self.card.outputs]


class Runtime:
    """Warm sessions keyed by model name and version, created on first use, shared by the
    worker's threads; :meth:`run` batches their concurrent requests."""

    def __init__(self, providers: list[str], settings: InferenceSettings | None = None):
        self.providers = providers
        self.settings = settings or InferenceSettings()
        self._models: dict[str, _Model] = {}
        self._lock = threading.Lock()
        # Analyses in progress (registered by the worker), and how many of their threads wait
        # in a batcher now: when all of them do, no other request can come and nobody waits.
        self._callers = 0
        self._waiting = 0
        self._count_lock = threading.Lock()

    @contextmanager
    def caller(self) -> Iterator[None]:
        """Register an analysis that may call :meth:`run` (a worker's job thread)."""
        with self._count_lock:
            self._callers += 1
        try:
            yield
        finally:
            with self._count_lock:
                self._callers -= 1
            self._wake_all()

    def _nobody_else(self) -> bool:
        # Without registered callers (benchmarks, tests) nothing is known: wait as configured.
        return self._callers > 0 and self._waiting >= self._callers

    def _wake_all(self, but: MicroBatcher | None = None) -> None:
        with self._lock:
            batchers = [model.batcher for model in self._models.values()]
        for batcher in batchers:
            if batcher is not but:
                batcher.wake()

    @staticmethod
    def _key(card: ModelCard) -> str:
        return f"{card.model.name}:{card.model.version}"

    def session(self, card: ModelCard) -> ort.InferenceSession:
        """The model's warm session (loaded now if it is not yet)."""
        return self._model(card).session

    def _model(self, card: ModelCard) -> _Model:
        key = self._key(card)
        model = self._models.get(key)  # the common case, without taking the lock
        if model is not None:
            return model
        with self._lock:
            model = self._models.get(key)
            if model is None:
                model = self._prepare(card, load_session(card, self.providers, self.settings))
                self._models[key] = model
            return model

    def _prepare(self, card: ModelCard, session: ort.InferenceSession) -> _Model:
        provider = session.get_providers()[0]
        on_device = provider in DEVICE_PROVIDERS
        wanted = self.settings.io_binding
        binding = wanted == "on" or (wanted == "auto" and on_device)
        limit = batch_limit(session, card.input.name, self.settings.batch_size)
        buckets = batch_buckets(limit) if on_device else ()
        in_flight = self.settings.in_flight or (2 if on_device else cpu_in_flight(self.settings))
        model = _Model(card, session, provider, binding)
        # Imported here, not at the top: serve sets the metrics' multiprocess folder first.
        from dicomnode.metrics import INFERENCE_SECONDS

        model.observe = INFERENCE_SECONDS.labels(card.model.name, provider).observe
        bound_outputs = binding and self.settings.bound_outputs == "auto"
        names = [spec.name for spec in card.outputs]
        model.batcher = MicroBatcher(
            lambda batch, out: self._execute(model, batch, out),
            limit,
            self.settings.max_wait_ms / 1000,
            self._nobody_else,
            buckets,
            in_flight,
            pinned=on_device and self.settings.pinned_buffers == "auto",
            outputs=output_specs(session, names) if bound_outputs else None,
            faults=functools.partial(non_finite_rows, card),
        )
        return model

    def stats(self, card: ModelCard) -> BatchStats:
        """How the model's batcher has run so far."""
        return self._model(card).batcher.stats

    def in_flight(self, card: ModelCard) -> int:
        """Batches of the model run at once (``[inference] in_flight`` resolved)."""
        return self._model(card).batcher.in_flight

    def keep_only(self, models: set[tuple[str, str]]) -> None:
        """Drop the sessions of models not in ``models`` ((name, version) pairs)."""
        with self._lock:
            for key in list(self._models):
                if tuple(key.split(":", 1)) not in models:
                    del self._models[key]

    def _execute(
        self, model: _Model, batch: np.ndarray, out: list[np.ndarray] | None = None
    ) -> list[np.ndarray]:
        """One ``session.run`` (or IO-bound run) of a whole batch; outputs in card order,
        written into ``out`` where given (IO binding only)."""
        started = time.perf_counter()
        if model.io_binding:
            values = self._execute_bound(model, batch, model.names, out)
        else:
            values = model.session.run(model.names, {model.card.input.name: batch})
        model.observe(time.perf_counter() - started)
        return values

    @staticmethod
    def _execute_bound(
        model: _Model, batch: np.ndarray, names: list[str], out: list[np.ndarray] | None
    ) -> list[np.ndarray]:
        """A run through IO binding: the input is bound where it lies (the batch's host
        memory, pinned for a GPU; onnxruntime uploads it inside the run, without the GIL).
        Outputs are written into ``out`` (host buffers, pinned for a GPU: onnxruntime copies
        them back inside the run), or else allocated on the device and copied back after."""
        device = DEVICE_PROVIDERS.get(model.provider, "cpu")
        batch = np.ascontiguousarray(batch)
        binding = model.session.io_binding()
        binding.bind_input(
            model.card.input.name, "cpu", 0, batch.dtype, list(batch.shape), batch.ctypes.data
        )
        if out is not None:
            for name, buffer in zip(names, out, strict=True):
                binding.bind_output(
                    name, "cpu", 0, buffer.dtype, list(buffer.shape), buffer.ctypes.data
                )
            model.session.run_with_iobinding(binding)
            return out
        for name in names:
            binding.bind_output(name, device)
        model.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def warm_up(self, card: ModelCard) -> None:
        """Load the model and run a blank batch of every size it will run (one size on the
        CPU), so that no study pays for a first run."""
        model = self._model(card)
        for size in model.batcher.buckets or (1,):
            blank = np.zeros((size, *card.input.shape), np.float32)
            specs = model.batcher.outputs
            if specs is None:
                self._execute(model, blank)
                continue
            # The way studies will run: outputs written into host buffers. Should the provider
            # refuse that, its outputs are copied back after each run instead.
            try:
                self._execute(model, blank, [np.empty((size, *s), t) for s, t in specs])
            except Exception as exc:  # onnxruntime raises its own exception types
                self._execute(model, blank)
                model.batcher.outputs = None
                log.warning(
                    "model %s: %s does not write outputs into host buffers (%s); they are "
                    "copied back after each run",
                    card.model.name,
                    model.provider,
                    exc,
                )

    def run(self, card: ModelCard, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run a (N, C, H, W) batch; returns the card's outputs by name, N rows each."""
        model = self._model(card)
        array = np.ascontiguousarray(batch, dtype=np.float32)
        # Only registered analyses are counted (a registered caller sees its own registration).
        counted = self._callers > 0
        if counted:
            with self._count_lock:
                self._waiting += 1
            if self._callers > 1:
                # Other models' dispatchers may stop waiting for this caller now; this model's
                # is woken by the submission itself, once the request is in its queue.
                self._wake_all(but=model.batcher)
        try:
            values = model.batcher.submit(array)
        finally:
            if counted:
                with self._count_lock:
                    self._waiting -= 1
        return dict(zip(model.names, values, strict=True))
