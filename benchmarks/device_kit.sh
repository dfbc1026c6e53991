#!/usr/bin/env bash
# Builds .devkit/ (git-ignored): what benchmarks/device_ingest.sh needs on a lent device
# machine (16 cores; see ../shared/docs/GPU.md), which has Python 3.12 with numpy,
# onnxruntime, pillow, jinja2, httpx, prometheus-client, matplotlib ... but not the rest of
# dicomnode's dependencies, no dcmtk, and no network.
#
#   .devkit/whl/        wheels of what the device image lacks, for PYVER (default 3.12)
#   .devkit/dcmtk.tar.xz  storescu and storescp with every shared library they load, the C
#                         library and loader included, and the DICOM dictionary; bin/storescu
#                         and bin/storescp are wrappers that run them through the carried
#                         loader, so they do not depend on the device's libraries
#
# Then, on the device: run(command="bash benchmarks/device_ingest.sh", carry=[".devkit"]).
# Run here with PYVER=3.11 to try the kit on this machine (benchmarks/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
ABI=cp${PYVER/./}
KIT=.devkit
rm -rf "$KIT"
mkdir -p "$KIT/whl"
# dicomnode's run-time dependencies that the device image does not hold (its package list:
# the device tool's KINDS.md), at the versions the test suite runs with where it matters.
WHEELS=(
  pynetdicom==3.0.4 pydicom==3.0.2 highdicom==0.28.2 sqlalchemy==2.1.9 alembic mako
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection fastapi starlette
  uvicorn python-multipart argon2-cffi argon2-cffi-bindings cffi pycparser psycopg hl7
  opentelemetry-api annotated-doc pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle pyjpegls
)
"${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp --abi "$ABI" --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$KIT/whl" "${WHEELS[@]}" \
  2> >(grep -v "^WARNING: Location" >&2)

STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/bin" "$STAGE/lib" "$STAGE/share"
for tool in storescu storescp; do
  real=${DCMTK_DIR:-/usr/bin}/$tool  # not PATH's: pynetdicom installs scripts of these names
  cp "$real" "$STAGE/bin/$tool.real"
  ldd "$real" | awk '/=> \//{print $3} /^\t\/.*ld-linux/{print $1}' | while read -r lib; do
    cp -L "$lib" "$STAGE/lib/"
  done
  cat > "$STAGE/bin/$tool" <<WRAPPER
#!/bin/sh
# $tool from the machine that built the kit, with its own libraries and loader.
kit=\$(dirname "\$(readlink -f "\$0")")/..
export DCMDICTPATH="\$kit/share/dicom.dic"
exec "\$kit/lib/ld-linux-x86-64.so.2" --library-path "\$kit/lib" "\$kit/bin/$tool.real" "\$@"
WRAPPER
  chmod +x "$STAGE/bin/$tool"
done
# The package's own dictionary; the usual path where dpkg does not know the package.
dictionary=$(dpkg -L libdcmtk17 2>/dev/null | grep '/dicom.dic$' | head -1 || true)
cp "${dictionary:-/usr/share/libdcmtk17/dicom.dic}" "$STAGE/share/dicom.dic"
tar -C "$STAGE" -cf - . | xz -6 -T0 > "$KIT/dcmtk.tar.xz"
du -sh "$KIT/whl" "$KIT/dcmtk.tar.xz"
