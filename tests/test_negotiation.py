"""A presentation context is accepted in the transfer syntax the sender prefers (the first it
proposes that the node supports), not in the first of pynetdicom's list (Implicit VR Little
Endian), which made senders decompress their images and drop their private elements' VRs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    RLELossless,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, build_context
from pynetdicom.sop_class import CTImageStorage, SecondaryCaptureImageStorage
from sqlalchemy.orm import Session, sessionmaker
from test_scp import Node, secondary_capture, start_node

from dicomnode.ingest.negotiation import sender_order


@pytest.fixture
def node(tmp_path: Path, sessions: sessionmaker[Session]) -> Iterator[Node]:
    yield from start_node(tmp_path, sessions)


def _accepted(node: Node, *proposals: list[str]) -> list[str]:
    """The transfer syntax the node accepts each proposed CT Image Storage context in."""
    ae = AE(ae_title="MODALITY")
    for syntaxes in proposals:
        ae.add_requested_context(CTImageStorage, syntaxes)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        by_id = {cx.context_id: str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        return [by_id[cx.context_id] for cx in assoc.requestor.requested_contexts]
    finally:
        assoc.release()


@pytest.mark.parametrize(
    ("proposed", "accepted"),
    [
        ([JPEG2000Lossless, ExplicitVRLittleEndian, ImplicitVRLittleEndian], JPEG2000Lossless),
        ([ExplicitVRLittleEndian, ImplicitVRLittleEndian], ExplicitVRLittleEndian),
        ([ImplicitVRLittleEndian, ExplicitVRLittleEndian], ImplicitVRLittleEndian),
        # A syntax the node does not know is passed over for the next one proposed.
        (["1.2.3.999", JPEGLosslessSV1, ImplicitVRLittleEndian], JPEGLosslessSV1),
    ],
)
def test_a_context_is_accepted_in_the_senders_first_supported_syntax(
    node: Node, proposed: list[str], accepted: str
) -> None:
    assert _accepted(node, proposed) == [accepted]


def test_each_association_follows_its_own_senders_order(node: Node) -> None:
    """The order is per association: one sender's preference is not another's, and the
    listener's own list stays pynetdicom's."""
    assert _accepted(node, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]) == [
        ExplicitVRLittleEndian
    ]
    assert _accepted(node, [ImplicitVRLittleEndian, ExplicitVRLittleEndian]) == [
        ImplicitVRLittleEndian
    ]
    ct = next(cx for cx in node.scp.ae.supported_contexts if cx.abstract_syntax == CTImageStorage)
    assert [str(s) for s in ct.transfer_syntax] == [str(s) for s in ALL_TRANSFER_SYNTAXES]


def test_the_shared_contexts_are_not_changed() -> None:
    """Associations share the listener's context objects: the order is changed on copies."""
    shared = [build_context(CTImageStorage, ALL_TRANSFER_SYNTAXES)]
    shared.append(build_context(SecondaryCaptureImageStorage, ALL_TRANSFER_SYNTAXES))
    before = [list(cx.transfer_syntax) for cx in shared]
    # One syntax a context is accepted in or not, whatever the order: nothing to copy.
    assert sender_order([build_context(CTImageStorage, [ExplicitVRLittleEndian])], shared) is shared
    proposal = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    ordered = sender_order([build_context(CTImageStorage, proposal)], shared)
    assert [list(cx.transfer_syntax) for cx in shared] == before
    assert ordered[0] is not shared[0] and ordered[1] is shared[1]
    assert ordered[0].transfer_syntax[0] == ExplicitVRLittleEndian
    assert sorted(ordered[0].transfer_syntax) == sorted(shared[0].transfer_syntax)


def test_a_compressed_image_is_stored_as_its_sender_has_it(node: Node) -> None:
    """A sender that prefers RLE Lossless and could fall back to uncompressed sends its RLE
    image, and the node keeps those bytes; it was told to send Implicit VR Little Endian."""
    ds = secondary_capture()
    ds.compress(RLELossless)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(
        SecondaryCaptureImageStorage, [RLELossless, ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    )
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
    (stored,) = node.files()
    received = pydicom.dcmread(stored)
    assert received.file_meta.TransferSyntaxUID == RLELossless
    assert received.PixelData == ds.PixelData


def test_explicit_big_endian_is_taken_only_where_nothing_else_is_proposed(node: Node) -> None:
    """Retired from the standard; dcmtk's storescu proposes it first in its fallback
    contexts ([Explicit VR Big Endian, Implicit VR Little Endian])."""
    assert _accepted(node, [ExplicitVRBigEndian, ImplicitVRLittleEndian]) == [
        ImplicitVRLittleEndian
    ]
    assert _accepted(node, [ExplicitVRBigEndian, ExplicitVRLittleEndian]) == [
        ExplicitVRLittleEndian
    ]
    assert _accepted(node, [ExplicitVRBigEndian]) == [ExplicitVRBigEndian]


def test_a_proposal_accepted_alike_either_way_changes_nothing_and_a_change_is_kept() -> None:
    """dcmtk's storescu proposes some 60 SOP classes with two contexts each, one of them of
    two syntaxes: its associations must not pay for copies that change no outcome, and a
    sender's repeated proposal reuses the copy made for its first association."""
    shared = [build_context(CTImageStorage, ALL_TRANSFER_SYNTAXES)]
    storescu = [
        build_context(CTImageStorage, [ExplicitVRLittleEndian]),
        build_context(CTImageStorage, [ExplicitVRBigEndian, ImplicitVRLittleEndian]),
    ]
    assert sender_order(storescu, shared) is shared
    proposal = [build_context(CTImageStorage, [JPEG2000Lossless, ImplicitVRLittleEndian])]
    first, again = sender_order(proposal, shared), sender_order(proposal, shared)
    assert first[0] is not shared[0] and again[0] is first[0]
