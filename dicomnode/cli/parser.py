"""The command line's arguments: ``build_parser`` for people, ``listener_parser`` for the
listener processes serve starts, and the argparse types they check values with."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from dicomnode import RESEARCH_DEMO_NOTICE, __version__
from dicomnode.cli.commands import (
    SCENARIOS,
    UPGRADE_NEEDED,
    cmd_check_config,
    cmd_config_reference,
    cmd_db,
    cmd_demo,
    cmd_destinations,
    cmd_jobs,
    cmd_models,
    cmd_simulate,
    cmd_synth,
    cmd_worklist,
)
from dicomnode.cli.node import cmd_listener, cmd_serve, cmd_worker
from dicomnode.cli.users import cmd_users

DEFAULT_CONFIG = Path(os.environ.get("DICOMNODE_CONFIG", "conf/dicomnode.toml"))
# Where the default comes from, for --help (argparse fills in %(default)s).
CONFIG_HELP = (
    "configuration file (default %(default)s, from the environment variable DICOMNODE_CONFIG)"
    if "DICOMNODE_CONFIG" in os.environ
    else "configuration file (default %(default)s; the environment variable DICOMNODE_CONFIG "
    "names another)"
)
HIDDEN_COMMAND = "listener"
MAX_TOKEN_DAYS = 36500


def _port_or_zero(text: str) -> int:
    """A TCP port number, or 0 for none (an argparse type)."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number 0-65535")
    return port


