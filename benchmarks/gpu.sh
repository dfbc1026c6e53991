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
# benchmarks/inference.py on CUDA: where a batch's time goes, then the runtime with 1 or 2 batches
# in flight and IO binding on or off.
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
# CUDA against CPU on the same z-scored inputs (the CUDA provider allows TF32 convolutions).
rng = np.random.default_rng(1)
for name in ("cxr_pneumothorax_demo", "cxr_findings_demo", "cxr_lung_seg_demo"):
    card = load_card(f"models/{name}.toml")
    batch = rng.standard_normal((8, *card.input.shape), dtype=np.float32)
    print(name, "configured", wanted, "-> session providers", gpu.session(card).get_providers())
    on_gpu, on_cpu = gpu.run(card, batch), cpu.run(card, batch)
    for spec in card.outputs:
        diff = float(np.max(np.abs(on_gpu[spec.name] - on_cpu[spec.name])))
        print(f"  {spec.name}: max |CUDA - CPU| = {diff:.2e}")

# Where a batch's time goes: cxr-view, 4 requests of 32 images joined into a batch of 128.
card = load_card("models/cxr_view_demo.toml")
session = gpu.session(card)
names = [spec.name for spec in card.outputs]
parts = [rng.standard_normal((32, *card.input.shape), dtype=np.float32) for _ in range(4)]
buffer = np.empty((128, *card.input.shape), np.float32)
value = ort.OrtValue.ortvalue_from_shape_and_type(list(buffer.shape), np.float32, "cuda", 0)


def best(fn, rounds=20):
    fn()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1000 * min(times), 1000 * float(np.median(times))


def bound_run():
    binding = session.io_binding()
    binding.bind_ortvalue_input(card.input.name, value)
    for name in names:
        binding.bind_output(name, "cuda")
    session.run_with_iobinding(binding)
    return binding.copy_outputs_to_cpu()


steps = {
    "join 4 x 32 into the reused buffer": lambda: np.concatenate(parts, out=buffer),
    "update_inplace (host -> device)": lambda: value.update_inplace(buffer),
    "bound run + outputs to host": bound_run,
    "bare session.run(numpy 128)": lambda: session.run(names, {card.input.name: buffer}),
    "OrtValue cuda from numpy (fresh)": lambda: ort.OrtValue.ortvalue_from_numpy(buffer, "cuda", 0),
}
for label, fn in steps.items():
    low, median = best(fn)
    print(f"cxr-view batch 128: {label}: best {low:.2f} ms, median {median:.2f} ms")
# Does update_inplace let other Python threads run (GIL released during the copy)?
import threading

counts = []
stop = threading.Event()


def spin():
    n = 0
    while not stop.is_set():
        n += 1
    counts.append(n)


for label, fn in (("update_inplace", steps["update_inplace (host -> device)"]), ("join", steps["join 4 x 32 into the reused buffer"]), ("sleep", lambda: time.sleep(0.004))):
    stop.clear()
    thread = threading.Thread(target=spin)
    thread.start()
    started = time.perf_counter()
    for _ in range(50):
        fn()
    stop.set()
    thread.join()
    spent = time.perf_counter() - started
    print(f"GIL check, {label}: spinning thread ran {counts[-1] / spent / 1e6:.2f} M loops/s meanwhile")
PY
# A CT series goes to the runtime in chunks of up to 32 slices: batches in flight 1 and 2,
# IO binding on and off.
for in_flight in 2 1; do
  for binding in on off; do
    timeout 100 python3 benchmarks/inference.py --providers CUDAExecutionProvider,CPUExecutionProvider \
      --batch-sizes 64,128 --images 1024 --rounds 2 --images-per-call 32 --io-binding $binding \
      --in-flight $in_flight 2>&1 | grep -v "^INFO" | tee "$OUT/cuda-chunks-inflight-$in_flight-binding-$binding.txt" || true
  done
done
# One radiograph per call (a CXR analysis), 2 batches in flight.
timeout 120 python3 benchmarks/inference.py --providers CUDAExecutionProvider,CPUExecutionProvider \
  --batch-sizes 32,64,128 --images 1024 --rounds 2 --in-flight 2 2>&1 | grep -v "^INFO" \
  | tee "$OUT/cuda-single.txt" || true
