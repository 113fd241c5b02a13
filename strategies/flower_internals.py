"""Every private Flower API fedsparse uses, in one module (flwr 1.42, pinned to ``>=1.42,<1.43``).

Public API is used everywhere else. What is here has no public equivalent:

1. ``run_simulation_with_config``: the Simulation Engine with a run config. Flower's public
   ``flwr.simulation.run_simulation`` hands every app an *empty* run config (flwr 1.42),
   so ``fedsparse run`` calls ``flwr.simulation.run_simulation._run_simulation`` with a
   ``Run`` it builds (``flwr.supercore.run.Run``, ``generate_rand_int_from_bytes``,
   ``NOOP_FEDERATION_ID``, ``EventType``) and sets the ServerApp's ``TaskIdentity``.
2. ``set_task_identity``: Messages can only be built inside a running task; the in-process
   driver and the tests set ``flwr.supercore.task_identity.TaskIdentity`` themselves.
3. ``patched_vce``: one pass per poll to hand messages to simulated clients instead of
   Flower's per-node scan of every stored message (``vce_api.add_messages_to_queue``,
   ``InMemoryLinkState._check_stored_messages``), see below.
4. ``patched_pool``: which client actor a message goes to, known where Flower's actor pool
   submits it (``BasicActorPool.submit``, re-done in its six lines), so that its
   Arrays travel by shared-memory file only to an actor on the driver's Ray node.
5. ``fedsparse.protocol.wire_bytes`` (the library's one Flower-aware function) mirrors how
   Flower deflates messages (its array chunk size, its object headers) to size them without
   hashing every byte; it is listed here so that the check below covers it too.

``check_internals`` lists what is missing or changed; ``tests/test_flower_internals.py``
fails with that list when Flower changes one of them.

Why ``patched_vce``: Flower 1.42's simulation runtime moves messages from the in-memory
LinkState to its workers with ``add_messages_to_queue``: every 0.1 s, for **every node** of
the federation, ``state.get_message_ins(node_id, limit=1)``, and each call scans **every
stored message** and re-validates it. With 1,000 nodes and 100 messages in flight that is
100,000 validations every 0.1 s, in a thread of the driver process that holds the GIL the
ServerApp needs. ``fast_add_messages_to_queue`` does the same job in one pass, woken as soon
as the ServerApp stores messages (at the latest every 10 ms); the ServerApp's wait for replies
is woken the same way when a reply is stored.
``FEDSPARSE_FLOWER_POLLING=flower`` turns it off (for comparison). Off, or when a Flower
release no longer fits it (``patched_vce`` then yields False), a run is slower, not different:
``tests/test_flower_internals.py`` runs a simulation with it and ``strategies.ray_arrays`` off
and gets the plain engine's model bit for bit.
"""

from __future__ import annotations

import inspect
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from queue import Queue
from typing import Any, Callable, Iterator

# Flower's loop waits 0.1 s between passes: up to 0.1 s of every round spent waiting. One pass
# over the messages in flight is cheap, so this one looks every 10 ms.
DISPATCH_SECONDS = 0.01

EXPECTED_PARAMS = ["state", "queue", "nodes_mapping", "f_stop"]


# Set when a message is stored for the simulated clients (the dispatch loop below wakes at once
# instead of at its next poll) and when a reply is stored (``strategies.progress.REPLY_STORED``
# wakes the ServerApp's wait): ``patched_vce`` wraps the LinkState's two store methods.
MESSAGE_STORED = threading.Event()


def fast_add_messages_to_queue(state: Any, queue: Queue, nodes_mapping: Any, f_stop: threading.Event) -> None:
    """Put undelivered messages for the simulated nodes into ``queue``: one pass whenever a
    message is stored (``MESSAGE_STORED``), and at least every ``DISPATCH_SECONDS``."""
    from flwr.supercore.date import now

    while not f_stop.is_set():
        MESSAGE_STORED.clear()  # before the pass: a message stored during it sets it again
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
        MESSAGE_STORED.wait(DISPATCH_SECONDS)


def _signalling(store: Callable[[Any], Any], event: threading.Event,
                note: Callable[[Any], None] | None = None) -> Callable[[Any], Any]:
    """``store`` (a LinkState's ``store_message_ins``/``_res``) that sets ``event`` once it stored
    (after ``note(message)``, where given)."""

    def wrapped(message: Any) -> Any:
        try:
            return store(message)
        finally:
            if note is not None:
                note(message)
            event.set()

    return wrapped


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
            from strategies.progress import REPLY_STORED, STORED_REPLIES

            # this state object is the run's own (its in-memory LinkState): wake the dispatch
            # when the ServerApp stores messages, and the ServerApp's wait when replies are stored
            # (telling it which: it then pulls only those, STORED_REPLIES)
            state.store_message_ins = _signalling(state.store_message_ins, MESSAGE_STORED)
            state.store_message_res = _signalling(state.store_message_res, REPLY_STORED,
                                                  lambda m: STORED_REPLIES.add(m.metadata.reply_to_message_id))
            STORED_REPLIES.active = True
            try:
                fast_add_messages_to_queue(state, queue, nodes_mapping, f_stop)
            finally:
                STORED_REPLIES.active = False
        else:
            original(state, queue, nodes_mapping, f_stop)

    vce_api.add_messages_to_queue = dispatch
    try:
        yield True
    finally:
        vce_api.add_messages_to_queue = original


