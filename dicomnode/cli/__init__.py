"""The command line, ``dicomnode <command>``: ``main.py`` (the entry point: arguments parsed,
the command run, its configuration and database errors reported), ``parser.py`` (the
arguments of every command and their types), ``node.py`` (serve, worker and the listener
processes), ``commands.py`` (the commands that run, print and exit: check-config, worklist,
models, synth, demo, config-reference, db, jobs, destinations, simulate), ``users.py``
(``dicomnode users``) and ``resources.py`` (the settings, model cards and database a command
opens)."""
