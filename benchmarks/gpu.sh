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

import numpy as np
import onnxruntime as ort

from dicomnode.config import InferenceSettings
from dicomnode.models.registry import load_card
from dicomnode.pipeline.runtime import Runtime

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
print("onnxruntime", ort.__version__, ort.__file__, ort.get_available_providers())
card = load_card("models/cxr_pneumothorax_demo.toml")
batch = np.random.default_rng(1).standard_normal((8, *card.input.shape), dtype=np.float32)
wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
try:
    gpu = Runtime(wanted, InferenceSettings(max_wait_ms=0))
    print("configured", wanted, "-> session providers", gpu.session(card).get_providers())
except Exception as exc:  # TensorRT's libraries are not on the machine
    print("TensorRT first failed:", exc)
    gpu = Runtime(wanted[1:], InferenceSettings(max_wait_ms=0))
    print("configured", wanted[1:], "-> session providers", gpu.session(card).get_providers())
cpu = Runtime(["CPUExecutionProvider"], InferenceSettings(max_wait_ms=0))
on_gpu, on_cpu = gpu.run(card, batch), cpu.run(card, batch)
for name in on_gpu:
    diff = float(np.max(np.abs(on_gpu[name] - on_cpu[name])))
    print(f"{card.model.name} output {name}: max |CUDA - CPU| = {diff:.2e}")
PY
timeout 300 python3 benchmarks/inference.py --providers CUDAExecutionProvider,CPUExecutionProvider \
  --batch-sizes 1,8,32,64,128 --images 1024 --rounds 3 2>&1 | tee "$OUT/cuda.txt" || true
timeout 150 python3 benchmarks/inference.py --providers CPUExecutionProvider \
  --batch-sizes 1,8,32 --images 256 --rounds 2 2>&1 | tee "$OUT/cpu.txt" || true
