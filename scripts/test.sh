#!/usr/bin/env bash
# Install what the test suite needs and run all of it.
#  - Debian packages (dcmtk, dicom3tools, libgdcm-tools for gdcm's lossy compression as a
#    router writes it, chromium for the browser tests, orthanc as a real PACS
#    for the export test, systemd for systemd-analyze and libseccomp, with which the unit
#    tests verify the units and run the node under their system-call filter; nothing is
#    booted) through apt-get when running as root;
#  - a virtual environment in .venv with dicomnode and its [dev] extra;
#  - PostgreSQL at 127.0.0.1:5432 (database "test", trust auth) is used when reachable;
#    on CI it must be (set DICOMNODE_TEST_POSTGRES to point elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(dcmtk dicom3tools libgdcm-tools chromium orthanc systemd)
missing=()
for package in "${APT_PACKAGES[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian packages: ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    # The package starts a system Orthanc where there is an init system; the tests run their
    # own on free ports and need none.
    if [[ " ${missing[*]} " == *" orthanc "* ]]; then
      service orthanc stop >/dev/null 2>&1 || true
    fi
  else
    echo "missing Debian packages: ${missing[*]} (run as root or install them)" >&2
  fi
fi

# Start the local PostgreSQL cluster if it is installed but stopped (as on a fresh machine).
if command -v pg_ctlcluster >/dev/null && ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# setuptools warns of every editable install (folders named like the package): not
# for an admin to read.
PYTHONWARNINGS=ignore::UserWarning .venv/bin/python -m pip install -q -e ".[dev]"

.venv/bin/ruff check .
# Test files run in parallel worker processes (pytest-xdist), each file's tests in one worker
# so that its module fixtures are made once: most tests wait on real peers (storescu, a
# node's processes, PostgreSQL), so two workers on two cores take well under half the time
# of one. As many workers as usable cores, at least 2 and at most 4 (more would crowd
# PostgreSQL's connections and the cores' timing); DICOMNODE_TEST_WORKERS sets it, 0 runs
# the suite in this one process.
workers=${DICOMNODE_TEST_WORKERS:-$(nproc)}
if [ -z "${DICOMNODE_TEST_WORKERS:-}" ]; then
  workers=$(( workers < 2 ? 2 : (workers > 4 ? 4 : workers) ))
fi
if [ "$workers" = 0 ]; then
  exec .venv/bin/python -m pytest -q -ra "$@"
fi
exec .venv/bin/python -m pytest -q -ra -n "$workers" --dist loadfile "$@"
