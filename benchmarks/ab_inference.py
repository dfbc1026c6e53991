"""A/B of two builds of the inference runtime in one process, beside bare onnxruntime.

    git worktree add /tmp/wt-base <base commit>
    flock /tmp/dicomnode-cpu.lock python benchmarks/ab_inference.py --base /tmp/wt-base \
        [--rounds 8] [--passes 4] [--in-flight 0] cxr-view-demo:8 cxr-findings-demo:16 ...

Each model is named with the batch size to run it at (``inference.py``'s sweep gives the
best bare one). The base tree's ``dicomnode/pipeline/runtime.py``, with its ``batching.py``
and ``sessions.py`` where it has them (a tree from before 2026-12-07 holds all three in
``runtime.py``), is loaded as modules of their own beside this tree's (the rest of
``dicomnode`` is this tree's: an A/B of the runtime only). Each round runs, back to back and
in an order that reverses every round, bare ``session.run`` over the images in batches of
that size, this tree's ``Runtime`` and the base tree's, each over ``--passes`` passes of the
images, called by enough threads for the batches in flight and one more, one image per call
(as ``inference.py`` does). Printed per model: the medians of the rounds' new/base, new/bare
and base/bare ratios.

``--sleep-ms`` takes the model out: each batch's run becomes a sleep of that long (the GIL
released, as a device's run) that returns outputs computed once beforehand, and the script
prints calls per second of both runtimes: the node's own cost per image (what caps one
radiograph per call on a GPU), with nothing of onnxruntime's in it.

Why not two ``inference.py`` runs: this VM's speed changes by tens of per cent within
minutes, and between rounds of a second; a runtime change worth a few per cent shows only in
rounds that alternate.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from inference import bare_throughput, inputs, runtime_throughput  # beside this file

from dicomnode.config import InferenceSettings
from dicomnode.models.registry import ModelCard, discover_cards
from dicomnode.pipeline import runtime as this_runtime
from dicomnode.pipeline.sessions import load_session

REPO = Path(__file__).resolve().parent.parent
PROVIDERS = ["CPUExecutionProvider"]


# The runtime's own modules: a base tree's are loaded in this order, each (where the tree has
# it) seen by the next ones' imports in place of this tree's.
RUNTIME_MODULES = ("sessions", "batching", "runtime")


def load_module(path: Path, name: str) -> ModuleType:
    """The file at ``path`` as a module named ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"no module at {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def load_runtime(tree: Path) -> dict[str, ModuleType]:
    """The tree's ``dicomnode/pipeline/`` runtime modules (``runtime`` always, ``sessions``
    and ``batching`` where the tree has them), each as a module of its own."""
    loaded: dict[str, ModuleType] = {}
    saved = {name: sys.modules.get(f"dicomnode.pipeline.{name}") for name in RUNTIME_MODULES}
    try:
        for name in RUNTIME_MODULES:
            path = tree / "dicomnode" / "pipeline" / f"{name}.py"
            if name != "runtime" and not path.is_file():
                continue
            loaded[name] = load_module(path, f"dicomnode_base_{name}")
            # The base's runtime imports dicomnode.pipeline.sessions and .batching: its own.
            sys.modules[f"dicomnode.pipeline.{name}"] = loaded[name]
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(f"dicomnode.pipeline.{name}", None)
            else:
                sys.modules[f"dicomnode.pipeline.{name}"] = module
    return loaded


def without_model(runtime: object, card: ModelCard, images: np.ndarray, seconds: float) -> None:
    """Make each of the runtime's runs a sleep of ``seconds`` returning precomputed rows."""
    session = runtime.session(card)  # type: ignore[attr-defined]
    names = [spec.name for spec in card.outputs]
    outputs = session.run(names, {card.input.name: images[:1]})

    def execute(model: object, batch: np.ndarray, out: object = None) -> list[np.ndarray]:
        time.sleep(seconds)
        return [np.repeat(value, len(batch), axis=0) for value in outputs]

    runtime._execute = execute  # type: ignore[attr-defined]


def ratio(rates: dict[str, list[float]], top: str, bottom: str) -> float:
    """Median of the rounds' ratios of one path's rate to another's."""
    return statistics.median(a / b for a, b in zip(rates[top], rates[bottom], strict=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="name:batch_size, e.g. cxr-view-demo:8")
    parser.add_argument("--base", type=Path, required=True, help="work tree of the base build")
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--passes", type=int, default=4, help="passes over the images a run")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--in-flight", type=int, default=0, help="[inference] in_flight")
    parser.add_argument(
        "--sleep-ms", type=float, default=None, help="replace each run by a sleep this long"
    )
    args = parser.parse_args(argv)
    base = load_runtime(args.base.resolve())
    builds = {"new": this_runtime, "base": base["runtime"]}
    print(f"new runtime: {this_runtime.__file__}")
    for name, module in base.items():
        print(f"base {name}: {module.__file__}")
    cards = {card.model.name: card for card in discover_cards([args.models_dir])}
    for spec in args.models:
        name, _, size_text = spec.partition(":")
        if name not in cards or not size_text.isdigit():
            parser.error(f"{spec!r}: expected name:batch_size with a model in {args.models_dir}")
        card, size = cards[name], int(size_text)
        settings = InferenceSettings(batch_size=size, in_flight=args.in_flight)
        images = inputs(card, args.images)
        runtimes = {label: module.Runtime(PROVIDERS, settings) for label, module in builds.items()}
        in_flight = runtimes["new"].in_flight(card)
        callers = (in_flight + 1) * size
        paths = ["new", "base"]
        if args.sleep_ms is None:
            session = load_session(card, PROVIDERS, settings)
            paths.insert(0, "bare")
        else:
            for runtime in runtimes.values():
                without_model(runtime, card, images, args.sleep_ms / 1000)
        rates: dict[str, list[float]] = {path: [] for path in paths}
        for index in range(args.rounds):
            for path in paths if index % 2 == 0 else paths[::-1]:
                rates[path].append(
                    # As many threads as the node runs batches at once (one per core on the CPU).
                    bare_throughput(session, card, images, size, args.passes, in_flight)
                    if path == "bare"
                    else runtime_throughput(runtimes[path], card, images, callers, 1, args.passes)
                )

        medians = ", ".join(f"{path} {statistics.median(rates[path]):.0f}" for path in paths)
        line = f"{name} batch {size}, {callers} callers: new/base {ratio(rates, 'new', 'base'):.3f}"
        if "bare" in rates:
            line += f", new/bare {ratio(rates, 'new', 'bare'):.3f}"
            line += f", base/bare {ratio(rates, 'base', 'bare'):.3f}"
        unit = "calls/s with the model a sleep" if args.sleep_ms is not None else "images/s"
        print(f"{line} ({unit}, medians: {medians})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
