"""Helpers shared by every demo training script, CXR and CT alike.

The scripts' own choices (data, networks, losses, metrics, card text) stay in the scripts and in
``cxr_common`` / ``ct_common``; this module holds what is the same for all of them:

- the common command-line options (``training_parser``) and the start of a run (``start_run``:
  deterministic torch, the output folder);
- training: the AdamW one-cycle optimiser and its step (``adamw_one_cycle``, ``optimise``), the
  epoch loop (``fit``) and the best epoch's weights (``BestEpoch``);
- data and inference: the DICOM write/read round trip of a phantom (``round_trip``), batched
  torch and onnxruntime inference (``predict``, ``onnx_outputs``);
- export: ONNX with a dynamic batch (``export_onnx``), the ONNX/torch agreement check
  (``require_agreement``), the single-thread latency (``onnx_latency_ms``);
- cards: ``write_card``, ``label_table``, ``run_entries`` and ``print_summary``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pydicom
import torch
from torch import nn

from dicomnode.models.registry import load_card

# --- command line ----------------------------------------------------------------------------


def training_parser(
    doc: str,
    *,
    n_train: int,
    n_validation: int,
    n_heldout: int,
    epochs: int,
    batch: int,
    out_help: str = "folder for ONNX + card",
    n_train_help: str | None = None,
    per_epoch: tuple[str, int, str] | None = None,
) -> argparse.ArgumentParser:
    """The options every training script has, with the script's defaults, in this order:
    ``--out``, ``--n-train``, ``--n-validation``, ``--n-heldout``, ``--epochs``, the optional
    ``per_epoch`` option (flag, integer default, help), ``--batch``, ``--workers``.

    The description is the first line of ``doc`` (the script's docstring); the script adds its
    own further options before parsing.
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models"), help=out_help)
    parser.add_argument("--n-train", type=int, default=n_train, help=n_train_help)
    parser.add_argument("--n-validation", type=int, default=n_validation)
    parser.add_argument("--n-heldout", type=int, default=n_heldout)
    parser.add_argument("--epochs", type=int, default=epochs)
    if per_epoch is not None:
        flag, default, text = per_epoch
        parser.add_argument(flag, type=int, default=default, help=text)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--workers", type=int, default=2, help="phantom generator processes")
    return parser


# --- data ------------------------------------------------------------------------------------


def round_trip(ds: pydicom.Dataset) -> pydicom.Dataset:
    """The dataset as the node reads it: written to DICOM bytes and parsed again."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


# --- training --------------------------------------------------------------------------------


def set_deterministic(seed: int = 0, threads: int = 2) -> None:
    """Seeded, deterministic torch on ``threads`` threads."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)


def start_run(out: Path) -> float:
    """Start a training run: deterministic torch (seed 0, 2 threads) and the output folder
    ``out`` created. Returns the run's start (``time.monotonic``)."""
    started = time.monotonic()
    set_deterministic(0)
    out.mkdir(parents=True, exist_ok=True)
    return started


def adamw_one_cycle(
    parameters: Iterable[nn.Parameter], lr: float, total_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.OneCycleLR]:
    """AdamW (weight decay 1e-4) with a one-cycle schedule peaking at ``lr`` over
    ``total_steps`` optimiser steps."""
    optimiser = torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=total_steps)
    return optimiser, schedule


def optimise(
    optimiser: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    loss: torch.Tensor,
) -> None:
    """One optimiser step on ``loss`` and one step of the schedule."""
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
    schedule.step()


class BestEpoch:
    """The weights of the epoch with the best validation score seen so far.

    Scores are compared with ``>`` (a tuple such as (score, -loss) breaks ties); the first
    epoch must beat ``initial``. With ``keep_ties`` a later epoch with an equal score replaces
    the earlier one.
    """

    def __init__(self, initial: Any = -math.inf, keep_ties: bool = False) -> None:
        self.score: Any = initial
        self.epoch = 0
        self.keep_ties = keep_ties
        self.state: dict[str, torch.Tensor] | None = None

    def offer(self, net: nn.Module, epoch: int, score: Any) -> None:
        """Keep a detached copy of ``net``'s weights when ``score`` is the best so far."""
        if score > self.score or (self.keep_ties and score == self.score):
            self.score, self.epoch = score, epoch
            self.state = {k: v.detach().clone() for k, v in net.state_dict().items()}

    def restore(self, net: nn.Module) -> None:
        """Load the best epoch's weights back into ``net``."""
        assert self.state is not None, "no epoch was kept"
        net.load_state_dict(self.state)


def fit(
    net: nn.Module,
    epochs: int,
    train_epoch: Callable[[], float],
    validate: Callable[[], tuple[Any, str]],
    best: BestEpoch,
    loss_format: str = ".4f",
) -> BestEpoch:
    """The epoch loop every script shares: ``net`` in training mode, ``train_epoch()`` (one
    pass of the script's own batches; returns the mean training loss), ``validate()`` (returns
    the score ``best`` compares and the validation part of the epoch's line), a printed line
    "epoch e/E loss L <validation> (s s)", ``best.offer``; the best epoch's weights are loaded
    back at the end. Returns ``best``."""
    for epoch in range(1, epochs + 1):
        net.train()
        started = time.monotonic()
        loss = train_epoch()
        score, report = validate()
        print(
            f"epoch {epoch}/{epochs} loss {loss:{loss_format}} {report} "
            f"({time.monotonic() - started:.0f} s)",
            flush=True,
        )
        best.offer(net, epoch, score)
    best.restore(net)
    return best


# --- inference and export ----------------------------------------------------------------------


