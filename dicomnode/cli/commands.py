"""The commands that run, print and exit: check-config, worklist, models, synth, demo,
config-reference, db, jobs, destinations and simulate, one function each (``cmd_*``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dicomnode import RESEARCH_DEMO_NOTICE
from dicomnode.cli.resources import (
    database_sessions,
    model_cards,
    reading_sessions,
    settings_of,
)

SCENARIOS = Path("conf/scenarios")
# `db current`'s exit status for a database behind this code (1: an error, 2: the
# configuration's).
UPGRADE_NEEDED = 3


def cmd_check_config(args: argparse.Namespace) -> int:
    from dicomnode.checkconfig import check_all, config_warnings, database_warnings

    settings, cards, problems = check_all(args.config_option or args.config)
    for problem in problems:
        print(f"configuration error: {problem}", file=sys.stderr)
    if settings is None or problems:
        return 2
    for warning in config_warnings(settings) + database_warnings(settings):
        print(f"warning: {warning}", file=sys.stderr)
    print(
        f"{args.config_option or args.config}: OK ({len(cards)} model card(s), "
        f"{len(settings.destinations)} destination(s), {len(settings.peers)} peer(s))"
    )
    return 0


def cmd_worklist(args: argparse.Namespace) -> int:
    from dicomnode.db.session import utcnow
    from dicomnode.worklist.service import reading_order

    settings = settings_of(args)
    with reading_sessions(settings)() as session:
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
    settings = settings_of(args)
    cards = model_cards(settings)
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
    settings = settings_of(args)
    if args.db_command == "current":
        return _db_current(settings.database_url)
    from dicomnode.db.session import upgrade

    before, after = upgrade(settings.database_url)
    if before == after:
        print(f"database schema is up to date (revision {after})")
    else:
        print(f"database schema upgraded from {before or 'empty'} to revision {after}")
    return 0


def _db_current(url: str) -> int:
    """``db current``: the database's revision and this code's newest; only reads. Exit 0 when
    they are the same, UPGRADE_NEEDED when the database is behind or not made yet (a database
    at a revision this code lacks, or one it cannot open, is an error: 1)."""
    from dicomnode.db.session import current_revision, newest_revision

    current = current_revision(url)
    newest = newest_revision()
    print(f"database schema revision: {current or 'none (no dicomnode database yet)'}")
    print(f"this dicomnode's newest revision: {newest}")
    if current == newest:
        print("up to date")
        return 0
    print("upgrade needed: run `dicomnode db upgrade` (stop older nodes first)")
    return UPGRADE_NEEDED


def cmd_jobs(args: argparse.Namespace) -> int:
    """List jobs in a state, or retry dead-lettered ones (by id, or all that match)."""
    import getpass

    from dicomnode.db.models import Job
    from dicomnode.db.session import as_utc, utcnow
    from dicomnode.jobs.dead_letters import (
        Covered,
        covered_reason,
        covering_jobs,
        exported_objects,
        job_destination,
        jobs_in_state,
        retry_dead,
    )
    from dicomnode.jobs.queue import lock_studies

    settings = settings_of(args)
    # Listing only reads: it never migrates a database an older node may still run on.
    opened = reading_sessions if args.jobs_command == "list" else database_sessions
    with opened(settings)() as session:
        if args.jobs_command == "list":
            rows = jobs_in_state(session, args.state, args.kind, args.destination, args.limit)
            dead = [job for job, _ in rows] if args.state == "dead" else []
            covering = covering_jobs(session, dead)
            sends = exported_objects(session, [job for job, _ in rows])
            for job, uid in rows:
                where = f" -> {job_destination(job)}" if job.kind == "export" else ""
                if job.id in sends:
                    where += f" ({sends[job.id]})"
                # A dead letter another job covers needs no retry: said after its reason.
                other = covering.get(job.id)
                covered = f"\tno retry needed: {covered_reason(job, other)}" if other else ""
                print(
                    f"{job.id}\t{job.kind}{where}\t{job.state}\tattempts {job.attempts}\t"
                    f"{as_utc(job.run_after):%Y-%m-%d %H:%M:%S}Z\tstudy {uid}\t"
                    f"{job.last_error}{covered}"
                )
            tail = f", {len(covering)} of them covered by other jobs" if covering else ""
            print(f"{len(rows)} job(s) {args.state}{tail}", file=sys.stderr)
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
        retried = gone = 0
        # Their studies locked at once, in id order (on PostgreSQL, as each retry does its own):
        # another transaction locking several of them, in the same order, cannot deadlock it.
        lock_studies(session, [job.study_id for job in jobs])
        # Newest first (as listed): of two dead exports of one object to one destination, the
        # newer is queued again and then covers the older, which is not.
        for job in sorted(jobs, key=lambda job: job.id, reverse=True):
            try:
                retry_dead(session, job, f"cli:{getpass.getuser()}", now)
                retried += 1
            except Covered as covered:
                # Not an error: what the retry was for is done or under way.
                print(covered)
            except ValueError as error:
                # Retried by another admin since it was listed.
                print(f"error: {error}", file=sys.stderr)
                gone += 1
        session.commit()
    covered_count = len(jobs) - retried - gone
    tail = f", {covered_count} already covered by other jobs" if covered_count else ""
    print(f"{retried} dead job(s) queued again{tail}")
    return 1 if gone else 0


def cmd_destinations(args: argparse.Namespace) -> int:
    """List the configured destinations, or C-ECHO them (all, or the named ones)."""
    # Imported here, as every command's own modules are (echo imports pynetdicom only as
    # it echoes).
    from dicomnode.export.echo import columns, echo, line, list_columns, widths

    settings = settings_of(args)
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
