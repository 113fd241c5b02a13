"""One Flower Strategy for every fedsparse algorithm.

``AlgorithmStrategy`` carries a ``RoundEngine``'s tasks over a Flower ``Grid``: it learns
which client (partition) each node is (one ``query`` message per new node), turns tasks
into Messages (one RecordDict per group of clients that receive the same arrays), waits
for the replies with a live count, decodes them (error replies, missing records and
undecodable arrays are failures; the engine checks the arrays themselves), and measures
the serialized bytes both ways. It is both

- the engine's ``Transport`` (``clients``, ``exchange``, ``model_bytes``): what the
  ServerApp runs, with checkpoints and resume; and
- a ``flwr.serverapp.strategy.Strategy`` (``configure_train`` / ``aggregate_train``), for
  a ServerApp of your own that calls ``strategy.start(...)`` after ``engine.start(strategy)``.

Nothing in it knows which algorithm runs.
"""

from __future__ import annotations

import time
from logging import INFO, WARNING
from typing import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedsparse.algorithms import ClientTask
from fedsparse.algorithms.base import State
from fedsparse.engine.rounds import Exchange, Failure, Reply, RoundEngine, one_line
from fedsparse.profiles import PROFILE_RECORD, Profile
from fedsparse.protocol import (
    ARRAYS_KEY,
    CLIENT_ID_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    array_record,
    torch_state,
    wire_bytes,
)
from strategies.progress import PollingGrid

WAIT_LOG_SECONDS = 10.0


RAISED = "occurred. Message: "  # how Flower's ClientAppException words the ClientApp's own exception


def error_gist(reason: str) -> str:
    """A client's error as its ClientApp raised it. On the Simulation Engine the reason is Ray's
    task error: a traceback of the actor (pid, node, actor id, frames) that ends with Flower's
    ``Exception ClientAppException occurred. Message: <the exception's message>``; that message
    (300 characters of the traceback never reached it)."""
    if RAISED not in reason:
        return reason
    message = reason.rsplit(RAISED, 1)[1].strip()
    return message[:-2] if message.endswith("'>") else message  # the end of Flower's "<class ...>:<'...'>"


def decode_reply(reply: Message, client: int) -> Reply | Failure:
    """A training reply as the engine's ``Reply``, or the ``Failure`` it is."""
    if reply.has_error():
        return Failure(client, "error", one_line(f"client error {reply.error.code}: {error_gist(reply.error.reason)}"))
    arrays = reply.content.array_records
    if ARRAYS_KEY not in arrays:
        return Failure(client, "invalid", f"reply has no {ARRAYS_KEY!r} ArrayRecord (has {sorted(arrays)})", "arrays")
    try:
        state = torch_state(arrays[ARRAYS_KEY])
    except Exception as err:  # noqa: BLE001 - undecodable arrays from a foreign client
        return Failure(client, "invalid", one_line(f"reply arrays cannot be decoded: {err}"), "undecodable")
    metrics = reply.content.metric_records.get(METRICS_KEY)
    if metrics is None or NUM_EXAMPLES_KEY not in metrics:
        return Failure(client, "invalid", f"reply has no {METRICS_KEY!r}.{NUM_EXAMPLES_KEY!r}", "num-examples")
    values = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != NUM_EXAMPLES_KEY}
    return Reply(client, state, metrics[NUM_EXAMPLES_KEY], values)


def reported_profile(reply: Message) -> Profile | None:
    """The device profile a node reported in its identity-query reply (None: it has none); a
    malformed one is a one-line ``ValueError``."""
    record = reply.content.config_records.get(PROFILE_RECORD)
    return None if record is None else Profile.from_dict(dict(record))


