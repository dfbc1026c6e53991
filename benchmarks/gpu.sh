#!/usr/bin/env bash
# Inference on a lent GPU machine (see ../shared/docs/GPU.md and benchmarks/README.md).
#
# The machine has Python 3.12, NVIDIA's CUDA 13 pip packages and CPU-only onnxruntime, and no
# network. onnxruntime-gpu travels as an xz-compressed tar of the unpacked wheel, split into
# parts of ~40 MB (one per device call: .ort/1 ... .ort/5, each copied to /tmp/ort by
# `mkdir -p /tmp/ort && cp .ort/N/part-* /tmp/ort/`), and pure-Python needs as wheels in
# .ort/whl. Prepared here with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 onnxruntime-gpu==1.31.1   (and pydantic, pydantic-core,
#     annotated-types, typing-inspection, typing-extensions, sqlalchemy for cp312)
#   unzip the wheel; tar cf - onnxruntime onnxruntime_gpu-*.dist-info | xz -9 > ort.tar.xz
#   split -n 5 -d ort.tar.xz part-
# This script (last call) unpacks everything, proves the CUDA provider runs, and runs
# benchmarks/inference.py on CUDA and, for comparison, on the same machine's CPUs.
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/site
cat /tmp/ort/part-* > /tmp/ort.tar.xz
python3 -c "import tarfile; tarfile.open('/tmp/ort.tar.xz').extractall('/tmp/site')"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .ort/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi -L
python3 - <<'PY'
import logging
import time

import numpy as np
import onnxruntime as ort

from dicomnode.config import InferenceSettings
from dicomnode.models.registry import load_card
from dicomnode.pipeline.runtime import Runtime

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
print("onnxruntime", ort.__version__, ort.__file__, ort.get_available_providers())
wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
gpu = Runtime(wanted, InferenceSettings(max_wait_ms=0))
cpu = Runtime(["CPUExecutionProvider"], InferenceSettings(max_wait_ms=0))
# Eight synthetic PA radiographs (half with pneumothorax) through the node's preprocessing,
# made where pydicom is (.ort/check/phantoms.npz): CUDA against CPU on the same inputs, and
# CUDA without TF32 convolutions, since the CUDA provider allows TF32 by default.
phantoms = np.load(".ort/check/phantoms.npz")
for name in phantoms.files:
    card = load_card(f"models/{name.replace('-', '_')}.toml")
    batch = phantoms[name]
    print(name, "configured", wanted, "-> session providers", gpu.session(card).get_providers())
    on_gpu, on_cpu = gpu.run(card, batch), cpu.run(card, batch)
    strict = ort.InferenceSession(
        str(card.onnx_path), providers=[("CUDAExecutionProvider", {"use_tf32": 0})]
    )
    no_tf32 = strict.run(None, {card.input.name: batch})
    for index, spec in enumerate(card.outputs):
        diff = float(np.max(np.abs(on_gpu[spec.name] - on_cpu[spec.name])))
        strict_diff = float(np.max(np.abs(no_tf32[index] - on_cpu[spec.name])))
        print(
            f"  {spec.name}: max |CUDA - CPU| = {diff:.2e}, without TF32 {strict_diff:.2e}, "
            f"CPU range [{on_cpu[spec.name].min():.3g}, {on_cpu[spec.name].max():.3g}]"
        )
    if "probability" in on_gpu:
        print("  probabilities CUDA", np.round(on_gpu["probability"].ravel()[:16], 3).tolist())
        print("  probabilities CPU ", np.round(on_cpu["probability"].ravel()[:16], 3).tolist())
# What a new batch size costs the CUDA provider on its first run (cuDNN's algorithm search).
view = load_card("models/cxr_view_demo.toml")
session = gpu.session(view)
for size in (100, 100, 101, 101):
    batch = np.zeros((size, *view.input.shape), np.float32)
    started = time.perf_counter()
    session.run(None, {view.input.name: batch})
    print(f"cxr-view batch {size}: {1000 * (time.perf_counter() - started):.1f} ms")
PY
timeout 240 python3 benchmarks/inference.py --providers CUDAExecutionProvider,CPUExecutionProvider \
  --batch-sizes 1,8,32,64,128 --images 1024 --rounds 3 2>&1 | tee "$OUT/cuda.txt" || true
# A CT series goes to the runtime in chunks of up to 32 slices; with and without IO binding.
for binding in on off; do
  timeout 150 python3 benchmarks/inference.py --providers CUDAExecutionProvider,CPUExecutionProvider \
    --batch-sizes 32,64,128 --images 1024 --rounds 2 --images-per-call 32 --io-binding $binding \
    2>&1 | tee "$OUT/cuda-chunks-binding-$binding.txt" || true
done
