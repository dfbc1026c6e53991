#!/usr/bin/env bash
# Install dicomnode in .venv and start it on SQLite with the shipped demo models:
# C-STORE to DICOMNODE@<host>:11112, worklist page at http://127.0.0.1:8080/worklist.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .
.venv/bin/dicomnode check-config conf/dicomnode.toml
if [ -z "$(.venv/bin/dicomnode users list --config conf/dicomnode.toml)" ]; then
  echo "no web users yet; the worklist page needs one:" >&2
  echo "  .venv/bin/dicomnode users add NAME --role radiologist --config conf/dicomnode.toml" >&2
fi
exec .venv/bin/dicomnode serve --config conf/dicomnode.toml "$@"