class AlgorithmStrategy(Strategy):
    """The engine's tasks as Flower messages.

    Args:
        engine: the run's round engine (its config, algorithm and state).
        grid: the Grid to reach the nodes (``bind`` sets another).
        name: the engine name recorded in metrics.json (``simulation``, ``deployment``, ...).
        on_replies: called as ``(round, done, total, errors, finished)`` while a round waits.
        clients_are_partitions: the nodes are the partitions of the server's own data set
            (in-process, simulation): the engine bounds a reply's examples by its partition's
            size (``Transport.clients_are_partitions``); False for real SuperNodes.
    """

    def __init__(self, engine: RoundEngine, grid: Grid | None = None, name: str = "flower",
                 on_replies: Callable[[int, int, int, int, bool], None] | None = None,
                 clients_are_partitions: bool = False) -> None:
        self.engine = engine
        self.cfg = engine.cfg
        self.grid = grid
        self.name = name
        self.clients_are_partitions = clients_are_partitions
        self.on_replies = on_replies
        self.client_of: dict[int, int] = {}  # node id -> client id (its partition)
        self.node_of: dict[int, int] = {}  # client id -> node id
        self.refused: dict[int, str] = {}  # node id -> why it is not used (its identity query failed)
        self.profiles: dict[int, Profile | None] = {}  # client id -> the device profile it reported (the engine plans by it)
        self._tasks: list[ClientTask] = []
        self._early: dict[int, tuple[int, Reply | Failure]] = {}  # id(reply message) -> (bytes, outcome), see early()
        self._sent: list[int] = []
        self._pushed_at: float | None = None  # the round's timeline (Exchange.pushed_at, received_at)
        self._received_at: dict[int, float] = {}
        self._started = 0.0
        self._round = 0

    def bind(self, grid: Grid) -> "AlgorithmStrategy":
        self.grid = grid
        return self

    # --- who is who -------------------------------------------------------------------------
    def identify(self, nodes: Iterable[int]) -> None:
        """Ask every node not seen before which client it is. A node whose answer is an error
        (a bad node config: no or an out-of-range partition-id) is refused, with its reason
        logged once, and never sampled; a node that names no client is known by its node id."""
        new = [n for n in nodes if n not in self.client_of and n not in self.refused]
        if not new:
            return
        assert self.grid is not None
        queries = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in new]
        replies = self._waiting_grid().send_and_receive(queries, timeout=self.cfg.round_timeout)
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                self._refuse(node, one_line(reply.error.reason))
                continue
            try:
                profile = reported_profile(reply)
            except ValueError as err:
                self._refuse(node, one_line(f"bad device profile: {err}"))
                continue
            client = node
            if METRICS_KEY in reply.content.metric_records:
                client = int(reply.content.metric_records[METRICS_KEY].get(CLIENT_ID_KEY, node))
            if client in self.node_of and self.node_of[client] != node:
                log(WARNING, "node %s says it is client %s, which node %s already is; using its node id",
                    node, client, self.node_of[client])
                client = node
            self.client_of[node], self.node_of[client] = client, node
            self.profiles[client] = profile

    def _refuse(self, node: int, reason: str) -> None:
        """Never use ``node``: say why once, and keep the reason in metrics.json (``refused_nodes``)."""
        self.refused[node] = reason
        log(WARNING, "node %s is not used: %s", node, reason)
        if self.engine.metrics is not None:
            self.engine.metrics.refused_nodes[str(node)] = reason

    def clients(self, k: int) -> list[int]:
        """Ids of the connected, identified clients; waits (and says so) until ``k`` nodes
        are connected, or ``round-timeout`` has passed."""
        assert self.grid is not None, "bind a Grid first"
        start, last_log = time.monotonic(), 0.0
        while len(nodes := sorted(self.grid.get_node_ids())) < k:
            waited = time.monotonic() - start
            if waited >= self.cfg.round_timeout or self.engine.stop.is_set():
                if not nodes:
                    raise RuntimeError(f"no client connected within {self.cfg.round_timeout:.0f}s")
                log(WARNING, "only %d of %d clients connected after %.0fs; going on with them", len(nodes), k, waited)
                break
            if time.monotonic() - last_log > WAIT_LOG_SECONDS:
                log(INFO, "waiting for clients: %d connected, %d needed", len(nodes), k)
                last_log = time.monotonic()
            time.sleep(1.0)
        self.identify(nodes)
        return sorted(self.client_of[n] for n in nodes if n in self.client_of)

    # --- tasks <-> messages -------------------------------------------------------------------
    def messages(self, tasks: list[ClientTask], measure: bool = True) -> list[Message]:
        """One Message per task; clients of the same group share one RecordDict. Their serialized
        sizes are kept as the round's bytes down (``measure=False``: the caller measures them,
        ``measure_sent``, once they are on their way)."""
        contents: dict[object, RecordDict] = {}
        arrays: dict[object, object] = {}
        out = []
        for task in tasks:
            key = ("group", task.group) if task.group is not None else ("client", task.client)
            # members of a group share the arrays; a member whose config differs (e.g. one that
            # also sends its statistics, the first time it is sampled) gets its own RecordDict
            content_key = (key, repr(sorted(task.config.items())))
            if content_key not in contents:
                if key not in arrays:
                    arrays[key] = array_record(task.arrays)
                contents[content_key] = RecordDict({ARRAYS_KEY: arrays[key], CONFIG_KEY: ConfigRecord(task.config)})
            out.append(Message(content=contents[content_key], message_type=MessageType.TRAIN, dst_node_id=self.node_of[task.client]))
        if measure:
            self.measure_sent(out)
        return out

    def measure_sent(self, messages: list[Message]) -> None:
        """The bytes down of a round, reported with its outcomes."""
        self._sent = [wire_bytes(m) for m in messages]

    def outcomes(self, tasks: list[ClientTask], replies: Iterable[Message]) -> Exchange:
        """Decode the replies of a round (the engine checks and counts the rest); replies that
        ``early`` handled as they arrived are not decoded again."""
        expected = {self.node_of[t.client] for t in tasks}
        got, failures, up, up_of = [], [], [], {}
        for reply in replies:
            node = reply.metadata.src_node_id
            size, outcome = self._early.pop(id(reply), (None, None))
            up.append(wire_bytes(reply) if size is None else size)
            if node not in expected:
                log(WARNING, "ignoring a reply from node %s, which was not sent a task", node)
                continue
            expected.discard(node)
            up_of[self.client_of[node]] = up[-1]
            if outcome is None:
                outcome = decode_reply(reply, self.client_of[node])
            (failures if isinstance(outcome, Failure) else got).append(outcome)
        self._early.clear()
        received_at = {self.client_of[n]: t for n, t in self._received_at.items() if n in self.client_of}
        return Exchange(got, failures, list(self._sent), up, up_of, self._pushed_at, received_at)

    def early(self, tasks: list[ClientTask]) -> Callable[[Message], None]:
        """What to do with a reply the moment it arrives, while the round's other clients still
        train: size it, decode it and let the engine check it (``Reply.checked``), so that the
        round's end has only its last replies left to handle."""
        task_of = {self.node_of[t.client]: t for t in tasks}

        def handle(reply: Message) -> None:
            self._received_at.setdefault(reply.metadata.src_node_id, time.time())
            task = task_of.pop(reply.metadata.src_node_id, None)
            if task is None:  # not sent a task, or a second reply: outcomes() deals with it
                return
            outcome = decode_reply(reply, task.client)
            if isinstance(outcome, Reply) and outcome.client == task.client:
                outcome.checked = (task, self.engine.check(task, outcome))
            self._early[id(reply)] = (wire_bytes(reply), outcome)

        return handle

    # --- the engine's Transport ---------------------------------------------------------------
    def model_bytes(self, state: State) -> int:
        return wire_bytes(array_record(state))

    def exchange(self, server_round: int, tasks: list[ClientTask]) -> Exchange:
        assert self.grid is not None, "bind a Grid first"
        self._round = server_round
        grid = self._waiting_grid(self._replies_arrived)
        self._early.clear()
        self._pushed_at, self._received_at = None, {}
        if isinstance(grid, PollingGrid):  # sizes measured and replies handled while the clients train
            messages = self.messages(tasks, measure=False)
            # the timeline's zero: the push starts (a client may be handed its message before
            # the push call returns for all of them)
            self._pushed_at = time.time()
            replies = grid.send_and_receive(messages, timeout=self.cfg.round_timeout, on_message=self.early(tasks),
                                            after_push=lambda: self.measure_sent(messages))
        else:
            replies = grid.send_and_receive(self.messages(tasks), timeout=self.cfg.round_timeout)
        return self.outcomes(tasks, replies)

    def _waiting_grid(self, on_replies: Callable[[int, int, int, bool], None] | None = None) -> Grid:
        """A real Grid wrapped to count replies as they come and to stop waiting on a stop request."""
        assert self.grid is not None
        if callable(getattr(self.grid, "push_messages", None)):
            return PollingGrid(self.grid, on_replies, stop=self.engine.stop)
        return self.grid  # LocalGrid: answers at once

    def _replies_arrived(self, done: int, total: int, errors: int, finished: bool) -> None:
        if self.on_replies is not None:
            self.on_replies(self._round, done, total, errors, finished)

    # --- Flower's Strategy API ------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.bind(grid)
        self._started = time.perf_counter()
        self._tasks = self.engine.plan_round(server_round, self.clients(self.cfg.clients_per_round))
        return self.messages(self._tasks)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        entry = self.engine.finish_round(server_round, self._tasks, self.outcomes(self._tasks, replies), self._started)
        return array_record(self.engine.state), MetricRecord({NUM_EXAMPLES_KEY: entry.examples, "failures": entry.failures})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []  # the server evaluates the full head on its own test features

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log(INFO, "%s", self.engine.algorithm.describe())
