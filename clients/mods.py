"""ClientApp mods: cross-cutting measurement around every train message."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedsparse.protocol import BYTES_RECEIVED_KEY, BYTES_SENT_KEY, METRICS_KEY, wire_bytes


def message_bytes_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Add ``bytes-received`` and ``bytes-sent`` (serialized sizes) to the reply's metrics.

    Like Flower's ``message_size_mod``, but the numbers travel back to the server in the
    reply instead of going to a log. ``bytes-sent`` is measured before the two metrics
    are added (they add a few dozen bytes).
    """
    received = wire_bytes(msg)
    reply = call_next(msg, context)
    if reply.has_error() or METRICS_KEY not in reply.content.metric_records:
        return reply
    sent = wire_bytes(reply)
    metrics = reply.content.metric_records[METRICS_KEY]
    metrics[BYTES_RECEIVED_KEY] = received
    metrics[BYTES_SENT_KEY] = sent
    return reply