def as_float32(images: np.ndarray) -> np.ndarray:
    """Stored (e.g. float16) model inputs as float32."""
    return images.astype(np.float32)


def predict(
    module: nn.Module,
    images: np.ndarray,
    batch: int,
    prepare: Callable[[np.ndarray], np.ndarray] = as_float32,
) -> np.ndarray:
    """The module's output over ``images`` in eval mode without gradients, ``batch`` images
    at a time; ``prepare`` turns stored images into the float32 model input."""
    module.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            out.append(module(torch.from_numpy(prepare(images[start : start + batch]))).numpy())
    return np.concatenate(out)


def onnx_outputs(
    model: Path | onnxruntime.InferenceSession,
    images: np.ndarray,
    batch: int,
    names: Sequence[str] | None = None,
    prepare: Callable[[np.ndarray], np.ndarray] = as_float32,
    input_name: str = "image",
) -> list[np.ndarray]:
    """The named outputs (all when ``names`` is None) of an ONNX file (run by onnxruntime on
    the CPU) or session over ``images``, ``batch`` images at a time; ``prepare`` turns stored
    images into the float32 model input."""
    session = model
    if not isinstance(session, onnxruntime.InferenceSession):
        session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    parts: list[list[np.ndarray]] = []
    for start in range(0, len(images), batch):
        chunk = prepare(images[start : start + batch])
        values = session.run(None if names is None else list(names), {input_name: chunk})
        parts = parts or [[] for _ in values]
        for part, value in zip(parts, values, strict=True):
            part.append(value)
    return [np.concatenate(part) for part in parts]


def export_onnx(
    module: nn.Module,
    path: Path,
    input_shape: Sequence[int],
    output_names: Sequence[str],
    input_name: str = "image",
    ignore: type[Warning] = Warning,
) -> None:
    """ONNX opset 17 of ``module`` (put in eval mode) with one input [N, *input_shape] and a
    dynamic batch dimension on the input and every output; warnings of category ``ignore`` are
    silenced during the export."""
    module.eval()
    dummy = torch.zeros(1, *input_shape)
    axes = {name: {0: "batch"} for name in (input_name, *output_names)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ignore)
        torch.onnx.export(
            module,
            (dummy,),
            str(path),
            input_names=[input_name],
            output_names=list(output_names),
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )


def require_agreement(difference: float, message: str, tolerance: float = 1e-4) -> None:
    """Stop the run (``SystemExit``: "{message} by {difference}") when the ONNX file and the
    torch network differ by more than ``tolerance``."""
    if difference > tolerance:
        raise SystemExit(f"{message} by {difference:.2e}")


def onnx_latency_ms(
    path: Path, image: np.ndarray, *, runs: int, warmups: int, input_name: str | None = None
) -> float:
    """Median milliseconds (2 decimals) of one onnxruntime run on ``image`` (a batch of one) on
    one CPU thread, after ``warmups`` untimed runs. ``input_name`` defaults to the graph's first
    input."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = input_name or session.get_inputs()[0].name
    for _ in range(warmups):
        session.run(None, {name: image})
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, {name: image})
        times.append(time.perf_counter() - started)
    return round(1000 * float(np.median(times)), 2)


# --- cards -----------------------------------------------------------------------------------


def toml_value(value: object, quote_nonfinite: bool = True) -> str:
    """A scalar or list as TOML: floats to 6 significant digits; NaN and infinities as strings
    (``quote_nonfinite``) or as TOML's nan/inf."""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (float, np.floating)):
        value = float(f"{float(value):.6g}")
        if math.isfinite(value) or not quote_nonfinite:
            return repr(value)
        return json.dumps(str(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v, quote_nonfinite) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to a card")


def write_card(
    path: Path,
    script: str,
    sections: Mapping[str, object],
    quote_nonfinite: bool = True,
) -> None:
    """Write a card: ``sections`` maps a table name to a dict, or to a list of dicts for arrays
    of tables (outputs, labels), in card order, after a header naming ``script``. The card is
    loaded back as the node loads it (a card the node rejects stops the run)."""
    parts = [f"# Generated by models/train/{script}; metrics come from that run.\n"]
    for name, value in sections.items():
        items = value if isinstance(value, list) else [value]
        header = f"[[{name}]]" if isinstance(value, list) else f"[{name}]"
        for item in items:
            lines = [header] + [f"{k} = {toml_value(v, quote_nonfinite)}" for k, v in item.items()]
            parts.append("\n".join(lines) + "\n")
    path.write_text("\n".join(parts))
    load_card(path)


def label_table(
    code: tuple[str, str, str],
    truth: str,
    threshold: float | None = None,
    critical: bool = False,
    index: int = 0,
) -> dict[str, object]:
    """One [[labels]] entry: index, the (value, scheme, meaning) code, threshold (left out when
    None), critical and the truth name ``dicomnode models eval`` compares with."""
    value, scheme, meaning = code
    table: dict[str, object] = {
        "index": index,
        "code_value": value,
        "code_scheme": scheme,
        "code_meaning": meaning,
    }
    if threshold is not None:
        table["threshold"] = threshold
    table.update(critical=critical, truth=truth)
    return table


def run_entries(started: float) -> dict[str, object]:
    """The [training] entries of the run itself: seconds since ``started``, torch version and
    threads."""
    return {
        "seconds": round(time.monotonic() - started),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def print_summary(summary: Mapping[str, object], written: str) -> None:
    """Print the run's card sections as JSON and what was written."""
    print(json.dumps(summary, indent=2, default=str))
    print(f"wrote {written}")