def _positive_seconds(text: str) -> float:
    """--timeout: a finite number of seconds above 0."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return seconds


def _token_days(text: str) -> float:
    """--days: 0 (no expiry) or a positive number of days, at most MAX_TOKEN_DAYS."""
    try:
        days = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days") from None
    if not 0 <= days <= MAX_TOKEN_DAYS:  # also refuses nan
        raise argparse.ArgumentTypeError(
            f"{text} days: give 0 (no expiry) or a number of days up to {MAX_TOKEN_DAYS}"
        )
    return days


class _Version(argparse.Action):
    """--version: the package version and the newest database schema revision this build
    has, e.g. "dicomnode 0.1.0 (database schema 0009)" (the revision read as it is asked
    for: other commands do not pay for reading the migrations)."""

    def __init__(self, option_strings: list[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        from dicomnode.db.session import newest_revision

        print(f"{parser.prog} {__version__} (database schema {newest_revision()})")
        parser.exit()


def _add_command(
    commands: argparse._SubParsersAction, name: str, help_text: str
) -> argparse.ArgumentParser:
    """A subcommand whose own --help starts with the line the command list shows for it
    (argparse shows a subparser's ``description`` only when given one)."""
    return commands.add_parser(
        name, help=help_text, description=help_text[:1].upper() + help_text[1:] + "."
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicomnode",
        description=f"DICOM AI triage node ({RESEARCH_DEMO_NOTICE}). Each command has --help.",
    )
    parser.add_argument(
        "--version",
        action=_Version,
        help="print the version and the newest database schema revision it knows, and exit",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def with_config(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument(
            "--config",
            type=Path,
            default=DEFAULT_CONFIG,
            help=CONFIG_HELP,
        )
        return sub

    serve = with_config(_add_command(commands, "serve", "run the DICOM listener, web and workers"))
    serve.add_argument("--workers", type=int, default=None, help="override [worker] count")
    serve.set_defaults(func=cmd_serve)

    worker = with_config(_add_command(commands, "worker", "run one job worker"))
    worker.add_argument(
        "--metrics-port",
        type=_port_or_zero,
        default=None,
        help="serve this worker's /metrics on this port, 0 = none (default: [worker] metrics_port)",
    )
    worker.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    worker.set_defaults(func=cmd_worker)

    check = _add_command(commands, "check-config", "validate the configuration and model cards")
    check.add_argument("config", type=Path, nargs="?", default=DEFAULT_CONFIG, help=CONFIG_HELP)
    # As every other command takes it.
    check.add_argument(
        "--config",
        dest="config_option",
        type=Path,
        metavar="CONFIG",
        help="configuration file, as the other commands take it (instead of the positional "
        "config; this one wins when both are given)",
    )
    check.set_defaults(func=cmd_check_config)

    worklist = with_config(_add_command(commands, "worklist", "print the reading worklist"))
    worklist.add_argument(
        "--limit",
        type=int,
        default=50,
        help="show the first this many studies (default %(default)s)",
    )
    worklist.set_defaults(func=cmd_worklist)

    models = with_config(_add_command(commands, "models", "list, verify or evaluate model cards"))
    models.add_argument(
        "models_command",
        choices=["list", "verify", "eval"],
        help="list: one line per model card; verify: load each card's ONNX file and check it "
        "against the card; eval: score MODEL on a synthetic data set (--data)",
    )
    models.add_argument(
        "model", nargs="?", default=None, help="eval: a card's model name or a card file"
    )
    models.add_argument(
        "--data", type=Path, default=None, help="eval: a folder written by 'dicomnode synth'"
    )
    models.add_argument(
        "--out",
        type=Path,
        default=None,
        help="eval: folder for metrics.json and plots (default DATA/eval/MODEL)",
    )
    models.add_argument(
        "--markdown", action="store_true", help="list: a Markdown table (as in the README)"
    )
    models.set_defaults(func=cmd_models)

    synth = _add_command(commands, "synth", "write synthetic phantoms")
    synth_kinds = synth.add_subparsers(dest="kind", required=True)
    cxr = _add_command(
        synth_kinds, "cxr", "chest X-ray phantoms (DX/CR, PA/AP/lateral) with ground truth"
    )
    from dicomnode.synth.cxr_cli import add_arguments as add_cxr_arguments

    add_cxr_arguments(cxr)
    cxr.set_defaults(func=cmd_synth)
    ct = _add_command(
        synth_kinds,
        "ct",
        "chest CT series (one folder of slices each) with ground_truth.jsonl + masks",
    )
    ct.add_argument("--n", type=int, required=True, help="number of series")
    ct.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output folder (a folder of slices per series, truth/ masks, ground_truth.jsonl)",
    )
    ct.add_argument("--seed", type=int, default=0, help="seed of the first series")
    ct.add_argument("--rows", type=int, default=256, help="rows = columns (default 256; 512)")
    ct.add_argument("--slices", type=int, default=64, help="slices per series (default 64)")
    ct.add_argument(
        "--slice-thickness", type=float, default=2.5, help="mm, e.g. 1, 1.25, 2.5, 5 (default 2.5)"
    )
    ct.add_argument(
        "--dose",
        choices=["standard", "low"],
        default="standard",
        help="noise level of the acquisition (default %(default)s)",
    )
    ct.add_argument("--noise-hu", type=float, default=None, help="noise sigma in HU (over --dose)")
    ct.add_argument("--nodules", default="1..4", help="nodules per series, MIN..MAX (default 1..4)")
    ct.add_argument(
        "--nodule-size", default="3..30", help="nodule diameter in mm, MIN..MAX (default 3..30)"
    )
    ct.add_argument("--no-progress", action="store_true", help="no progress bar")
    ct.set_defaults(func=cmd_synth)

    demo = _add_command(
        commands, "demo", "start a demo node, send synthetic studies, show the worklist live"
    )
    demo.add_argument("--studies", type=int, default=9, help="phantoms to send (default 9)")
    demo.add_argument("--port", type=int, default=11112, help="DICOM port (default 11112)")
    demo.add_argument("--web-port", type=int, default=8080, help="web port (default 8080)")
    demo.add_argument("--folder", type=Path, default=None, help="keep files here (default: temp)")
    demo.add_argument("--keep", action="store_true", help="keep the node running at the end")
    demo.set_defaults(func=cmd_demo)

    reference = _add_command(
        commands, "config-reference", "print the configuration reference (Markdown) from the schema"
    )
    reference.add_argument("--out", type=Path, default=None, help="write to this file")
    reference.set_defaults(func=cmd_config_reference)

    db = with_config(_add_command(commands, "db", "database maintenance"))
    db.add_argument(
        "db_command",
        choices=["upgrade", "current"],
        help="upgrade: bring the database schema to this version's newest migration (serve, "
        "worker and the commands that change users or jobs also do it as they start; those "
        "that only read refuse a database behind); current: print the database's schema "
        "revision and this version's newest, changing nothing: exit 0 when they are the "
        f"same, {UPGRADE_NEEDED} when an upgrade is needed, 1 when the database cannot be used",
    )
    db.set_defaults(func=cmd_db)

    jobs = _add_command(commands, "jobs", "list jobs, retry dead-lettered ones")
    jobs_commands = jobs.add_subparsers(dest="jobs_command", required=True)
    jobs_list = with_config(
        _add_command(jobs_commands, "list", "jobs in one state, newest first (default dead)")
    )
    jobs_list.add_argument(
        "--state",
        choices=["queued", "leased", "done", "dead"],
        default="dead",
        help="list the jobs in this state (default %(default)s)",
    )
    jobs_list.add_argument(
        "--limit", type=int, default=100, help="list at most this many (default %(default)s)"
    )
    jobs_retry = with_config(
        _add_command(
            jobs_commands,
            "retry",
            "queue dead jobs again with a fresh attempt budget (audited); one whose work another "
            "job covers (its object already re-sent, its study analysed again) is left, and said",
        )
    )
    jobs_retry.add_argument("ids", nargs="*", type=int, help="job ids (see 'jobs list')")
    jobs_retry.add_argument(
        "--all", action="store_true", help="every dead job (narrowed by --kind/--destination)"
    )
    for sub in (jobs_list, jobs_retry):
        sub.add_argument(
            "--kind",
            choices=["analyse", "results", "export", "notify"],
            help="jobs of this kind only",
        )
        sub.add_argument("--destination", help="export jobs to this destination only")
    jobs.set_defaults(func=cmd_jobs)

    destinations = _add_command(
        commands, "destinations", "list the [[destinations]], or check them by C-ECHO"
    )
    destinations_commands = destinations.add_subparsers(dest="destinations_command", required=True)
    with_config(
        _add_command(
            destinations_commands,
            "list",
            "name, AE@host:port, TLS, outputs and timeout of each destination",
        )
    )
    destinations_echo = with_config(
        _add_command(
            destinations_commands,
            "echo",
            "C-ECHO each destination (or the named ones) from [node] ae_title; "
            "exit 1 unless all answer",
        )
    )
    destinations_echo.add_argument(
        "names", nargs="*", metavar="NAME", help="destinations to check (default: all)"
    )
    destinations_echo.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=None,
        help="seconds to wait for each step (default: each destination's timeout_seconds)",
    )
    destinations.set_defaults(func=cmd_destinations)

    users = _add_command(commands, "users", "local web users and API tokens")
    users_commands = users.add_subparsers(dest="users_command", required=True)
    users_add = with_config(_add_command(users_commands, "add", "add a user"))
    users_add.add_argument("name", help="the user's log-in name")
    users_add.add_argument(
        "--role",
        choices=["radiologist", "admin"],
        required=True,
        help="admins may also read the audit log and retry jobs over the API",
    )
    users_add.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    users_token = with_config(
        _add_command(users_commands, "token", "print a new API bearer token for a user")
    )
    users_token.add_argument("name", help="the user's log-in name")
    users_token.add_argument(
        "--days",
        type=_token_days,
        default=30,
        help="valid for this many days; 0 = no expiry (default %(default)s)",
    )
    for name, help_text in (
        ("disable", "refuse a user's log-in, sessions and tokens (until enabled)"),
        ("enable", "let a disabled user in again"),
        ("revoke", "end every API token and log-in session of a user"),
    ):
        with_config(_add_command(users_commands, name, help_text)).add_argument(
            "name", help="the user's log-in name"
        )
    users_password = with_config(
        _add_command(
            users_commands,
            "password",
            "set a user's new password; ends their log-in sessions and API tokens",
        )
    )
    users_password.add_argument("name", help="the user's log-in name")
    users_password.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    users_password.add_argument(
        "--keep-tokens",
        action="store_true",
        help="keep the user's API tokens (log-in sessions end anyway)",
    )
    with_config(_add_command(users_commands, "list", "list users and roles"))
    users.set_defaults(func=cmd_users)

    simulate = _add_command(
        commands, "simulate", "reading-room simulation: FIFO against the worklist policy"
    )
    simulate.add_argument(
        "--scenario", type=Path, default=None, help=f"scenario TOML (default: all in {SCENARIOS})"
    )
    simulate.add_argument("--days", type=int, default=None, help="days measured (default: file)")
    simulate.add_argument("--seed", type=int, default=None, help="random seed (default: file)")
    simulate.add_argument("--plot", type=Path, default=None, help="write a PNG bar chart here")
    simulate.add_argument(
        "--false-positive-rate",
        type=float,
        default=None,
        help="set every finding's specificity to 1 - this (e.g. 0.1)",
    )
    simulate.set_defaults(func=cmd_simulate)
    return parser


def listener_parser() -> argparse.ArgumentParser:
    """``dicomnode listener``: one of the listener processes ``serve`` starts, not for
    people, so kept out of the public parser (its usage, help and invalid-choice list)."""
    listener = argparse.ArgumentParser(prog=f"dicomnode {HIDDEN_COMMAND}")
    listener.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    listener.add_argument("--index", type=int, default=0)
    listener.add_argument("--slots", type=Path, default=None)
    listener.add_argument("--connections", type=Path, default=None)
    listener.add_argument("--socket-fd", type=int, default=None)
    listener.add_argument("--index-fd", type=int, default=None)
    listener.set_defaults(func=cmd_listener)
    return listener
