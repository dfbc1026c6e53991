"""Folders the node makes under its storage path and for its SQLite database are its
account's and its group's only (0750), also outside systemd under a shell's umask 022:
their names are Study and Series Instance UIDs, which other users of the machine may not
list. Files keep their own modes (received instances and the database 0600)."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from conftest import (
    RunningNode,
    launch_node,
    stop_process,
    wait_for,
    write_config,
)

from dicomnode.folders import make_folders
from dicomnode.synth.cxr import make_cxr


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """This process's umask (and its children's) set to ``mask`` for the block."""
    before = os.umask(mask)
    try:
        yield
    finally:
        os.umask(before)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _tree(root: Path) -> tuple[list[Path], list[Path]]:
    """Every folder (``root`` included) and every plain file under ``root``."""
    folders, files = [root], []
    for parent, names, file_names in os.walk(root):
        folders.extend(Path(parent) / name for name in names)
        files.extend(Path(parent) / name for name in file_names if (Path(parent) / name).is_file())
    return folders, files


def test_node_folders_keep_other_users_out_under_umask_022(tmp_path: Path) -> None:
    # Neither the storage path nor the database's folder exists: the node makes them,
    # and their parent var/ too.
    var = tmp_path / "var"
    storage = var / "storage"
    database = var / "db" / "dicomnode.db"
    config, port, web_port = write_config(tmp_path, f"sqlite:///{database}")
    config.write_text(config.read_text().replace(str(tmp_path / "storage"), str(storage)))
    ds, _ = make_cxr(920_001, pneumothorax=True, accession_number="ACC-PERM")
    study_uid = str(ds.StudyInstanceUID)
    sent_file = tmp_path / "study.dcm"
    ds.save_as(sent_file, enforce_file_format=True)

    with umask(0o022):
        process, log = launch_node(tmp_path, config, port, web_port)
    try:
        node = RunningNode(config, "DICOMNODE", port, web_port, storage, log, process)
        sent = node.storescu(sent_file)
        assert sent.returncode == 0, sent.stderr
        # The results job has written its objects under storage/results/<study>/<series>/,
        # and an idle worker waits on its socket beside the database.
        wait_for(
            lambda: list((storage / "results" / study_uid).glob("*/*.dcm")),
            timeout=120,
            what="result objects written",
        )
        wait_for(
            lambda: (database.parent / "dicomnode.db-workers").is_dir(),
            what="the workers' wake-up folder",
        )
    finally:
        stop_process(process)

    assert list(storage.glob(f"{study_uid}/*/*.dcm")), "the received instance is stored"
    assert (storage / ".incoming").is_dir()
    folders, files = _tree(var)
    assert storage in folders and database.parent in folders
    assert database.parent / "dicomnode.db-workers" in folders
    wider = {str(folder.relative_to(tmp_path)): oct(_mode(folder)) for folder in folders}
    assert all(mode == "0o750" for mode in wider.values()), wider
    readable = {
        str(file.relative_to(tmp_path)): oct(_mode(file))
        for file in files
        if _mode(file) & stat.S_IRWXO
    }
    assert not readable, readable
    assert _mode(database) == 0o600
    for instance in storage.glob(f"{study_uid}/*/*.dcm"):
        assert _mode(instance) == 0o600, instance


def test_make_folders_leaves_an_admins_folder_as_it_is(tmp_path: Path) -> None:
    admins = tmp_path / "dicomnode"
    admins.mkdir(mode=0o755)
    admins.chmod(0o755)
    with umask(0o022):
        made = make_folders(admins / "storage" / "1.2.3")
    assert made == [admins / "storage", admins / "storage" / "1.2.3"]
    assert _mode(admins) == 0o755
    assert _mode(admins / "storage") == 0o750
    assert _mode(admins / "storage" / "1.2.3") == 0o750
    # A stricter umask still wins; a folder already there is not made again.
    with umask(0o077):
        assert make_folders(admins / "storage" / "1.2.4") == [admins / "storage" / "1.2.4"]
        assert make_folders(admins / "storage") == []
    assert _mode(admins / "storage" / "1.2.4") == 0o700
