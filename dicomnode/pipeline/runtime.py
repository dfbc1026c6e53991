"""ONNX Runtime: one warm session per model, providers with CPU fallback, batching across
studies.

Concurrent callers of :meth:`Runtime.run` for the same model are coalesced into one
``session.run`` (a micro-batch of at most ``[inference] batch_size`` images, collected for at
most ``max_wait_ms``); each caller gets back exactly its own rows. A caller does not wait
for others that cannot come: when every analysis registered with :meth:`Runtime.caller` is
already waiting on a model, a batch runs at once. Thread counts and the execution mode come
from ``[inference]``; on GPU providers inputs and outputs go through onnxruntime's IO binding.
Sessions are made in :mod:`dicomnode.pipeline.sessions`, batches in
:mod:`dicomnode.pipeline.batching`; this module ties them together.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from dicomnode.config import InferenceSettings
from dicomnode.models.registry import ModelCard
from dicomnode.pipeline.batching import (
    BatchStats,
    MicroBatcher,
    batch_buckets,
    batch_limit,
    non_finite_rows,
    output_specs,
)
from dicomnode.pipeline.sessions import DEVICE_PROVIDERS, cpu_in_flight, load_session

log = logging.getLogger("dicomnode.runtime")


@dataclass
class _Model:
    """A loaded model: its session, how it runs, and its batcher."""

    card: ModelCard
    session: ort.InferenceSession
    provider: str
    io_binding: bool
    # The ONNX file's identity (ModelCard.onnx_identity) when the session was loaded.
    identity: str = ""
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
                # Taken before the file is read: a file replaced while it loads is "changed".
                identity = card.onnx_identity()
                model = self._prepare(card, load_session(card, self.providers, self.settings))
                model.identity = identity
                self._models[key] = model
            return model

    def onnx_identity(self, card: ModelCard) -> str:
        """The identity of the ONNX file the model's warm session was loaded from (what its
        results depend on until :meth:`keep_only` drops it), else of the file now."""
        model = self._models.get(self._key(card))
        return model.identity if model is not None else card.onnx_identity()

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
        """Drop the sessions of models not in ``models`` ((name, version) pairs), and of those
        whose ONNX file changed since it was loaded (replaced under the same card): the next
        use loads the file again."""
        with self._lock:
            for key, model in list(self._models.items()):
                kept = tuple(key.split(":", 1)) in models
                if not kept or model.identity != model.card.onnx_identity():
                    del self._models[key]
                    if kept:
                        log.info(
                            "model %s: its ONNX file changed since it was loaded; it is "
                            "loaded again at its next use",
                            key,
                        )

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
