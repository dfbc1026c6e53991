"""``dicomnode <command>``: the console script's entry point; a command's configuration
and database errors reported in one line."""

from __future__ import annotations

import argparse
import logging
import sys

from dicomnode.cli.parser import HIDDEN_COMMAND, build_parser, listener_parser
from dicomnode.db.errors import DatabaseUnusable
from dicomnode.tomlfile import ConfigError

log = logging.getLogger("dicomnode")


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
