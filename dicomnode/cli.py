"""Command line: ``dicomnode <command>``, one function per command (``cmd_*``)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from dicomnode import RESEARCH_DEMO_NOTICE, __version__
from dicomnode.config import Settings, load_settings
from dicomnode.db.errors import DatabaseUnusable
from dicomnode.tomlfile import ConfigError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from dicomnode.models.registry import ModelCard

log = logging.getLogger("dicomnode")

DEFAULT_CONFIG = Path(os.environ.get("DICOMNODE_CONFIG", "conf/dicomnode.toml"))
SCENARIOS = Path("conf/scenarios")
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


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def _cards(settings: Settings) -> list[ModelCard]:
    # Imported here: the cards' models and numpy are for the commands that load cards, not
    # for users, db or jobs (~0.1 s a process).
    from dicomnode.models.registry import discover_cards

    return discover_cards(settings.model_folders)


def _database(settings: Settings):
    from dicomnode.db.session import make_engine, make_sessionmaker, upgrade

    upgrade(settings.database_url)
    return make_sessionmaker(make_engine(settings.database_url))


def cmd_check_config(args: argparse.Namespace) -> int:
    from dicomnode.checkconfig import check_all, config_warnings

    settings, cards, problems = check_all(args.config_option or args.config)
    for problem in problems:
        print(f"configuration error: {problem}", file=sys.stderr)
    if settings is None or problems:
        return 2
    for warning in config_warnings(settings):
        print(f"warning: {warning}", file=sys.stderr)
    print(
        f"{args.config_option or args.config}: OK ({len(cards)} model card(s), "
        f"{len(settings.destinations)} destination(s), {len(settings.peers)} peer(s))"
    )
    return 0


def _leave(code: int) -> NoReturn:
    """End a long-running command's process once its work is stopped and flushed, without
    the interpreter's teardown of its modules: 0.3-0.5 s of CPU for each of a node's
    processes (serve, listeners, workers) at every stop and restart, which on two cores
    made a stop take 1.3-1.9 s. Log handlers and the standard streams are flushed first;
    the commands register no exit handlers of their own that this skips (a listener's
    spare files are removed by its stop)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_serve(args: argparse.Namespace) -> int:
    from dicomnode.sigint import Terminated, interrupt_start_up

    interrupt_start_up()
    try:
        from dicomnode.serve import run_serve

        code = run_serve(Path(args.config), args.workers)
    except Terminated:
        # A SIGTERM while serve started, before its web server took it as a stop: what had
        # started is stopped by now (run_serve's clean-up); 0, as after a stop.
        code = 0
    except KeyboardInterrupt:
        # A Ctrl-C while serve started, before its web server took SIGINT as a stop: what
        # had started is stopped by now (run_serve's clean-up); no traceback.
        code = 130
    _leave(code)


def cmd_listener(args: argparse.Namespace) -> int:
    from dicomnode.ingest.listeners import run_listener

    _leave(
        run_listener(
            Path(args.config),
            args.index,
            args.slots,
            args.connections,
            args.socket_fd,
            args.index_fd,
        )
    )


def cmd_worker(args: argparse.Namespace) -> int:
    from dicomnode.logs import setup_logging
    from dicomnode.worker import Worker

    # A SIGHUP before the handler below is installed must not kill the worker.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Run by itself, a Ctrl-C does what SIGTERM does: it ends the worker at once while it
    # starts (no KeyboardInterrupt traceback), then stops it; unless SIGINT came ignored
    # (a shell script's background job), as it stays.
    stop_on_sigint = (
        args.parent_pid is None and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
    )
    if stop_on_sigint:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    elif args.parent_pid is not None:
        from dicomnode.sigint import leave_sigint_to_supervisor

        leave_sigint_to_supervisor()
    settings = _settings(args)
    setup_logging(settings.log_level, settings.logging.json_lines)
    worker = Worker(settings, _database(settings), _cards(settings))
    # Serve's workers report through the node's /metrics; one run by itself serves its own.
    if args.parent_pid is None:
        metrics_port = settings.worker.metrics_port
        if args.metrics_port is not None:
            metrics_port = args.metrics_port
            worker.restart_only = tuple(
                name for name in worker.restart_only if name != "worker.metrics_port"
            )
        if metrics_port:
            worker.serve_metrics(metrics_port)
    worker.warm_up()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if stop_on_sigint:
        signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: worker.reload_requested.set())
    worker.run_forever(
        stop,
        parent_pid=args.parent_pid,
        ready=lambda: log.info("worker %s ready (%s)", worker.owner, RESEARCH_DEMO_NOTICE),
    )
    _leave(0)


