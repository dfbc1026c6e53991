"""Inference throughput: the node's batched runtime against bare onnxruntime.

For every model card in ``models/`` (the demo models and any other ``*.onnx`` with a card),
the same images go through

  (a) a bare ``onnxruntime.InferenceSession.run`` in batches of each size in
      ``--batch-sizes``; the best size is the reference, and
  (b) the node's :class:`dicomnode.pipeline.runtime.Runtime` (batch size = that best size),
      called by ``--callers`` threads with ``--images-per-call`` images each (default 1, a
      radiograph per analysis; the pipeline sends a CT series in chunks of up to 32), as
      concurrent analyses call it. Default callers: enough for the batches in flight
      (``[inference] in_flight``) and one more, so that a batch can queue up while the others
      run (with exactly one batch of callers every batch waits for all of its callers to
      come back first).

The sweep of (a) picks the best size (best of ``--rounds`` runs per size); then (a) at that
size and (b) are measured in ``--rounds`` paired rounds, back to back, which goes first
alternating, each over as many passes of the images as last ``--seconds``: b/a is the
median of the rounds' ratios (until 2026-12-06 it was the best of (b)'s runs over the best
of all of the sweep's, a reference picked as the luckiest of many noisy runs of a tenth of a
second). Prints images per second of both, the ratio b/a (goal >= 0.9), how the runtime
coalesced the calls, the execution provider that actually ran and the thread settings.

    python benchmarks/inference.py [--images 256] [--callers N] [--images-per-call 1]
        [--rounds 3] [--seconds 1] [--batch-sizes 1,2,4,8,16,32]
        [--providers CUDAExecutionProvider,CPUExecutionProvider] [--intra-op-threads 0]
        [--io-binding auto|on|off] [--in-flight 0] [--pinned auto|off] [--bound-outputs auto|off]
        [--only cxr-view-demo,...]

On a GPU machine install the ``gpu`` extra (onnxruntime-gpu) and pass
``--providers CUDAExecutionProvider,CPUExecutionProvider`` (or TensorrtExecutionProvider
first); the runtime then uses IO binding.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from dicomnode.config import InferenceSettings
from dicomnode.models.registry import ModelCard, discover_cards
from dicomnode.pipeline.runtime import Runtime
from dicomnode.pipeline.sessions import cpu_cores, intra_op_threads, load_session

REPO = Path(__file__).resolve().parent.parent
GOAL = 0.9


def inputs(card: ModelCard, count: int) -> np.ndarray:
    """``count`` z-scored images of the card's input shape (same for both paths)."""
    rng = np.random.default_rng(20260101)
    return rng.standard_normal((count, *card.input.shape), dtype=np.float32)


def bare_throughput(
    session: ort.InferenceSession,
    card: ModelCard,
    images: np.ndarray,
    size: int,
    passes: int = 1,
    callers: int = 1,
) -> float:
    """Images per second of plain session.run over ``images`` in batches of ``size``,
    ``passes`` times, called by ``callers`` threads at once (1: this thread alone)."""
    names = [spec.name for spec in card.outputs]
    session.run(names, {card.input.name: images[:size]})  # warm-up for this shape
    starts = range(0, len(images), size)
    if callers == 1:
        started = time.perf_counter()
        for _ in range(passes):
            for start in starts:
                session.run(names, {card.input.name: images[start : start + size]})
        return passes * len(images) / (time.perf_counter() - started)

    def call(index: int) -> None:
        start = starts[index % len(starts)]
        session.run(names, {card.input.name: images[start : start + size]})

    return passes * len(images) / timed_calls(callers, passes * len(starts), call)


