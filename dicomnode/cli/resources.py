"""What a command opens from its configuration file: the settings, the model cards, the
database."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from dicomnode.config import Settings, load_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from dicomnode.models.registry import ModelCard


def settings_of(args: argparse.Namespace) -> Settings:
    """The settings of the file the command's ``--config`` names."""
    return load_settings(args.config)


def model_cards(settings: Settings) -> list[ModelCard]:
    """The model cards in the settings' model folders."""
    # Imported here: the cards' models and numpy are for the commands that load cards, not
    # for users, db or jobs (~0.1 s a process).
    from dicomnode.models.registry import discover_cards

    return discover_cards(settings.model_folders)


def database_sessions(settings: Settings) -> sessionmaker[Session]:
    """A session maker for the settings' database, its schema upgraded first: for the
    commands that write (worker, users add and the like, jobs retry; serve migrates itself)."""
    from dicomnode.db.session import make_engine, make_sessionmaker, upgrade

    upgrade(settings.database_url)
    return make_sessionmaker(make_engine(settings.database_url))


def reading_sessions(settings: Settings) -> sessionmaker[Session]:
    """A session maker for the settings' database, for the commands that only read
    (worklist, users list, jobs list): never migrated nor created by them. One behind this
    code's newest schema revision, or not made yet, is refused with what to run
    (:class:`~dicomnode.db.errors.DatabaseUnusable`)."""
    from dicomnode.db.session import make_engine, make_sessionmaker, require_newest

    require_newest(settings.database_url)
    return make_sessionmaker(make_engine(settings.database_url))