def cmd_worklist(args: argparse.Namespace) -> int:
    from dicomnode.db.session import utcnow
    from dicomnode.worklist.service import reading_order

    settings = _settings(args)
    with _database(settings)() as session:
        rows = reading_order(session, limit=args.limit, site=settings.worklist)
    now = utcnow()
    print(f"AI triage: {RESEARCH_DEMO_NOTICE}")
    header = f"{'#':>3}  {'PRIORITY':<9} {'WAIT':>7}  {'MOD':<4} {'ACCESSION':<16} REASON"
    print(header)
    for number, row in enumerate(rows, 1):
        wait = int((now - row.received_at).total_seconds() // 60)
        print(
            f"{number:>3}  {row.priority.upper():<9} {wait:>5}m  {row.modality:<4} "
            f"{row.accession_number:<16} {row.reason}"
        )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    settings = _settings(args)
    cards = _cards(settings)
    if args.models_command == "eval":
        from dicomnode.evaluation.command import run as run_eval

        if not args.model or args.data is None:
            print("error: models eval needs MODEL and --data DIR", file=sys.stderr)
            return 2
        return run_eval(args.model, args.data, args.out, cards)
    if args.model or args.data is not None or args.out is not None:
        print("error: MODEL, --data and --out are for 'models eval'", file=sys.stderr)
        return 2
    if args.models_command == "list":
        from dicomnode.models.summary import list_line, markdown_table

        if args.markdown:
            print(markdown_table(cards))
            if any(card.model.research_demo for card in cards):
                print("\nResearch demo models, not for clinical use.")
            return 0
        for card in cards:
            print(list_line(card))
        return 0
    from dicomnode.models.verify import verify_cards

    verdicts = verify_cards(cards, settings.worker.providers)
    for verdict in verdicts:
        print(verdict.line(), file=sys.stdout if verdict.ok else sys.stderr)
    return 0 if all(verdict.ok for verdict in verdicts) else 1


def cmd_synth(args: argparse.Namespace) -> int:
    if args.kind == "ct":
        from dicomnode.synth.ct import synth_command

        return synth_command(args)
    from dicomnode.synth.cxr_cli import run

    return run(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from dicomnode.demo import run_demo

    return run_demo(args.studies, args.port, args.web_port, args.keep, args.folder)


def cmd_config_reference(args: argparse.Namespace) -> int:
    from dicomnode.configdoc import reference

    text = reference()
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text, encoding="utf-8")
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    from dicomnode.db.session import upgrade

    settings = _settings(args)
    before, after = upgrade(settings.database_url)
    if before == after:
        print(f"database schema is up to date (revision {after})")
    else:
        print(f"database schema upgraded from {before or 'empty'} to revision {after}")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    """List jobs in a state, or retry dead-lettered ones (by id, or all that match)."""
    import getpass

    from dicomnode.db.models import Job
    from dicomnode.db.session import as_utc, utcnow
    from dicomnode.jobs.dead_letters import job_destination, jobs_in_state, retry_dead

    settings = _settings(args)
    with _database(settings)() as session:
        if args.jobs_command == "list":
            rows = jobs_in_state(session, args.state, args.kind, args.destination, args.limit)
            for job, uid in rows:
                where = f" -> {job_destination(job)}" if job.kind == "export" else ""
                print(
                    f"{job.id}\t{job.kind}{where}\t{job.state}\tattempts {job.attempts}\t"
                    f"{as_utc(job.run_after):%Y-%m-%d %H:%M:%S}Z\tstudy {uid}\t"
                    f"{job.last_error}"
                )
            print(f"{len(rows)} job(s) {args.state}", file=sys.stderr)
            return 0
        if args.ids and (args.all or args.kind or args.destination):
            print("error: give job ids, or --all with --kind/--destination", file=sys.stderr)
            return 2
        if args.ids:
            jobs = [session.get(Job, job_id) for job_id in args.ids]
            missing = [i for i, job in zip(args.ids, jobs, strict=True) if job is None]
            not_dead = [job for job in jobs if job is not None and job.state != "dead"]
            if missing or not_dead:
                for job_id in missing:
                    print(f"error: no job {job_id}", file=sys.stderr)
                for job in not_dead:
                    print(f"error: job {job.id} is {job.state}, not dead", file=sys.stderr)
                return 1
        elif args.all:
            jobs = [job for job, _ in jobs_in_state(session, "dead", args.kind, args.destination)]
        else:
            print("error: give job ids, or --all (with --kind/--destination)", file=sys.stderr)
            return 2
        now = utcnow()
        for job in jobs:
            retry_dead(session, job, f"cli:{getpass.getuser()}", now)
        session.commit()
    print(f"{len(jobs)} dead job(s) queued again")
    return 0


def cmd_destinations(args: argparse.Namespace) -> int:
    """List the configured destinations, or C-ECHO them (all, or the named ones)."""
    # Imported here, as every command's own modules are (echo imports pynetdicom only as
    # it echoes).
    from dicomnode.export.echo import columns, echo, line, list_columns, widths

    settings = _settings(args)
    destinations = settings.destinations
    if not destinations:
        print(f"error: no [[destinations]] in {args.config}", file=sys.stderr)
        return 2
    if args.destinations_command == "list":
        rows = [list_columns(destination) for destination in destinations]
        column_widths = widths(rows)
        for row in rows:
            print(line(row, column_widths))
        return 0
    by_name = {destination.name: destination for destination in destinations}
    unknown = [name for name in args.names if name not in by_name]
    if unknown:
        for name in unknown:
            print(
                f"error: no destination {name!r} in {args.config} "
                f"(configured: {', '.join(by_name)})",
                file=sys.stderr,
            )
        return 2
    chosen = [by_name[name] for name in dict.fromkeys(args.names)] or destinations
    column_widths = widths([columns(destination) for destination in chosen])
    answered = True
    for destination in chosen:
        timeout = args.timeout if args.timeout is not None else destination.timeout_seconds
        outcome = echo(destination, settings.node.ae_title, timeout, settings.base_dir)
        answered = answered and outcome.answered
        # Each as it comes: a destination that does not answer takes up to its timeout.
        print(line((*columns(destination), outcome.outcome), column_widths), flush=True)
    return 0 if answered else 1


def _positive_seconds(text: str) -> float:
    """--timeout: a finite number of seconds above 0."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return seconds


def _has_terminal() -> bool:
    """Whether getpass can ask without echo: a controlling terminal, or stdin is one."""
    try:
        os.close(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY))
    except OSError:
        return sys.stdin.isatty()
    return True


def _read_password(args: argparse.Namespace) -> str:
    """The password from standard input (--password-stdin), else asked twice on the terminal."""
    import getpass

    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not _has_terminal():
        raise SystemExit(
            "error: no terminal to ask for the password on; "
            "give it on standard input with --password-stdin"
        )
    try:
        password = getpass.getpass(f"password for {args.name}: ")
        again = getpass.getpass("again: ")
    except EOFError:
        raise SystemExit("error: no password given; nothing changed") from None
    if again != password:
        raise SystemExit("passwords differ; nothing changed")
    return password


def _users_add(session: Session, args: argparse.Namespace) -> str:
    from dicomnode.db.session import utcnow
    from dicomnode.users import add_user

    add_user(session, args.name, args.role, _read_password(args), utcnow())
    return f"added {args.role} {args.name}"


def _users_token(session: Session, args: argparse.Namespace) -> str:
    from datetime import timedelta

    from dicomnode.db.session import utcnow
    from dicomnode.users import issue_token

    lifetime = timedelta(days=args.days) if args.days else None
    # The token goes to stdout only, never to the log; it is not stored in clear.
    return issue_token(session, args.name, utcnow(), lifetime=lifetime)


def _users_disable(session: Session, args: argparse.Namespace) -> str:
    from dicomnode.users import set_disabled

    set_disabled(session, args.name, True)
    return f"disabled {args.name}: log-in, sessions and tokens refused until 'users enable'"


def _users_enable(session: Session, args: argparse.Namespace) -> str:
    from dicomnode.users import set_disabled

    set_disabled(session, args.name, False)
    return f"enabled {args.name}"


def _users_password(session: Session, args: argparse.Namespace) -> str:
    from dicomnode.users import set_password

    change = set_password(session, args.name, _read_password(args), keep_tokens=args.keep_tokens)
    tokens = (
        "API tokens kept" if args.keep_tokens else f"{change.tokens_revoked} API token(s) ended"
    )
    return (
        f"changed the password of {args.name}; "
        f"{change.sessions_revoked} log-in session(s) and {tokens}"
    )


def _users_revoke(session: Session, args: argparse.Namespace) -> str:
    from dicomnode.users import revoke_tokens

    count = revoke_tokens(session, args.name)
    return f"revoked {count} token(s) and session(s) of {args.name}"


def _users_list(session: Session, args: argparse.Namespace) -> str:
    from dicomnode.users import list_users

    lines = []
    for user in list_users(session):
        state = " (disabled)" if user.disabled else ""
        lines.append(f"{user.username:<24} {user.role}{state}")
    return "\n".join(lines)


USERS_COMMANDS = {
    "add": _users_add,
    "token": _users_token,
    "disable": _users_disable,
    "enable": _users_enable,
    "password": _users_password,
    "revoke": _users_revoke,
    "list": _users_list,
}


def cmd_users(args: argparse.Namespace) -> int:
    from dicomnode.users import UserError

    settings = _settings(args)
    with _database(settings)() as session:
        try:
            output = USERS_COMMANDS[args.users_command](session, args)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if args.users_command != "list":
            _audit_users_command(session, args)
        session.commit()
    if output:
        print(output)
    return 0


def _audit_users_command(session: Session, args: argparse.Namespace) -> None:
    """Record a change to the web users in the audit log, in its transaction: action
    ``user_<command>``, actor the operating-system account that ran it (no secret)."""
    import getpass

    from dicomnode.db.session import utcnow
    from dicomnode.worklist import audit

    detail = f"user {args.name}"
    if args.users_command == "add":
        detail += f", role {args.role}"
    elif args.users_command == "token":
        detail += f", {args.days:g} days" if args.days else ", no expiry"
    audit.record(
        session, f"cli:{getpass.getuser()}", f"user_{args.users_command}", utcnow(), detail=detail
    )


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


def cmd_simulate(args: argparse.Namespace) -> int:
    from dicomnode.simulate.engine import Unstable, simulate
    from dicomnode.simulate.report import describe, evaluate, format_table, write_plot
    from dicomnode.simulate.scenario import load_scenario

    paths = [args.scenario] if args.scenario else sorted(SCENARIOS.glob("*.toml"))
    if not paths:
        print(f"no scenario given and none in {SCENARIOS}", file=sys.stderr)
        return 2
    results = []
    for path in paths:
        scenario = load_scenario(path)
        if args.false_positive_rate is not None:
            scenario = scenario.with_false_positive_rate(args.false_positive_rate)
        days = args.days if args.days is not None else scenario.days
        seed = args.seed if args.seed is not None else scenario.seed
        try:
            result = evaluate(scenario, simulate(scenario, days=days, seed=seed))
        except Unstable as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            return 2
        print(describe(scenario, days, seed))
        print(format_table(result))
        print()
        results.append(result)
    if args.plot:
        write_plot(results, args.plot)
        print(f"chart written to {args.plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicomnode",
        description=f"DICOM AI triage node ({RESEARCH_DEMO_NOTICE}). Each command has --help.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def with_config(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument(
            "--config",
            type=Path,
            default=DEFAULT_CONFIG,
            help=f"configuration file (default {DEFAULT_CONFIG})",
        )
        return sub

    serve = with_config(
        commands.add_parser("serve", help="run the DICOM listener, web and workers")
    )
    serve.add_argument("--workers", type=int, default=None, help="override [worker] count")
    serve.set_defaults(func=cmd_serve)

    worker = with_config(commands.add_parser("worker", help="run one job worker"))
    worker.add_argument(
        "--metrics-port",
        type=_port_or_zero,
        default=None,
        help="serve this worker's /metrics on this port, 0 = none (default: [worker] metrics_port)",
    )
    worker.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    worker.set_defaults(func=cmd_worker)

    check = commands.add_parser("check-config", help="validate the configuration and model cards")
    check.add_argument("config", type=Path, nargs="?", default=DEFAULT_CONFIG)
    # As every other command takes it.
    check.add_argument("--config", dest="config_option", type=Path, help="the same as CONFIG")
    check.set_defaults(func=cmd_check_config)

    worklist = with_config(commands.add_parser("worklist", help="print the reading worklist"))
    worklist.add_argument("--limit", type=int, default=50)
    worklist.set_defaults(func=cmd_worklist)

    models = with_config(commands.add_parser("models", help="list, verify or evaluate model cards"))
    models.add_argument("models_command", choices=["list", "verify", "eval"])
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

    synth = commands.add_parser("synth", help="write synthetic phantoms")
    synth_kinds = synth.add_subparsers(dest="kind", required=True)
    cxr = synth_kinds.add_parser(
        "cxr", help="chest X-ray phantoms (DX/CR, PA/AP/lateral) with ground truth"
    )
    from dicomnode.synth.cxr_cli import add_arguments as add_cxr_arguments

    add_cxr_arguments(cxr)
    cxr.set_defaults(func=cmd_synth)
    ct = synth_kinds.add_parser(
        "ct", help="chest CT series (one folder of slices each) with ground_truth.jsonl + masks"
    )
    ct.add_argument("--n", type=int, required=True, help="number of series")
    ct.add_argument("--out", type=Path, required=True)
    ct.add_argument("--seed", type=int, default=0, help="seed of the first series")
    ct.add_argument("--rows", type=int, default=256, help="rows = columns (default 256; 512)")
    ct.add_argument("--slices", type=int, default=64, help="slices per series (default 64)")
    ct.add_argument(
        "--slice-thickness", type=float, default=2.5, help="mm, e.g. 1, 1.25, 2.5, 5 (default 2.5)"
    )
    ct.add_argument("--dose", choices=["standard", "low"], default="standard")
    ct.add_argument("--noise-hu", type=float, default=None, help="noise sigma in HU (over --dose)")
    ct.add_argument("--nodules", default="1..4", help="nodules per series, MIN..MAX (default 1..4)")
    ct.add_argument(
        "--nodule-size", default="3..30", help="nodule diameter in mm, MIN..MAX (default 3..30)"
    )
    ct.set_defaults(func=cmd_synth)

    demo = commands.add_parser(
        "demo", help="start a demo node, send synthetic studies, show the worklist live"
    )
    demo.add_argument("--studies", type=int, default=9, help="phantoms to send (default 9)")
    demo.add_argument("--port", type=int, default=11112, help="DICOM port (default 11112)")
    demo.add_argument("--web-port", type=int, default=8080, help="web port (default 8080)")
    demo.add_argument("--folder", type=Path, default=None, help="keep files here (default: temp)")
    demo.add_argument("--keep", action="store_true", help="keep the node running at the end")
    demo.set_defaults(func=cmd_demo)

    reference = commands.add_parser(
        "config-reference", help="print the configuration reference (Markdown) from the schema"
    )
    reference.add_argument("--out", type=Path, default=None, help="write to this file")
    reference.set_defaults(func=cmd_config_reference)

    db = with_config(commands.add_parser("db", help="database maintenance"))
    db.add_argument("db_command", choices=["upgrade"])
    db.set_defaults(func=cmd_db)

    jobs = commands.add_parser("jobs", help="list jobs, retry dead-lettered ones")
    jobs_commands = jobs.add_subparsers(dest="jobs_command", required=True)
    jobs_list = with_config(
        jobs_commands.add_parser("list", help="jobs in one state, newest first (default dead)")
    )
    jobs_list.add_argument("--state", choices=["queued", "leased", "done", "dead"], default="dead")
    jobs_list.add_argument("--limit", type=int, default=100)
    jobs_retry = with_config(
        jobs_commands.add_parser(
            "retry", help="queue dead jobs again with a fresh attempt budget (audited)"
        )
    )
    jobs_retry.add_argument("ids", nargs="*", type=int, help="job ids (see 'jobs list')")
    jobs_retry.add_argument(
        "--all", action="store_true", help="every dead job (narrowed by --kind/--destination)"
    )
    for sub in (jobs_list, jobs_retry):
        sub.add_argument("--kind", choices=["analyse", "results", "export", "notify"])
        sub.add_argument("--destination", help="export jobs to this destination only")
    jobs.set_defaults(func=cmd_jobs)

    destinations = commands.add_parser(
        "destinations", help="list the [[destinations]], or check them by C-ECHO"
    )
    destinations_commands = destinations.add_subparsers(dest="destinations_command", required=True)
    with_config(
        destinations_commands.add_parser(
            "list", help="name, AE@host:port, TLS, outputs and timeout of each destination"
        )
    )
    destinations_echo = with_config(
        destinations_commands.add_parser(
            "echo",
            help="C-ECHO each destination (or the named ones) from [node] ae_title; "
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

    users = commands.add_parser("users", help="local web users and API tokens")
    users_commands = users.add_subparsers(dest="users_command", required=True)
    users_add = with_config(users_commands.add_parser("add", help="add a user"))
    users_add.add_argument("name")
    users_add.add_argument("--role", choices=["radiologist", "admin"], required=True)
    users_add.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    users_token = with_config(
        users_commands.add_parser("token", help="print a new API bearer token for a user")
    )
    users_token.add_argument("name")
    users_token.add_argument(
        "--days", type=_token_days, default=30, help="valid for this many days; 0 = no expiry"
    )
    for name, help_text in (
        ("disable", "refuse a user's log-in, sessions and tokens (until enabled)"),
        ("enable", "let a disabled user in again"),
        ("revoke", "end every API token and log-in session of a user"),
    ):
        with_config(users_commands.add_parser(name, help=help_text)).add_argument("name")
    users_password = with_config(
        users_commands.add_parser(
            "password", help="set a user's new password; ends their log-in sessions and API tokens"
        )
    )
    users_password.add_argument("name")
    users_password.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    users_password.add_argument(
        "--keep-tokens",
        action="store_true",
        help="keep the user's API tokens (log-in sessions end anyway)",
    )
    with_config(users_commands.add_parser("list", help="list users and roles"))
    users.set_defaults(func=cmd_users)

    simulate = commands.add_parser(
        "simulate", help="reading-room simulation: FIFO against the worklist policy"
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


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [HIDDEN_COMMAND]:
        return listener_parser().parse_args(argv[1:])
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except DatabaseUnusable as exc:
        # Every command that opens the database (serve, worker, db, users, worklist) meets
        # it here at start: one line, not a traceback each time systemd restarts the unit.
        _report_error(str(exc))
        return 1


def _report_error(message: str) -> None:
    """``message`` in the log where the command set logging up (serve, worker), else as
    one ``error:`` line on stderr, at error priority when stderr is the journal."""
    from dicomnode.logs import journal_priority, stderr_is_journal

    if logging.getLogger().handlers:
        log.error("%s", message)
        return
    prefix = journal_priority(logging.ERROR) if stderr_is_journal() else ""
    print(f"{prefix}error: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
