"""onnxruntime sessions: a card's ONNX file opened and checked against its card, on the
configured providers with CPU fallback, with thread pools and the execution mode from
``[inference]``; and the verdict on a card's ONNX file that readiness and check-config ask for.
"""

from __future__ import annotations

import functools
import logging
import os

import onnxruntime as ort

from dicomnode.config import InferenceSettings
from dicomnode.models.registry import ModelCard

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
