"""Folders the node makes (storage, the SQLite database's folder, the workers' wake-up
sockets): owner and group only, whatever the umask outside systemd, as the units' UMask=0027
makes them; folders that exist (an admin's) are left as they are."""

from __future__ import annotations

import errno
import os
from pathlib import Path

# Every folder the node makes under its storage path and for its SQLite database: the
# node's account and its group, nobody else (a storage folder's name is a Study or Series
# Instance UID; other users of the machine may not list them). What systemd's UMask=0027
# gives, also under a shell's umask 022; a stricter umask (077) still wins.
FOLDER_MODE = 0o750


def make_folders(folder: Path) -> list[Path]:
    """Make ``folder`` and its missing parents, each with :data:`FOLDER_MODE` (less the
    umask); folders that exist (an admin's) keep their mode. Returns the folders that were
    missing when it looked, outermost first (made by this call or by a concurrent one)."""
    missing = []
    probe = folder
    while not probe.exists() and probe.parent != probe:
        missing.append(probe)
        probe = probe.parent
    missing.reverse()
    for path in missing:
        try:
            # mode= at creation, not a chmod after: no moment with wider permissions.
            path.mkdir(mode=FOLDER_MODE)
        except FileExistsError:
            if not path.is_dir():
                raise
    if not missing and not folder.is_dir():
        # As mkdir(exist_ok=True) says of a file in the folder's place.
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(folder))
    return missing
