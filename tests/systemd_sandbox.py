"""Run a command under the seccomp filter that a systemd unit's settings ask for.

There is no service manager in the test environment, so the tests cannot start the shipped
units; what would break the node in them is mostly their system-call filter. This module
reads a unit's ``SystemCallFilter=`` (allow-list groups such as ``@system-service``, resolved
by the installed ``systemd-analyze syscall-filter``, with ``@default`` added as systemd adds
it), ``SystemCallArchitectures=native`` and ``RestrictAddressFamilies=``, and loads the same
filter with libseccomp before it executes the command, so the command and every process it
starts (listeners, workers) run under it.

One difference on purpose: a call outside the allow-list kills the process (systemd would
answer it with the unit's ``SystemCallErrorNumber=``), so that a test sees every such call
instead of a library quietly coping with EPERM. Not emulated: the namespace-based settings
(``ProtectSystem=``, ``PrivateTmp=``, ``PrivateDevices=``, ...), ``RestrictNamespaces=`` and
``RestrictRealtime=``, whose calls the node never makes.

Usage: ``python tests/systemd_sandbox.py UNIT_FILE -- COMMAND [ARG...]``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

# libseccomp's actions (seccomp.h).
ACT_KILL_PROCESS = 0x80000000
ACT_ALLOW = 0x7FFF0000
CMP_EQ = 4
CMP_GE = 5


def act_errno(number: int) -> int:
    """SCMP_ACT_ERRNO: the call fails with ``number``."""
    return 0x00050000 | (number & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def unit_settings(text: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit file, values in file order (an empty assignment resets
    the list, as systemd does for list settings); comments and section headers left out."""
    settings: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        values = settings.setdefault(key.strip(), [])
        if value.strip():
            values.append(value.strip())
        else:
            values.clear()
    return settings


def syscall_groups(analyze: str) -> dict[str, list[str]]:
    """Each ``@group`` of the installed systemd and its members (names and ``@groups``)."""
    listing = subprocess.run(
        [analyze, "syscall-filter"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in listing.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif not line.strip() or not line.startswith(" "):
            current = None
        elif current is not None and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def expand(names: list[str], groups: dict[str, list[str]]) -> set[str]:
    """System call names of ``names`` (names and ``@groups``, nested groups followed)."""
    calls: set[str] = set()
    pending = list(names)
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        if name.startswith("@"):
            if name not in groups:
                raise ValueError(f"systemd-analyze knows no system call group {name}")
            pending.extend(groups[name])
        else:
            calls.add(name)
    return calls


def allowed_calls(settings: dict[str, list[str]], analyze: str) -> set[str]:
    """The system calls a unit's ``SystemCallFilter=`` lines allow (an allow-list only)."""
    names: list[str] = []
    for value in settings.get("SystemCallFilter", []):
        if value.startswith("~"):
            raise ValueError(f"deny-list filters are not emulated: SystemCallFilter={value}")
        names.extend(value.split())
    if not names:
        raise ValueError("the unit sets no SystemCallFilter=")
    # systemd starts an allow-list with @default.
    return expand(["@default", *names], syscall_groups(analyze))


def address_families(settings: dict[str, list[str]]) -> set[int]:
    """The socket families ``RestrictAddressFamilies=`` allows (an allow-list only)."""
    families: set[int] = set()
    for value in settings.get("RestrictAddressFamilies", []):
        if value.startswith("~"):
            raise ValueError(f"deny-lists are not emulated: RestrictAddressFamilies={value}")
        families.update(int(getattr(socket, name)) for name in value.split())
    return families


def load_filter(calls: set[str], families: set[int]) -> None:
    """Install the filter on this process (inherited by every child and kept across exec):
    ``calls`` allowed, ``socket()`` only for ``families`` (others EAFNOSUPPORT, as systemd
    answers them), any other call or another architecture's ABI kills the process."""
    path = ctypes.util.find_library("seccomp")
    if path is None:
        raise OSError("libseccomp not found")
    lib = ctypes.CDLL(path, use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    # The context holds the native architecture only: SystemCallArchitectures=native.
    context = lib.seccomp_init(ACT_KILL_PROCESS)
    if not context:
        raise OSError("seccomp_init failed")

    def rule(action: int, name: str, *conditions: tuple[int, int]) -> None:
        number = lib.seccomp_syscall_resolve_name(name.encode())
        if number == -1:  # a name libseccomp does not know at all
            return
        array = (_ArgCmp * max(1, len(conditions)))(
            *(_ArgCmp(0, op, datum, 0) for op, datum in conditions)
        )
        result = lib.seccomp_rule_add_array(context, action, number, len(conditions), array)
        if result < 0:
            raise OSError(-result, f"seccomp_rule_add {name}: {os.strerror(-result)}")

    for name in sorted(calls - {"socket"}):
        rule(ACT_ALLOW, name)
    if "socket" in calls:
        if families:
            refused = act_errno(errno.EAFNOSUPPORT)
            for family in range(max(families) + 1):
                action = ACT_ALLOW if family in families else refused
                rule(action, "socket", (CMP_EQ, family))
            rule(refused, "socket", (CMP_GE, max(families) + 1))
        else:
            rule(ACT_ALLOW, "socket")
    result = lib.seccomp_load(context)
    if result < 0:
        raise OSError(-result, f"seccomp_load: {os.strerror(-result)}")


def sandboxed(unit: Path, command: list[str]) -> list[str]:
    """The command line that runs ``command`` under ``unit``'s filter."""
    return [sys.executable, str(Path(__file__).resolve()), str(unit), "--", *command]


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    analyze = os.environ.get("SYSTEMD_ANALYZE", "systemd-analyze")
    settings = unit_settings(Path(argv[0]).read_text(encoding="utf-8"))
    calls = allowed_calls(settings, analyze)
    load_filter(calls, address_families(settings))
    os.execvp(argv[2], argv[2:])
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
