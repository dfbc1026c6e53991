"""What a command opens from its configuration file: the settings, the model cards, the
database."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from dicomnode.config import Settings, load_settings

if TYPE_CHECKING:
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


def database_sessions(settings: Settings):
    """A session maker for the settings' database, its schema upgraded first."""
    from dicomnode.db.session import make_engine, make_sessionmaker, upgrade

    upgrade(settings.database_url)
    return make_sessionmaker(make_engine(settings.database_url))
