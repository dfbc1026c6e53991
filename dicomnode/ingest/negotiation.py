"""Which transfer syntax a presentation context is accepted in: the sender's choice.

pynetdicom accepts each proposed presentation context in the first transfer syntax of the
*acceptor's* list that the context proposes. With every transfer syntax supported, in
pynetdicom's order (Implicit VR Little Endian first), a modality that proposes JPEG 2000
Lossless, then Explicit, then Implicit VR Little Endian was told to send Implicit VR Little
Endian: it decompressed its images and sent 2-3 times the bytes, and the node stored neither
the image as the modality had it nor the VRs of its private elements. A sender lists its
preference first (PS3.8 9.3.2.2), and the node stores what it is sent as it is sent, so it
accepts the first proposed transfer syntax it supports, by giving each association acceptor,
before negotiation, its supported transfer syntaxes in the order the requestor proposed them.
One exception: Explicit VR Big Endian, retired from the standard, comes after the others a
sender proposes (dcmtk's storescu offers it first in its fallback contexts).

Negotiation only reads the acceptor's contexts, and the listener's are shared by its
associations, so a reordered context is a new object; each is made once per listener process
and kept, as senders propose the same contexts association after association.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydicom.uid import ExplicitVRBigEndian
from pynetdicom.presentation import PresentationContext

# Accepted only where a sender proposes nothing else the node supports.
RETIRED = frozenset({str(ExplicitVRBigEndian)})
# Decisions kept per listener process: (id of the supported context, the requestor's syntax
# lists for its abstract syntax) -> (that context, the context to negotiate with). The
# context is held so that its id is not reused. Emptied when it grows past this.
_KEPT = 4096
_decisions: dict[tuple[int, tuple[tuple[str, ...], ...]], tuple[object, PresentationContext]] = {}


def sender_order(
    requested: Iterable[PresentationContext], supported: list[PresentationContext]
) -> list[PresentationContext]:
    """``supported``, where a requested context of several transfer syntaxes would be
    accepted in another than the requestor's first supported one (retired ones last), with
    that abstract syntax's transfer syntaxes in the requestor's order (over its contexts for
    it, in order), the ones it did not propose after them. ``supported`` itself when nothing
    changes (a context proposing one syntax is accepted in it or not, whatever the order)."""
    proposals: dict[str, list[tuple[str, ...]]] = {}
    for context in requested:
        if len(context.transfer_syntax) > 1:
            syntaxes = tuple(str(s) for s in context.transfer_syntax)
            proposals.setdefault(str(context.abstract_syntax), []).append(syntaxes)
    if not proposals:
        return supported
    ordered: list[PresentationContext] | None = None
    for index, context in enumerate(supported):
        proposed = proposals.get(context.abstract_syntax)  # a UID hashes as its str
        if proposed is None:
            continue
        chosen = _negotiated_with(context, tuple(proposed))
        if chosen is not context:
            ordered = ordered or list(supported)
            ordered[index] = chosen
    return supported if ordered is None else ordered


def _negotiated_with(
    context: PresentationContext, proposed: tuple[tuple[str, ...], ...]
) -> PresentationContext:
    """``context``, or a copy in the requestor's order where that changes what one of the
    ``proposed`` syntax lists is accepted in (kept for the next association)."""
    key = (id(context), proposed)
    kept = _decisions.get(key)
    if kept is not None:
        return kept[1]
    ours = [str(s) for s in context.transfer_syntax]
    wanted = [s for syntaxes in proposed for s in syntaxes if s in ours]
    wanted = list(dict.fromkeys(s for s in wanted if s not in RETIRED)) + list(
        dict.fromkeys(s for s in wanted if s in RETIRED)
    )
    order = wanted + [s for s in ours if s not in wanted]
    chosen = context
    if any(_accepted(syntaxes, ours) != _accepted(syntaxes, order) for syntaxes in proposed):
        chosen = PresentationContext()
        chosen.abstract_syntax = context.abstract_syntax
        chosen.transfer_syntax = order
        chosen.scu_role, chosen.scp_role = context.scu_role, context.scp_role
    if len(_decisions) >= _KEPT:
        _decisions.clear()
    _decisions[key] = (context, chosen)
    return chosen


def _accepted(proposed: tuple[str, ...], order: list[str]) -> str | None:
    """What pynetdicom accepts a context proposing ``proposed`` in, given ``order``."""
    return next((s for s in order if s in proposed), None)