def timed_calls(callers: int, calls: int, call: Callable[[int], object]) -> float:
    """Seconds ``callers`` threads, started together, take to make ``calls`` calls of
    ``call(index)`` between them, each taking the next index."""
    next_call = itertools.count()  # next() on it is atomic: no lock of the harness's own
    barrier = threading.Barrier(callers + 1)

    def caller() -> None:
        barrier.wait()
        while (index := next(next_call)) < calls:
            call(index)

    threads = [threading.Thread(target=caller) for _ in range(callers)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


@dataclass(frozen=True)
class BareWay:
    """One way to run the model bare: a session and how many threads call it at once."""

    name: str
    session: ort.InferenceSession
    callers: int


def bare_ways(
    card: ModelCard, providers: list[str], settings: InferenceSettings, in_flight: int
) -> list[BareWay]:
    """The bare references: a session with the node's settings called by as many threads as
    the node runs batches at once, and one called by a single thread; on the CPU also a
    session on onnxruntime's own thread pool (a thread per core) called by one thread, the
    way onnxruntime runs when nothing is set."""
    session = load_session(card, providers, settings)
    ways = [BareWay(f"{in_flight} caller(s), node's session", session, in_flight)]
    if in_flight > 1:
        ways.append(BareWay("1 caller, node's session", session, 1))
    if session.get_providers()[0] == "CPUExecutionProvider":
        pooled = settings.model_copy(update={"intra_op_threads": cpu_cores()})
        if intra_op_threads(settings, on_cpu=True) != cpu_cores():
            ways.append(
                BareWay(
                    f"1 caller, {cpu_cores()} intra-op threads",
                    load_session(card, providers, pooled),
                    1,
                )
            )
    return ways


def runtime_throughput(
    runtime: Runtime,
    card: ModelCard,
    images: np.ndarray,
    callers: int,
    per_call: int,
    passes: int = 1,
) -> float:
    """Images per second of ``callers`` threads each asking the runtime for ``per_call``
    images at a time, over ``images`` ``passes`` times."""
    runtime.warm_up(card)  # as the worker does at start: every batch size it will run
    runtime.run(card, images[:per_call])
    calls_per_pass = -(-len(images) // per_call)

    def call(index: int) -> None:
        start = index % calls_per_pass * per_call
        runtime.run(card, images[start : start + per_call])

    return passes * len(images) / timed_calls(callers, passes * calls_per_pass, call)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=REPO / "models")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument(
        "--callers",
        type=int,
        default=0,
        help="threads calling the runtime (0: enough for the batches in flight and one more)",
    )
    parser.add_argument(
        "--images-per-call",
        type=int,
        default=1,
        help="images in each call of the runtime (1: a radiograph; a CT series comes in "
        "chunks of up to 32 slices)",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="runs per size in the sweep, then paired rounds"
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=1.0,
        help="least duration of each paired measurement (passes over the images repeated)",
    )
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    parser.add_argument("--providers", default="CPUExecutionProvider")
    parser.add_argument("--intra-op-threads", type=int, default=0)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument(
        "--io-binding",
        choices=["auto", "on", "off"],
        default="auto",
        help="the node's [inference] io_binding (auto: on for GPU providers)",
    )
    parser.add_argument(
        "--in-flight",
        type=int,
        default=0,
        help="the node's [inference] in_flight: batches of a model run at once (0: 2 on GPU "
        "providers, 1 on CPU)",
    )
    parser.add_argument(
        "--pinned",
        choices=["auto", "off"],
        default="auto",
        help="the node's [inference] pinned_buffers (auto: GPU batches in page-locked memory)",
    )
    parser.add_argument(
        "--bound-outputs",
        choices=["auto", "off"],
        default="auto",
        help="the node's [inference] bound_outputs (auto: IO-bound runs write outputs of "
        "known shape into reused host buffers, pinned on GPU providers)",
    )
    parser.add_argument(
        "--only", default="", help="comma-separated model names (default: every card)"
    )
    args = parser.parse_args(argv)
    providers = args.providers.split(",")
    sizes = [int(s) for s in args.batch_sizes.split(",")]

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s); "
        f"onnxruntime {ort.__version__}; available providers {ort.get_available_providers()}"
    )
    cards = discover_cards([args.models])
    if not cards:
        print(f"no model cards in {args.models}", file=sys.stderr)
        return 2
    if args.only:
        cards = [card for card in cards if card.model.name in args.only.split(",")]
    failed = False
    for card in cards:
        if card.ensemble is not None:
            print(f"\n{card.model.name}: ensemble of {card.ensemble.members}, no ONNX of its own")
            continue
        settings = InferenceSettings(
            intra_op_threads=args.intra_op_threads,
            max_wait_ms=args.max_wait_ms,
            io_binding=args.io_binding,
            in_flight=args.in_flight,
            pinned_buffers=args.pinned,
            bound_outputs=args.bound_outputs,
        )
        in_flight = Runtime(providers, settings).in_flight(card)
        ways = bare_ways(card, providers, settings, in_flight)
        images = inputs(card, args.images)
        print(
            f"\n{card.model.name} {card.model.version}: input {list(card.input.shape)}, "
            f"{len(images)} images; running on {ways[0].session.get_providers()[0]}, intra-op "
            f"threads {intra_op_threads(settings, on_cpu=True) or 'auto'}, {in_flight} in flight"
        )
        sweep = {
            (way.name, size): max(
                bare_throughput(way.session, card, images, size, callers=way.callers)
                for _ in range(args.rounds)
            )
            for way in ways
            for size in sizes
        }
        for (name, size), rate in sweep.items():
            print(f"  (a) bare session.run, {name}, batch {size:3d}: {rate:8.1f} images/s")
        best_name, best_size = max(sweep, key=sweep.__getitem__)
        best_way = next(way for way in ways if way.name == best_name)
        # Each paired measurement lasts at least --seconds (this VM's speed changes within
        # a second): as many passes over the images as that takes at the sweep's best rate.
        passes = max(1, math.ceil(args.seconds * sweep[best_name, best_size] / len(images)))
        settings = settings.model_copy(update={"batch_size": best_size})
        runtime = Runtime(providers, settings)
        per_call = args.images_per_call
        # Enough callers for the batches in flight and one more queueing up behind them.
        batches = runtime.in_flight(card) + 1
        callers = args.callers or max(1, -(-batches * best_size // per_call))
        # Paired rounds at that size: bare and node back to back, which goes first
        # alternating, so that the machine's drift falls on both and neither is the best of
        # more tries than the other (the sweep's best is the best of sizes x rounds).
        pairs: list[tuple[float, float]] = []
        for index in range(args.rounds):
            measured = {}
            for path in ("bare", "node") if index % 2 == 0 else ("node", "bare"):
                measured[path] = (
                    bare_throughput(
                        best_way.session, card, images, best_size, passes, best_way.callers
                    )
                    if path == "bare"
                    else runtime_throughput(runtime, card, images, callers, per_call, passes)
                )
            pairs.append((measured["bare"], measured["node"]))
        stats = runtime.stats(card)
        ratios = [node / bare_rate for bare_rate, node in pairs]
        ratio = statistics.median(ratios)
        print(
            f"  (a) bare session.run, {best_name}, batch {best_size}, paired rounds of "
            f"{passes} pass(es): "
            f"{statistics.median(a for a, _ in pairs):8.1f} images/s (median)"
        )
        print(
            f"  (b) node Runtime, {callers} callers x {per_call} image(s), batch_size {best_size}, "
            f"max_wait {args.max_wait_ms:g} ms, {runtime.in_flight(card)} in flight, "
            f"io_binding {args.io_binding}, pinned {args.pinned}, "
            f"bound outputs {args.bound_outputs}: "
            f"{statistics.median(b for _, b in pairs):8.1f} images/s (median; "
            f"mean batch {stats.images / stats.runs:.1f}, largest {stats.largest})"
        )
        print(f"  b/a per round: {' '.join(f'{r:.2f}' for r in ratios)}")
        verdict = "PASS" if ratio >= GOAL else "FAIL"
        print(f"  b/a = {ratio:.2f}, median of {len(ratios)} rounds (goal >= {GOAL}) {verdict}")
        failed |= ratio < GOAL
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
