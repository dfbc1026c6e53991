#!/usr/bin/env bash
# benchmarks/ingest.py on a lent device machine (16 cores), to see whether 4 concurrent
# senders get >= 1.8x the throughput of one where cores are not the limit (issue #8; this
# team's own machine has 2). Needs .devkit/ from benchmarks/device_kit.sh, carried:
#   run(command="bash benchmarks/device_ingest.sh", carry=[".devkit"], timeout_s=540)
# Arguments go to ingest.py (default: CT only, 4 senders, 3 rounds, 4 listener processes).
# Output also in $OUT. Tried end to end on this machine with PYVER=3.11 and a bare venv
# holding only what the device image holds (benchmarks/README.md); not yet on a device.
set -euo pipefail
OUT=${OUT:-/tmp/out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if [ ! -f .devkit/dcmtk.tar.xz ] || ! ls .devkit/whl/*.whl >/dev/null 2>&1; then
  echo "no .devkit here: run 'bash benchmarks/device_kit.sh' on the build machine and pass" \
    "carry=[\".devkit\"] to the device call" >&2
  exit 2
fi
if [ ! -d /tmp/devkit/site/pynetdicom ]; then  # a rerun on the same (warm) machine skips this
  mkdir -p /tmp/devkit/site /tmp/devkit/dcmtk
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/devkit/site .devkit/whl/*.whl
  tar -xJf .devkit/dcmtk.tar.xz -C /tmp/devkit/dcmtk
fi
export PYTHONPATH=/tmp/devkit/site:$PWD PYTHONUNBUFFERED=1
export STORESCU=/tmp/devkit/dcmtk/bin/storescu STORESCP=/tmp/devkit/dcmtk/bin/storescp
{
  echo "cores: $(nproc); $(uname -r); $("$PY" --version)"
  "$STORESCU" --version | sed -n 1p  # reads it all: head would end it with SIGPIPE
  "$PY" -c "import pynetdicom, pydicom, sqlalchemy; print('pynetdicom', pynetdicom.__version__, 'pydicom', pydicom.__version__, 'sqlalchemy', sqlalchemy.__version__)"
} 2>&1 | tee "$OUT/machine.txt"
if [ $# -eq 0 ]; then
  set -- --dx 0 --big-mb 0 --associations 0 --senders 4 --rounds 3 --listeners 4
fi
"$PY" benchmarks/ingest.py "$@" 2>&1 | tee "$OUT/ingest.txt"
