#!/usr/bin/env bash
# Install dicomnode in .venv and start it on SQLite with the shipped demo models:
# C-STORE to DICOMNODE@<host>:11112, worklist page at http://127.0.0.1:8080/worklist.
#
# Other ports or settings: a configuration file of your own, given as --config FILE (or
# DICOMNODE_CONFIG=FILE), e.g. a copy of conf/dicomnode.toml in conf/ with [node] port and
# [web] port changed. Every other argument goes to "dicomnode serve" (--workers N).
set -euo pipefail
config=${DICOMNODE_CONFIG:-}
named_by=${DICOMNODE_CONFIG:+DICOMNODE_CONFIG}
serve_args=()
while [ $# -gt 0 ]; do
  case $1 in
    --config)
      [ $# -ge 2 ] || { echo "run-node.sh: --config needs a file" >&2; exit 2; }
      config=$2
      named_by=--config
      shift 2
      ;;
    --config=*) config=${1#--config=}; named_by=--config; shift ;;
    *) serve_args+=("$1"); shift ;;
  esac
done
# A file given is relative to the folder the script was started in, not to the clone.
case $config in
  "") config=conf/dicomnode.toml ;;
  /*) ;;
  *) config=$PWD/$config ;;
esac
if [ -n "${named_by:-}" ] && [ ! -f "$config" ]; then
  echo "run-node.sh: configuration file $config (from $named_by) not found" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# setuptools warns of every editable install (folders named like the package): not
# for an admin to read.
PYTHONWARNINGS=ignore::UserWarning .venv/bin/python -m pip install -q -e .
# serve logs the configuration's warnings (an open [[peers]] list, the storage) as it
# starts, a few lines below: check-config's own copy of them is left out here, its errors
# and its OK line are not.
check_status=0
exec 3>&1
check_output=$(.venv/bin/dicomnode check-config "$config" 2>&1 1>&3 3>&-) || check_status=$?
exec 3>&-
if [ -n "$check_output" ]; then
  printf '%s\n' "$check_output" | grep -v '^warning: ' >&2 || true
fi
[ "$check_status" -eq 0 ] || exit "$check_status"
# The database made, or brought to this version's schema after a pull (serve would do it
# too), before users list: that command only reads, and refuses a database behind.
.venv/bin/dicomnode db upgrade --config "$config"
if [ -z "$(.venv/bin/dicomnode users list --config "$config")" ]; then
  # First start: an admin account for the worklist page, with a password shown once.
  password=$(.venv/bin/python -c "import secrets; print(secrets.token_urlsafe(12))")
  printf '%s\n' "$password" |
    .venv/bin/dicomnode users add admin --role admin --password-stdin --config "$config"
  echo "worklist log-in: user 'admin', password '$password' (shown once; add radiologists with"
  echo "  .venv/bin/dicomnode users add NAME --role radiologist --config '$config')"
fi
exec .venv/bin/dicomnode serve --config "$config" ${serve_args[@]+"${serve_args[@]}"}
