"""The listener's DIMSE provider: C-STORE requests and responses without pynetdicom's
message objects where they are plain.

pynetdicom turns every response primitive into a ``C_STORE_RSP`` message whose command set
is a pydicom ``Dataset``, encoded twice (about 0.28 ms of the association thread per
instance). A plain C-STORE-RSP (a status, no Error Comment or Offending Element) goes out
as :func:`~dicomnode.ingest.encoding.encode_store_response` writes it, handed to the
listener DUL's ``send_data_now`` (which sends it from this, the association's, thread
except over TLS and outside Sta6); anything else, and
any association with its own ``EVT_DIMSE_SENT`` handler (which expects pynetdicom's
message object), goes through pynetdicom as before.

And a received C-STORE-RQ becomes its primitive through
:func:`~dicomnode.ingest.encoding.decode_store_request` (about 0.13 ms less of the
receiving thread per instance); a request it leaves alone, and every other message, through
pynetdicom's ``message_to_primitive``.
"""

from __future__ import annotations

from typing import Any

from pynetdicom import evt
from pynetdicom._handlers import standard_dimse_sent_handler
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

from dicomnode.ingest.encoding import decode_store_request, encode_store_response

# The Message Control Header of a PDV holding a whole command set: command, last fragment.
_LAST_COMMAND_FRAGMENT = b"\x03"
# A PDV item's header (length, context ID) and the control header take this much of a PDU.
_PDV_OVERHEAD = 6


class QuickStoreDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, reading a plain C-STORE-RQ and sending a plain
    C-STORE-RSP without pydicom."""

    def receive_primitive(self, primitive: P_DATA) -> None:
        if self.message is None:
            message = DIMSEMessage()
            # pynetdicom calls ``self.message.message_to_primitive()`` once the message is
            # complete: this instance's own attribute answers first.
            message.message_to_primitive = lambda: _to_primitive(message)  # type: ignore[method-assign]
            self.message = message
        super().receive_primitive(primitive)

    def send_msg(self, primitive: Any, context_id: int) -> None:
        encoded = (
            encode_store_response(primitive)
            if isinstance(primitive, C_STORE) and self._only_standard_sent_handler()
            else None
        )
        limit = self.maximum_pdu_size
        if encoded is None or (limit and len(encoded) + _PDV_OVERHEAD > limit):
            super().send_msg(primitive, context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, _LAST_COMMAND_FRAGMENT + encoded))
        # The listener's associations (reactor.py) have a WakingDUL, which can send it now.
        self.dul.send_data_now(pdata)  # type: ignore[attr-defined]

    def _only_standard_sent_handler(self) -> bool:
        """pynetdicom's own EVT_DIMSE_SENT handler logs nothing for a C-STORE-RSP."""
        return all(
            handler[0] is standard_dimse_sent_handler
            for handler in self.assoc.get_handlers(evt.EVT_DIMSE_SENT)
        )


def _to_primitive(message: DIMSEMessage) -> Any:
    """A complete message's primitive: a C-STORE-RQ's decoded directly where it can be."""
    if isinstance(message, C_STORE_RQ):
        primitive = decode_store_request(message.command_set)
        if primitive is not None:
            # The rest of pynetdicom's message_to_primitive for a C-STORE-RQ.
            primitive.DataSet = message.data_set
            primitive._context_id = message.context_id
            primitive._dataset_path = message._data_set_path
            primitive._dataset_file = message._data_set_file
            return primitive
    return type(message).message_to_primitive(message)
