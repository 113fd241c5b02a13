"""One pass instead of one per node: how the Simulation Engine hands messages to clients.

Flower 1.42's simulation runtime (``flwr.server.superlink.fleet.vce.vce_api``) moves
messages from the in-memory LinkState to its workers with ``add_messages_to_queue``: every
0.1 s, for **every node** of the federation, ``state.get_message_ins(node_id, limit=1)``,
and each of those calls scans **every stored message** and re-validates it (TTL and a
federation check per message). With 1,000 nodes and 100 messages in flight that is 100,000
validations every 0.1 s, in a thread of the driver process that holds the GIL the
ServerApp needs. It grows with the total number of clients, not with the clients per round.

``fast_add_messages_to_queue`` does the same job in one pass per 0.1 s: collect the
undelivered messages addressed to simulated nodes, validate them once
(``_check_stored_messages``, Flower's own check), mark them delivered and queue them.
``patched_vce`` installs it for the duration of a run when the state is Flower's
``InMemoryLinkState`` and the function has the expected signature; otherwise Flower's
own code runs unchanged. ``FEDSPARSE_FLOWER_POLLING=flower`` turns it off (for comparison).
"""

from __future__ import annotations

import inspect
import os
import threading
from contextlib import contextmanager
from queue import Queue
from typing import Any, Iterator

EXPECTED_PARAMS = ["state", "queue", "nodes_mapping", "f_stop"]


def fast_add_messages_to_queue(state: Any, queue: Queue, nodes_mapping: Any, f_stop: threading.Event) -> None:
    """Put undelivered messages for the simulated nodes into ``queue``, one pass per 0.1 s."""
    from flwr.supercore.date import now

    while not f_stop.is_set():
        with state.lock:
            pending = {
                msg_id
                for msg_id, msg in state.message_ins_store.items()
                if msg.metadata.delivered_at == "" and msg.metadata.dst_node_id in nodes_mapping
            }
        if pending:
            state._check_stored_messages(pending)  # Flower's TTL / federation check, deletes invalid ones
            delivered_at = now().isoformat()
            with state.lock:
                ready = []
                for msg_id in pending:
                    msg = state.message_ins_store.get(msg_id)
                    if msg is not None and msg.metadata.delivered_at == "":
                        msg.metadata.delivered_at = delivered_at
                        ready.append(msg)
            for msg in ready:
                queue.put(msg)
        f_stop.wait(0.1)


@contextmanager
def patched_vce() -> Iterator[bool]:
    """Use ``fast_add_messages_to_queue`` inside the block; yields whether it is installed."""
    if os.environ.get("FEDSPARSE_FLOWER_POLLING", "") == "flower":
        yield False
        return
    try:
        from flwr.server.superlink.fleet.vce import vce_api
        from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
        from flwr.supercore.date import now  # noqa: F401 - used by the fast dispatch
    except ImportError:
        yield False
        return
    original = getattr(vce_api, "add_messages_to_queue", None)
    usable = (
        original is not None
        and list(inspect.signature(original).parameters) == EXPECTED_PARAMS
        and hasattr(InMemoryLinkState, "_check_stored_messages")
    )
    if not usable:
        yield False
        return

    def dispatch(state: Any, queue: Queue, nodes_mapping: Any, f_stop: threading.Event) -> None:
        if isinstance(state, InMemoryLinkState) and hasattr(state, "message_ins_store"):
            fast_add_messages_to_queue(state, queue, nodes_mapping, f_stop)
        else:
            original(state, queue, nodes_mapping, f_stop)

    vce_api.add_messages_to_queue = dispatch
    try:
        yield True
    finally:
        vce_api.add_messages_to_queue = original
