#!/usr/bin/env bash
# Install dicomnode in .venv and start it on SQLite with the shipped demo models:
# C-STORE to DICOMNODE@<host>:11112, worklist page at http://127.0.0.1:8080/worklist.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# setuptools warns of every editable install (folders named like the package): not
# for an admin to read.
PYTHONWARNINGS=ignore::UserWarning .venv/bin/python -m pip install -q -e .
.venv/bin/dicomnode check-config conf/dicomnode.toml
if [ -z "$(.venv/bin/dicomnode users list --config conf/dicomnode.toml)" ]; then
  # First start: an admin account for the worklist page, with a password shown once.
  password=$(.venv/bin/python -c "import secrets; print(secrets.token_urlsafe(12))")
  printf '%s\n' "$password" |
    .venv/bin/dicomnode users add admin --role admin --password-stdin --config conf/dicomnode.toml
  echo "worklist log-in: user 'admin', password '$password' (shown once; add radiologists with"
  echo "  .venv/bin/dicomnode users add NAME --role radiologist --config conf/dicomnode.toml)"
fi
exec .venv/bin/dicomnode serve --config conf/dicomnode.toml "$@"
