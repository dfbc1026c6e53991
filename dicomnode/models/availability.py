"""Which models a worker analyses studies with: its cards, less those whose ONNX file cannot
be loaded (missing, truncated, corrupt, not matching the card), each left out with why until
a reload or a restart finds it loadable. A node's configuration fault must not fail
studies: the other models run, and each study names the ones left out as not run.
"""

from __future__ import annotations

import logging
import threading

from dicomnode.models.registry import ModelCard

# The worker's lines: operators and their log filters know them by this name.
log = logging.getLogger("dicomnode.worker")


class ModelAvailability:
    """The worker's model cards and those left out, shared by its job threads."""

    def __init__(self, cards: list[ModelCard]) -> None:
        self.cards = cards
        # Models left out, by name, with the reason.
        self.unusable: dict[str, str] = {}
        self._lock = threading.Lock()

    def replace(self, cards: list[ModelCard]) -> None:
        """Take the cards of a reload, none left out: every card of a reload was loaded by
        ``load_checked`` (a reload with an unloadable one is refused)."""
        with self._lock:
            self.cards = cards
            self.unusable.clear()

    def leave_out(self, card: ModelCard, reason: str) -> bool:
        """Leave the model out of every study from now on, as a card whose ONNX file cannot
        be loaded (the check of ``check-config`` and ``/readyz``: ``load_session``), with the
        ensembles it is a member of; one ERROR names the card and why. False when it was left
        out already."""
        with self._lock:
            if card.model.name in self.unusable:
                return False
            self.unusable[card.model.name] = reason
        ensembles = [
            c.model.name
            for c in self.cards
            if c.ensemble is not None and card.model.name in c.ensemble.members
        ]
        log.error(
            "model card %s cannot be used: the model%s left out of every study until it is "
            "fixed and the node reloaded (SIGHUP) or restarted; the other models run: %s",
            card.card_path,
            f" and its ensemble(s) {', '.join(ensembles)} are" if ensembles else " is",
            reason,
        )
        return True

    def usable(self) -> list[ModelCard]:
        """The cards that studies are analysed with: all but those left out
        (:meth:`leave_out`) and the ensembles with a member left out."""
        unusable = set(self.unusable)
        return [
            card
            for card in self.cards
            if card.model.name not in unusable
            and not (card.ensemble and unusable.intersection(card.ensemble.members))
        ]

    def left_out(self) -> list[tuple[ModelCard, str]]:
        """The cards :meth:`usable` leaves out, each with why (an ensemble: its member's
        reason)."""
        unusable = dict(self.unusable)
        left_out = []
        for card in self.cards:
            if card.model.name in unusable:
                left_out.append((card, unusable[card.model.name]))
            elif card.ensemble and (members := unusable.keys() & set(card.ensemble.members)):
                member = sorted(members)[0]
                left_out.append((card, f"member {member}: {unusable[member]}"))
        return left_out
