"""The command line as an operator runs it: ``python -m dicomnode`` in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_config

DICOMNODE = [sys.executable, "-m", "dicomnode"]


def run_cli(*arguments: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """``dicomnode ARGUMENTS`` without a controlling terminal; ``stdin`` piped, else empty."""
    return subprocess.run(
        [*DICOMNODE, *arguments],
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,  # no /dev/tty, as under cron, systemd or ssh without -t
    )


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A node configuration on a fresh SQLite database."""
    path, _, _ = write_config(tmp_path, f"sqlite:///{tmp_path / 'dicomnode.db'}")
    return path


def test_users_add_without_a_terminal_says_how_to_give_the_password(config: Path) -> None:
    added = run_cli("users", "add", "carol", "--role", "radiologist", "--config", str(config))
    # users password asks the same way (the password is read before the user is looked up).
    changed = run_cli("users", "password", "carol", "--config", str(config))
    for refused in (added, changed):
        assert refused.returncode != 0
        assert "Traceback" not in refused.stderr
        assert refused.stderr.strip().splitlines() == [
            "error: no terminal to ask for the password on; "
            "give it on standard input with --password-stdin"
        ]
    # The listing, in a process that then says which of the model cards' imports it paid for:
    # none (users, db and jobs commands load no cards; numpy alone is ~0.1 s a process).
    script = (
        "import sys\nfrom dicomnode.cli.main import main\ncode = main(sys.argv[1:])\n"
        "print(*sorted({'numpy', 'dicomnode.models.registry'} & set(sys.modules)))\n"
        "sys.exit(code)"
    )
    # (users list only reads: the database is made first.)
    assert run_cli("db", "upgrade", "--config", str(config)).returncode == 0
    listed = subprocess.run(
        [sys.executable, "-c", script, "users", "list", "--config", str(config)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.strip() == "", f"no user expected, nor these imports: {listed.stdout}"


def test_help_lists_only_the_commands_for_people() -> None:
    """The listener processes' own subcommand runs but is not offered in the help."""
    shown = run_cli("--help")
    assert shown.returncode == 0
    assert "==SUPPRESS==" not in shown.stdout
    assert "listener " not in shown.stdout and ",listener," not in shown.stdout
    for command in ("serve", "worker", "users", "simulate"):
        assert f"\n    {command} " in shown.stdout, command
    assert "{serve,worker," in shown.stdout
    hidden = run_cli("listener", "--help")
    assert hidden.returncode == 0
    assert "--socket-fd" in hidden.stdout
    wrong = run_cli("lisener")
    assert wrong.returncode == 2
    assert "invalid choice: 'lisener'" in wrong.stderr
    assert "listener" not in wrong.stderr


def test_version_names_the_package_version_and_newest_schema_revision() -> None:
    """Two builds of one package version are told apart by the schema they migrate to."""
    from alembic.script import ScriptDirectory

    from dicomnode import __version__
    from dicomnode.db.session import alembic_config

    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    shown = run_cli("--version")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == f"dicomnode {__version__} (database schema {head})\n"
    assert "--version" in run_cli("--help").stdout


def test_db_upgrade_names_the_revision_it_left_the_database_at(config: Path) -> None:
    from dicomnode.db.session import schema_revision

    first = run_cli("db", "upgrade", "--config", str(config))
    assert first.returncode == 0, first.stderr
    head = schema_revision(f"sqlite:///{config.parent / 'dicomnode.db'}")
    assert head
    assert first.stdout.strip() == f"database schema upgraded from empty to revision {head}"
    again = run_cli("db", "upgrade", "--config", str(config))
    assert again.stdout.strip() == f"database schema is up to date (revision {head})"
    # Patient data: the database and its WAL files are the node account's alone.
    for path in config.parent.glob("dicomnode.db*"):
        assert path.stat().st_mode & 0o077 == 0, (path.name, oct(path.stat().st_mode))


def _dead_jobs(url: str) -> dict[str, int]:
    """A study with dead export jobs to 'pacs' (two objects, the second a SEG whose row is
    there, the first's gone) and 'archive', and a dead analysis."""
    from dicomnode.db.models import Job, ResultObject, Study
    from dicomnode.db.session import make_engine, make_sessionmaker, utcnow

    now = utcnow()
    with make_sessionmaker(make_engine(url))() as session:
        study = Study(
            study_instance_uid="1.2.826.0.1.3680043.8.498.1",
            received_at=now,
            last_instance_at=now,
            ready_at=now,
            due_at=now,
            analysis_status="failed",
        )
        session.add(study)
        session.flush()
        session.add(
            ResultObject(
                id=1,
                study_id=study.id,
                kind="sr",
                model_name="m",
                model_version="1",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.88.22",
                sop_instance_uid="1.2.826.0.1.3680043.8.498.4",
                series_instance_uid="1.2.826.0.1.3680043.8.498.5",
                path="/nowhere/sr.dcm",
                created_at=now,
            )
        )
        session.add(
            ResultObject(
                id=2,
                study_id=study.id,
                kind="seg",
                model_name="m",
                model_version="1",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
                sop_instance_uid="1.2.826.0.1.3680043.8.498.2",
                series_instance_uid="1.2.826.0.1.3680043.8.498.3",
                path="/nowhere/seg.dcm",
                created_at=now,
            )
        )
        jobs = {}
        for name, kind, destination, result_id in [
            ("pacs-1", "export", "pacs", 1),
            ("pacs-2", "export", "pacs", 2),
            ("archive", "export", "archive", 1),
            # Its result object superseded by a later version (the row gone): no retry needed.
            ("pacs-gone", "export", "pacs", 3),
            ("analysis", "analyse", None, None),
        ]:
            payload = {"destination": destination, "result_id": result_id} if destination else {}
            job = Job(
                kind=kind,
                study_id=study.id,
                payload=payload,
                state="dead",
                attempts=5,
                run_after=now,
                last_error=f"{name} failed",
                created_at=now,
                finished_at=now,
            )
            session.add(job)
            session.flush()
            jobs[name] = job.id
        session.commit()
    return jobs


def _states(url: str) -> dict[int, str]:
    from sqlalchemy import select

    from dicomnode.db.models import Job
    from dicomnode.db.session import make_engine, make_sessionmaker

    with make_sessionmaker(make_engine(url))() as session:
        return dict(session.execute(select(Job.id, Job.state)).all())


def test_jobs_list_and_retry_dead_letters_by_destination_or_id(config: Path) -> None:
    """An admin whose PACS is back queues its dead exports again in one command, audited;
    other dead jobs stay dead until named."""
    url = f"sqlite:///{config.parent / 'dicomnode.db'}"
    assert run_cli("db", "upgrade", "--config", str(config)).returncode == 0
    jobs = _dead_jobs(url)
    listed = run_cli("jobs", "list", "--destination", "pacs", "--config", str(config))
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.strip().splitlines()
    assert [int(line.split("\t")[0]) for line in lines] == [
        jobs["pacs-gone"],
        jobs["pacs-2"],
        jobs["pacs-1"],
    ]
    # What each export sends, where its result object is known.
    assert "export -> pacs\tdead\tattempts 5" in lines[0]
    assert lines[0].endswith(
        "pacs-gone failed\tno retry needed: result object 3 was superseded by a later version"
    )
    assert "export -> pacs (seg: Segmentation Storage)\tdead\tattempts 5" in lines[1]
    assert lines[1].endswith("pacs-2 failed")
    assert "export -> pacs (sr: Enhanced SR Storage)\tdead\tattempts 5" in lines[2]
    retried = run_cli("jobs", "retry", "--all", "--destination", "pacs", "--config", str(config))
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.strip().splitlines() == [
        f"job {jobs['pacs-gone']} is not queued again: result object 3 was superseded by a "
        "later version",
        "2 dead job(s) queued again, 1 already covered by other jobs",
    ]
    states = _states(url)
    assert [states[jobs[name]] for name in ("pacs-1", "pacs-2")] == ["queued", "queued"]
    assert [states[jobs[name]] for name in ("archive", "analysis", "pacs-gone")] == ["dead"] * 3
    # By id; a job that is not dead is refused and nothing is retried.
    refused = run_cli(
        "jobs", "retry", str(jobs["analysis"]), str(jobs["pacs-1"]), "--config", str(config)
    )
    assert refused.returncode == 1
    assert f"job {jobs['pacs-1']} is queued, not dead" in refused.stderr
    assert _states(url)[jobs["analysis"]] == "dead"
    assert run_cli("jobs", "retry", str(jobs["analysis"]), "--config", str(config)).returncode == 0
    assert _states(url)[jobs["analysis"]] == "queued"
    assert run_cli("jobs", "retry", "--config", str(config)).returncode == 2
    from sqlalchemy import select

    from dicomnode.db.models import AuditEntry, Study
    from dicomnode.db.session import make_engine, make_sessionmaker

    with make_sessionmaker(make_engine(url))() as session:
        audited = session.scalars(
            select(AuditEntry.detail).where(AuditEntry.action == "retry_job")
        ).all()
        assert len(audited) == 3
        assert session.scalars(select(Study.analysis_status)).one() == "queued"


def _commands(parser, words: tuple[str, ...] = ()):
    """Each command and subcommand of ``parser``: its words and its own parser."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*words, name), sub
                yield from _commands(sub, (*words, name))


def test_every_command_option_and_argument_says_what_it_is() -> None:
    """Each command's own --help opens with what it does, as the command list says it, and
    every argument it takes has a description (argparse shows neither unless given)."""
    import argparse

    from dicomnode.cli.parser import build_parser

    undescribed = []
    for words, sub in _commands(build_parser()):
        if not sub.description:
            undescribed.append(" ".join(words))
        for action in sub._actions:
            if not isinstance(action, argparse._SubParsersAction) and not action.help:
                undescribed.append(f"{' '.join(words)} {action.option_strings or action.dest}")
    assert undescribed == []
    # As an operator sees it.
    worker = run_cli("worker", "--help")
    assert worker.returncode == 0, worker.stderr
    assert worker.stdout.split("\n\n")[1] == "Run one job worker."
    token = run_cli("users", "token", "--help")
    assert "0 = no expiry (default 30)" in " ".join(token.stdout.split())


def test_config_help_names_the_environment_variable_and_the_default() -> None:
    import os

    environment = {k: v for k, v in os.environ.items() if k != "DICOMNODE_CONFIG"}
    for words in (("check-config",), ("users", "list"), ("worklist",)):
        shown = subprocess.run(
            [*DICOMNODE, *words, "--help"], capture_output=True, text=True, env=environment
        )
        text = " ".join(shown.stdout.split())
        assert (
            "configuration file (default conf/dicomnode.toml; the environment variable "
            "DICOMNODE_CONFIG names another)" in text
        ), (words, text)
    set_by_environment = subprocess.run(
        [*DICOMNODE, "check-config", "--help"],
        capture_output=True,
        text=True,
        env={**environment, "DICOMNODE_CONFIG": "/etc/dicomnode/node.toml"},
    )
    text = " ".join(set_by_environment.stdout.split())
    assert (
        "config configuration file (default /etc/dicomnode/node.toml, from the environment "
        "variable DICOMNODE_CONFIG)" in text
    ), text
    assert "the same as CONFIG" not in text


def test_synth_ct_no_progress_prints_no_bar(tmp_path: Path) -> None:
    options = ("--n", "1", "--rows", "64", "--slices", "8")
    with_bar = run_cli("synth", "ct", *options, "--out", str(tmp_path / "bar"))
    assert with_bar.returncode == 0, with_bar.stderr
    assert "CT series: 100%" in with_bar.stderr
    quiet = run_cli("synth", "ct", *options, "--out", str(tmp_path / "quiet"), "--no-progress")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""
    assert quiet.stdout.startswith("wrote 1 chest CT series to ")
    assert (tmp_path / "quiet" / "ground_truth.jsonl").is_file()