@contextmanager
def patched_pool(around: Callable[[Any], Any]) -> Iterator[bool]:
    """Inside the block, Flower's actor pool submits each message inside ``around(actor,
    message)`` (a context manager; the actor is the one that will run it); yields whether it
    is installed."""
    try:
        from flwr.simulation.ray_transport.ray_actor import BasicActorPool
    except ImportError:
        yield False
        return
    original = getattr(BasicActorPool, "submit", None)
    if original is None or list(inspect.signature(original).parameters) != POOL_SUBMIT_PARAMS \
            or "_future_to_actor" not in inspect.getsource(original):
        yield False
        return

    def submit(self: Any, actor_fn: Any, job: Any) -> Any:
        # Flower's submit, with the call that serializes the message inside around(actor); the
        # actor is taken here (peeking at pool[-1] would race with the threads that put actors back)
        actor = self.pool.pop()
        app_fn, message, cid, context = job
        with around(actor, message):
            future = actor_fn(actor, app_fn, message, cid, context)
        self._future_to_actor[future] = actor
        return future

    BasicActorPool.submit = submit
    try:
        yield True
    finally:
        BasicActorPool.submit = original


POOL_SUBMIT_PARAMS = ["self", "actor_fn", "job"]


def set_task_identity(run_id: int = 1, node_id: int = 0, task_id: int = 1) -> None:
    """Let this process build Messages outside a Flower run (in-process driver, tests)."""
    from flwr.supercore.task_identity import TaskIdentity

    if TaskIdentity._run_id is None:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, node_id, task_id


def run_simulation_with_config(server_app: Any, client_app: Any, num_supernodes: int, run_config: dict[str, Any],
                               backend_config: dict[str, Any], app_dir: Path) -> None:
    """Flower's Simulation Engine (Ray backend) in this process, with ``run_config`` handed
    to both apps (see the module docstring for why this is private API)."""
    from flwr.app import Context, RecordDict
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
    context = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    _run_simulation(
        num_supernodes=num_supernodes,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        client_app=client_app,
        server_app=server_app,
        backend_name="ray",
        backend_config=backend_config,
        server_app_context=context,
        app_dir=str(app_dir),
        run=run,
        is_app=True,
    )


# (module, attribute, what fedsparse needs of it)
INTERNALS = [
    ("flwr.simulation.run_simulation", "_run_simulation", "the Simulation Engine with a run config"),
    ("flwr.supercore.run", "Run", "a Run to simulate"),
    ("flwr.server.superlink.linkstate.utils", "generate_rand_int_from_bytes", "run and task ids"),
    ("flwr.common.constant", "RUN_ID_NUM_BYTES", "run id size"),
    ("flwr.common.constant", "TASK_ID_NUM_BYTES", "task id size"),
    ("flwr.common.constant", "SUPERLINK_NODE_ID", "the ServerApp's node id"),
    ("flwr.supercore.constant", "NOOP_FEDERATION_ID", "the simulation's federation"),
    ("flwr.supercore.telemetry", "EventType", "the simulation's exit event"),
    ("flwr.supercore.task_identity", "TaskIdentity", "building Messages outside a run"),
    ("flwr.server.superlink.fleet.vce.vce_api", "add_messages_to_queue", "the message dispatch patched_vce replaces"),
    ("flwr.server.superlink.linkstate.in_memory_linkstate", "InMemoryLinkState", "the state patched_vce reads"),
    ("flwr.simulation.ray_transport.ray_actor", "BasicActorPool", "the actor pool patched_pool wraps"),
    # fedsparse.protocol.wire_bytes sizes messages as Flower deflates them (tests/test_protocol.py
    # checks it against Flower's own deflate-and-hash on every kind of message)
    ("flwr.app.message.array", "FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE", "how Flower cuts arrays into chunks"),
    ("flwr.supercore.inflatable.inflatable_object", "get_all_nested_objects", "Flower's own message size"),
]

# keyword parameters _run_simulation must accept
RUN_SIMULATION_PARAMS = ["num_supernodes", "exit_event", "client_app", "server_app", "backend_name", "backend_config",
                         "server_app_context", "app_dir", "run", "is_app"]


def check_internals() -> list[str]:
    """What is missing or changed among the private Flower APIs above (empty: all there)."""
    import importlib

    problems = []
    for module, attr, why in INTERNALS:
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            problems.append(f"{module}.{attr} is gone ({why})")
            continue
        if attr == "_run_simulation":
            params = set(inspect.signature(obj).parameters)
            lacking = [p for p in RUN_SIMULATION_PARAMS if p not in params]
            if lacking:
                problems.append(f"{module}.{attr} lacks parameters {lacking} ({why})")
        if attr == "add_messages_to_queue" and list(inspect.signature(obj).parameters) != EXPECTED_PARAMS:
            problems.append(f"{module}.{attr} has parameters {list(inspect.signature(obj).parameters)}, "
                            f"expected {EXPECTED_PARAMS} ({why})")
        if attr == "InMemoryLinkState" and not hasattr(obj, "_check_stored_messages"):
            problems.append(f"{module}.{attr}._check_stored_messages is gone ({why})")
        if attr == "BasicActorPool":
            submit = getattr(obj, "submit", None)
            params = list(inspect.signature(submit).parameters) if submit is not None else None
            if params != POOL_SUBMIT_PARAMS:
                problems.append(f"{module}.{attr}.submit has parameters {params}, expected {POOL_SUBMIT_PARAMS} ({why})")
    return problems
