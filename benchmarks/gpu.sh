#!/usr/bin/env bash
# Inference on a lent GPU machine (see ../shared/docs/GPU.md and benchmarks/README.md).
#
# The machine has Python 3.12, NVIDIA's CUDA 13 pip packages and CPU-only onnxruntime, and no
# network. onnxruntime-gpu travels as an xz-compressed tar of the unpacked wheel, split into
# parts of ~40 MB (one per device call: .ort/1 ... .ort/5, each copied to /tmp/ort by
# `mkdir -p /tmp/ort && cp .ort/N/part-* /tmp/ort/`), and pure-Python needs as wheels in
# .ort/whl. Prepared here by `bash benchmarks/gpu_kit.sh` (downloads onnxruntime-gpu 1.31.1 and
# the cp312 wheels, packs and splits them; its header gives the device calls).
# This script (last call) unpacks everything, proves the CUDA provider runs, and runs
# benchmarks/inference.py on CUDA: where a batch's time goes (pageable or pinned host memory),
# then the runtime as configured by default and A/Bs of pinned buffers, outputs bound to host
# buffers, batches in flight. Everything printed is also written to $OUT.
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/site
if [ ! -d /tmp/site/onnxruntime ]; then  # a rerun on the same (warm) machine skips this
  cat /tmp/ort/part-* > /tmp/ort.tar.xz
  python3 -c "import tarfile; tarfile.open('/tmp/ort.tar.xz').extractall('/tmp/site')"
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .ort/whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi -L
python3 - <<'PY' 2>&1 | grep -v "^INFO" | tee "$OUT/check.txt"
import logging
import time

import numpy as np
import onnxruntime as ort

from dicomnode.config import InferenceSettings
from dicomnode.models.registry import load_card
from dicomnode.pipeline.pinned import pin
from dicomnode.pipeline.runtime import Runtime

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
print("onnxruntime", ort.__version__, ort.__file__, ort.get_available_providers())
wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
gpu = Runtime(wanted, InferenceSettings(max_wait_ms=0))
cpu = Runtime(["CPUExecutionProvider"], InferenceSettings(max_wait_ms=0))
# CUDA against CPU on the same z-scored inputs (the CUDA provider allows TF32 convolutions).
rng = np.random.default_rng(1)
for name in ("cxr_pneumothorax_demo", "cxr_findings_demo", "cxr_lung_seg_demo"):
    card = load_card(f"models/{name}.toml")
    batch = rng.standard_normal((8, *card.input.shape), dtype=np.float32)
    print(name, "configured", wanted, "-> session providers", gpu.session(card).get_providers())
    gpu.warm_up(card)  # as a worker does; says if outputs cannot be bound to host buffers
    print("  outputs bound to host buffers:", gpu._model(card).batcher.outputs is not None)
    on_gpu, on_cpu = gpu.run(card, batch), cpu.run(card, batch)
    for spec in card.outputs:
        diff = float(np.max(np.abs(on_gpu[spec.name] - on_cpu[spec.name])))
        print(f"  {spec.name}: max |CUDA - CPU| = {diff:.2e}")

# Where a batch's time goes: cxr-view, 4 requests of 32 images joined into a batch of 128,
# from pageable and from pinned (page-locked) host memory.
card = load_card("models/cxr_view_demo.toml")
session = gpu.session(card)
names = [spec.name for spec in card.outputs]
parts = [rng.standard_normal((32, *card.input.shape), dtype=np.float32) for _ in range(4)]
pageable = np.empty((128, *card.input.shape), np.float32)
pinned = np.empty((128, *card.input.shape), np.float32)
print("pinned:", pin(pinned))
fresh = rng.standard_normal((128, *card.input.shape), dtype=np.float32)


def best(fn, rounds=20):
    fn()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1000 * min(times), 1000 * float(np.median(times))


def bound_run(buffer):
    binding = session.io_binding()
    binding.bind_input(card.input.name, "cpu", 0, np.float32, list(buffer.shape), buffer.ctypes.data)
    for name in names:
        binding.bind_output(name, "cuda")
    session.run_with_iobinding(binding)
    return binding.copy_outputs_to_cpu()


steps = {
    "join 4 x 32 into pageable": lambda: np.concatenate(parts, out=pageable),
    "join 4 x 32 into pinned": lambda: np.concatenate(parts, out=pinned),
    "session.run from pageable": lambda: session.run(names, {card.input.name: pageable}),
    "session.run from pinned": lambda: session.run(names, {card.input.name: pinned}),
    "session.run from a fresh array (bare)": lambda: session.run(names, {card.input.name: fresh}),
    "IO-bound run from pageable": lambda: bound_run(pageable),
    "IO-bound run from pinned": lambda: bound_run(pinned),
}
for label, fn in steps.items():
    low, median = best(fn)
    print(f"cxr-view batch 128: {label}: best {low:.2f} ms, median {median:.2f} ms")
PY
bench() {  # label, then benchmarks/inference.py's arguments
  local label=$1
  shift
  timeout 150 python3 benchmarks/inference.py --providers CUDAExecutionProvider,CPUExecutionProvider \
    --images 4096 --rounds 2 --seconds 0.3 "$@" 2>&1 | grep -v "^INFO" | tee "$OUT/$label.txt" || true
}
# A CT series goes to the runtime in chunks of up to 32 slices.
bench chunks-default --batch-sizes 64,128 --images-per-call 32
few=cxr-view-demo,cxr-findings-demo,cxr-lung-seg-demo,cxr-tube-tip-demo
bench chunks-pageable --batch-sizes 64,128 --images-per-call 32 --pinned off --only $few
# Outputs copied back after the run into fresh arrays, as before 2026-12-06 (the defaults
# write them into reused pinned buffers inside the run): the models with large outputs.
large=cxr-lung-seg-demo,cxr-bone-suppression-demo,ct-lung-seg-demo,cxr-tb-resnet-demo
bench chunks-outputs-after --batch-sizes 64,128 --images-per-call 32 --bound-outputs off --only $large
bench chunks-one-in-flight --batch-sizes 64,128 --images-per-call 32 --in-flight 1 --only $few
# One radiograph per call (a CXR analysis).
bench single --batch-sizes 32,64,128
