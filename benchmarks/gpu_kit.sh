#!/usr/bin/env bash
# Builds .ort/ (git-ignored): what benchmarks/gpu.sh needs on a lent GPU machine, which has
# Python 3.12, NVIDIA's CUDA 13 pip packages and CPU-only onnxruntime, and no network (see
# ../shared/docs/GPU.md). One device call carries at most 64 MiB with the working tree, so
# onnxruntime-gpu travels as an xz-compressed tar of the unpacked wheel in parts:
#
#   .ort/1/part-00 ... .ort/N/part-0M   one part per device call, each copied to /tmp/ort
#   .ort/whl/                           pure-Python and cp312 wheels gpu.sh installs
#
# Then, on the device, back to back (a machine stays warm only a short while between calls):
#   run(command="mkdir -p /tmp/ort && cp .ort/1/part-* /tmp/ort/", carry=[".ort/1"]) ... for
#   each part, then run(command="bash benchmarks/gpu.sh", carry=[".ort/whl"], timeout_s=540).
# ORT_VERSION picks the onnxruntime-gpu release (one built for CUDA 13, as the device has).
set -euo pipefail
cd "$(dirname "$0")/.."
ORT_VERSION=${ORT_VERSION:-1.31.1}
PARTS=${PARTS:-5}
KIT=.ort
grep -qx "/$KIT/" .git/info/exclude 2>/dev/null || echo "/$KIT/" >> .git/info/exclude
rm -rf "$KIT"
mkdir -p "$KIT/whl"
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
download() {  # destination, then requirements
  local destination=$1
  shift
  "${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$destination" "$@" \
    2> >(grep -v "^WARNING: Location" >&2)
}
download "$STAGE" "onnxruntime-gpu==$ORT_VERSION"
# What dicomnode's config, model cards and runtime import beyond the device image's packages.
download "$KIT/whl" pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection \
  typing-extensions sqlalchemy==2.1.9
mkdir "$STAGE/unpacked"
"${PYTHON:-python3}" -m zipfile -e "$STAGE"/onnxruntime_gpu-*.whl "$STAGE/unpacked"
tar -C "$STAGE/unpacked" -cf - . | xz -9 -T0 > "$STAGE/ort.tar.xz"
split -n "$PARTS" -d "$STAGE/ort.tar.xz" "$STAGE/part-"
index=1
for part in "$STAGE"/part-*; do
  mkdir -p "$KIT/$index"
  mv "$part" "$KIT/$index/"
  index=$((index + 1))
done
du -sh "$KIT"/*
