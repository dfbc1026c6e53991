"""ONNX Runtime sessions: one warm session per model, providers with CPU fallback."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import onnxruntime as ort

from dicomnode.models.registry import ModelCard

log = logging.getLogger("dicomnode.runtime")


class ModelLoadError(Exception):
    """The ONNX file is missing, corrupt, or does not match its card."""


def usable_providers(wanted: list[str]) -> list[str]:
    """The configured providers this onnxruntime build has, in order, always ending in CPU."""
    available = set(ort.get_available_providers())
    chosen = [p for p in wanted if p in available]
    missing = [p for p in wanted if p not in available]
    if missing:
        log.warning("execution providers not available in this onnxruntime: %s", missing)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def load_session(card: ModelCard, providers: list[str]) -> ort.InferenceSession:
    """Open the card's ONNX file and check its input against the card."""
    path = card.onnx_path
    if not path.is_file():
        raise ModelLoadError(f"{card.model.name}: ONNX file {path} does not exist")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(
            str(path), sess_options=options, providers=usable_providers(providers)
        )
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelLoadError(f"{card.model.name}: cannot load {path}: {exc}") from exc
    inputs = {i.name: i for i in session.get_inputs()}
    if card.input.name not in inputs:
        raise ModelLoadError(
            f"{card.model.name}: {path} has no input {card.input.name!r} (has {sorted(inputs)})"
        )
    declared = list(inputs[card.input.name].shape[1:])
    expected = list(card.input.shape)
    if any(isinstance(d, int) and d != e for d, e in zip(declared, expected, strict=False)) or len(
        declared
    ) != len(expected):
        raise ModelLoadError(
            f"{card.model.name}: input {card.input.name!r} of {path} has shape {declared}, "
            f"the card says {expected}"
        )
    outputs = {o.name for o in session.get_outputs()}
    for spec in card.outputs:
        if spec.name not in outputs:
            raise ModelLoadError(
                f"{card.model.name}: {path} has no output {spec.name!r} (has {sorted(outputs)})"
            )
    log.info(
        "model %s %s loaded, running on %s",
        card.model.name,
        card.model.version,
        session.get_providers()[0],
    )
    return session


class Runtime:
    """Warm sessions keyed by model name, created on first use."""

    def __init__(self, providers: list[str]):
        self.providers = providers
        self._sessions: dict[str, ort.InferenceSession] = {}
        self._lock = threading.Lock()

    def session(self, card: ModelCard) -> ort.InferenceSession:
        key = f"{card.model.name}:{card.model.version}"
        with self._lock:
            if key not in self._sessions:
                self._sessions[key] = load_session(card, self.providers)
            return self._sessions[key]

    def keep_only(self, models: set[tuple[str, str]]) -> None:
        """Drop the sessions of models not in ``models`` ((name, version) pairs)."""
        with self._lock:
            for key in list(self._sessions):
                if tuple(key.split(":", 1)) not in models:
                    del self._sessions[key]

    def run(self, card: ModelCard, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run a (N, C, H, W) float32 batch; returns the card's outputs by name."""
        from dicomnode.metrics import INFERENCE_SECONDS

        session = self.session(card)
        names = [spec.name for spec in card.outputs]
        started = time.perf_counter()
        values = session.run(names, {card.input.name: batch.astype(np.float32, copy=False)})
        INFERENCE_SECONDS.labels(card.model.name, session.get_providers()[0]).observe(
            time.perf_counter() - started
        )
        outputs = dict(zip(names, values, strict=True))
        for name, value in outputs.items():
            if not np.all(np.isfinite(value)):
                raise ValueError(f"{card.model.name}: output {name!r} contains NaN or infinity")
        return outputs
