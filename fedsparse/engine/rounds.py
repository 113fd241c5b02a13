"""The round loop, once, for every driver.

Each round the engine samples the round's clients (from the ids the driver says are
available), asks the algorithm for one task per client, lets the driver carry the tasks
out (``Transport.exchange``: in this process, as Flower messages, on the Simulation
Engine, on real SuperNodes), checks every reply against what was sent, lets the algorithm
aggregate the accepted ones (in task order, whatever order they arrived in), evaluates the
head on the server's test features, and writes ``checkpoint.pt``, ``model.pt`` and
``metrics.json``. ``fedsparse run --resume`` continues after the last written round.

Every draw is a function of (``seed``, round, client id): sampling here, partitions in the
algorithms, batches in the clients. The same config therefore gives the same model in any
driver and after any resume, whatever ids Flower gives the nodes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch

from fedsparse.accounting.timeline import client_timeline
from fedsparse.algorithms import Algorithm, ClientTask, ClientUpdate, make_algorithm
from fedsparse.algorithms.base import STATS, State
from fedsparse import errors
from fedsparse.config import RunConfig, parse_pardon, round_lr
from fedsparse.engine.client import torch_threads
from fedsparse.engine.checkpoint import MODEL, BackgroundWriter, Checkpoint, atomic_torch_save, check_resumable
from fedsparse.engine.metrics import PER_CLIENT_MAX, ClientRecord, RoundMetrics, RunMetrics, client_record, client_summary, plot_accuracy
from fedsparse.engine.adversary import make_adversary
from fedsparse.engine.exchange import Exchange, Failure, RejectedReply, Reply
from fedsparse.engine.nodes import NodeTable
from fedsparse.engine.outliers import OutlierRecord
from fedsparse.model.head import count_params, evaluate, state_dims
from fedsparse.model.residual import build_head
from fedsparse.model.ist import all_finite, state_bytes
from fedsparse.profiles import Profile, profile_for
from fedsparse.protocol import CLIENT_TASK_KEY, EXTRACT_SECONDS_KEY, TRAIN_SECONDS_KEY, RoundSettings
from fedsparse.seeds import derive_seed
from fedsparse.task import initial_head, partition_sizes_of, test_features

log = logging.getLogger("fedsparse")

UPDATE_RATIO_KEY = "update-ratio"  # set by check_reply on accepted updates (server side)

# The process's stop request: engines watch it unless given their own event.
STOP = threading.Event()


class Transport(Protocol):
    """How the engine reaches clients, and what it can tell the engine about them. The engine
    asks these attributes; it never changes behaviour by ``name``, which only goes into
    metrics.json as the engine.

    Attributes:
        name: the engine name recorded in metrics.json.
        clients_are_partitions: its client ids are the partitions ``0 .. num-clients - 1`` of
            the server's own data set (plain, in-process, simulation), so a reply may claim at
            most its partition's size; False where clients bring their own data (deployment:
            ``max-examples`` bounds a reply instead).
        profiles: client id -> the device profile the client reported (deployment: its node
            config); empty where clients report none (their profile then comes from
            ``device-profiles``).
    """

    name: str
    clients_are_partitions: bool
    profiles: Mapping[int, Profile | None]

    def clients(self, k: int) -> list[int]:
        """The ids of the clients available now (wait for ``k`` when they may still connect)."""

    def exchange(self, server_round: int, tasks: list[ClientTask]) -> Exchange:
        """Send every task to its client and collect what comes back."""

    def model_bytes(self, state: State) -> int:
        """Size of the full head as this transport sends it."""


def sample_clients(seed: int, server_round: int, available: Sequence[int], k: int) -> list[int]:
    """``k`` of the ``available`` client ids (all of them when fewer), drawn from (seed, round)."""
    pool = sorted(set(available))
    return random.Random(derive_seed("sampling", seed, server_round)).sample(pool, min(k, len(pool)))


def update_ratio(sent: torch.Tensor, got: torch.Tensor) -> float:
    """How far a reply moved an array: ``||got - sent|| / max(||sent||, FLOOR * sqrt(numel))``
    (the floor keeps an array sent as zeros, e.g. a fresh bias, from making any change infinite)."""
    scale = max(float(sent.float().norm()), UPDATE_FLOOR * sent.numel() ** 0.5)
    return float((got.float() - sent.float()).norm()) / scale


UPDATE_FLOOR = 0.01  # an RMS of 0.01 per entry: below any trained weight of the head


def check_reply(task: ClientTask, reply: Reply, *, update_bound: float = 0.0,
                max_examples: int | None = None) -> ClientUpdate:
    """The reply as an accepted update, or ``RejectedReply`` saying what is wrong with it.

    A reply must hold exactly the arrays it was sent, each with the same dtype and shape
    (or, where the task names a ``reply`` spec, exactly the arrays of that spec: statistics,
    class counts), all finite, and an integer example count of at least 1 and at most
    ``max_examples`` (the client's true partition size where the server knows it). With
    ``update_bound`` > 0 every array it was sent may move by at most that many times its own
    norm (``update_ratio``): a finite but absurd reply (all weights 1e38, a bias + 1e6) is
    refused instead of ruining the head.
    """
    spec = task.reply_spec()
    missing = sorted(set(spec) - set(reply.arrays))
    extra = sorted(set(reply.arrays) - set(spec))
    if missing or extra:
        raise RejectedReply("arrays", f"arrays differ from those expected: missing {missing}, unexpected {extra}")
    for key, (shape, dtype) in spec.items():
        got = reply.arrays[key]
        if not isinstance(got, torch.Tensor):
            raise RejectedReply("arrays", f"{key} is not a tensor")
        if got.dtype != dtype:
            raise RejectedReply("dtype", f"{key} has dtype {got.dtype}, expected {dtype}")
        if tuple(got.shape) != tuple(shape):
            raise RejectedReply("shape", f"{key} has shape {tuple(got.shape)}, expected {tuple(shape)}")
        if not all_finite({key: got}):
            raise RejectedReply("non-finite", f"{key} holds NaN or Inf")
    n = reply.num_examples
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise RejectedReply("num-examples", f"invalid num-examples {n!r}")
    if max_examples is not None and n > max_examples:
        raise RejectedReply("num-examples", f"claims {n} examples; at most {max_examples} are possible")
    if task.check is not None:  # the algorithm's own plausibility check (e.g. statistics)
        try:
            task.check(reply.arrays, n)
        except ValueError as err:
            raise RejectedReply("implausible", str(err)) from None
    # arrays that come back as sent (a spec may add others: class counts): bound how far they moved
    ratio = max((update_ratio(task.arrays[k], reply.arrays[k]) for k in task.arrays if k in spec), default=0.0)
    if update_bound > 0 and ratio > update_bound:
        raise RejectedReply("update-bound", f"moved its arrays {ratio:.3g} times their norm; "
                                            f"update-bound is {update_bound:g}")
    return ClientUpdate(task.client, reply.arrays, n, {**reply.metrics, UPDATE_RATIO_KEY: ratio})


REASON_CHARS = 300  # a failed client's reason in the log and the metrics


def one_line(text: object) -> str:
    """A failed client's (possibly multi-line) reason as one log line of at most
    ``REASON_CHARS`` characters (``fedsparse.errors.one_line``)."""
    return errors.one_line(text, REASON_CHARS)


class RoundEngine:
    """Runs ``cfg.num_rounds`` rounds of ``cfg``'s algorithm through a ``Transport``.

    Args:
        cfg: the run's config (read once).
        algorithm: defaults to ``make_algorithm(cfg)``.
        report: where round lines go (default: the ``fedsparse`` logger).
    """

    def __init__(self, cfg: RunConfig, algorithm: Algorithm | None = None,
                 report: Callable[[str], None] | None = None, stop: threading.Event | None = None) -> None:
        self.cfg = cfg
        self.algorithm = algorithm if algorithm is not None else make_algorithm(cfg)
        self.report = report if report is not None else log.info
        self.out = Path(cfg.out_dir)
        # set (e.g. by fedsparse.commands.signals on Ctrl-C): no new round starts, and a round still
        # waiting for replies is abandoned (not counted); the finished rounds stay on disk
        self.stop = stop if stop is not None else STOP
        self.test, self.num_classes = test_features(cfg)
        self.head_dims = initial_head(cfg, self.test.x.shape[1], self.num_classes).dims
        self.state: State = {}
        self.done = 0  # rounds finished
        self.metrics: RunMetrics | None = None
        self.nodes = NodeTable()  # client tasks per Ray node (fedsparse.engine.nodes)
        self._cpu_mark = time.process_time()  # this process's CPU time when the last round ended
        self._t_start = time.perf_counter()
        self._sizes: list[int] | None = None  # partition sizes, when the driver is exact about them
        self._exact_sizes = False
        self._transport: Transport | None = None
        self._writer = BackgroundWriter()  # the round's files are written while the next round runs
        self._saved = -1  # the last round whose files were submitted for writing
        self._saved_at = -math.inf  # when (time.monotonic())
        # torch threads for a round's own work in ``run`` (0: the process's). The Simulation Engine's
        # server sets 1: its clients train on the same cores, and an idle OpenMP thread of this
        # process spinning between the server's small operations took a fifth of a core from them.
        # Evaluating the full head keeps the process's threads (``eval_threads``): it is 1.6x
        # faster with two, and no client trains while it runs.
        self.round_threads = 0
        self.eval_threads = torch.get_num_threads()
        self.adversary = make_adversary(cfg)  # hostile clients (fault-mode an attack), else None
        self.outliers = OutlierRecord(cfg.outlier_strikes, cfg.num_clients)  # clients no longer sampled

    def initial_head_state(self) -> State:
        """The head every run of this config starts from (seeded by ``seed``)."""
        return initial_head(self.cfg, self.test.x.shape[1], self.num_classes).state_dict()

    def max_examples(self, client: int) -> int | None:
        """The most examples a reply of ``client`` may claim: its partition's true size where the
        server knows the partitions (simulation, in-process, plain), else ``max-examples``."""
        if self._sizes is None:
            self._sizes = []
            if self._exact_sizes:
                self._sizes = partition_sizes_of(self.cfg)
        if 0 <= client < len(self._sizes):
            return self._sizes[client]
        return self.cfg.max_examples or None

    # --- start: fresh or resumed -------------------------------------------------------------
    def start(self, transport: Transport) -> int:
        """Initial head and evaluation, or the checkpoint's state when ``cfg.resume``; returns
        the number of rounds already done."""
        self._t_start = time.perf_counter()
        self._exact_sizes = transport.clients_are_partitions
        self._transport = transport
        if self.adversary is not None:
            self.adversary.check_transport(transport.clients_are_partitions, transport.name)
        self.out.mkdir(parents=True, exist_ok=True)
        if self.cfg.resume:
            ckpt = Checkpoint.load(self.out)
            check_resumable(ckpt, self.cfg.to_run_config())
            self.state = {k: v.clone() for k, v in ckpt.state.items()}
            self.algorithm.load_state_dict(ckpt.algorithm)
            self.metrics = RunMetrics.from_dict(ckpt.metrics)
            self.metrics.config = self.cfg.to_run_config()
            self.nodes = NodeTable(self.metrics.ray_nodes)
            self.outliers = OutlierRecord(self.cfg.outlier_strikes, self.cfg.num_clients, self.metrics.outliers)
            freed = self.outliers.pardon(parse_pardon(self.cfg.outlier_pardon))
            if freed:
                self.report(f"outlier-pardon: clients {', '.join(map(str, freed))} may be sampled again")
            self.metrics.outliers = self.outliers.to_dict()
            self.done = self._saved = ckpt.round  # its files are on disk
            if self.done < self.cfg.num_rounds:
                self.metrics.resumed_at.append(self.done)
                self.metrics.finished = False
            self.report(f"resuming after round {self.done}/{self.cfg.num_rounds} from {self.out / 'checkpoint.pt'}")
            self._cpu_mark = time.process_time()
            return self.done
        head = initial_head(self.cfg, self.test.x.shape[1], self.num_classes)
        self.state = self.initial_head_state()
        accuracy, loss = evaluate(head, self.test.x, self.test.y)
        self.metrics = RunMetrics(
            config=self.cfg.to_run_config(), engine=transport.name, model_params=count_params(head.dims),
            model_bytes=transport.model_bytes(self.state), num_classes=self.num_classes,
            test_examples=len(self.test.y), head_dims=list(head.dims), algorithm=self.algorithm.describe(),
            initial={"accuracy": accuracy, "loss": loss},
        )
        self.done = 0
        self.report(f"round 0/{self.cfg.num_rounds}: accuracy {accuracy:.4f} (initial head)")
        self._write()
        self._cpu_mark = time.process_time()
        return 0

    # --- one round, in two halves (a Flower Strategy calls them from configure/aggregate) ---
    def profile_of(self, client: int) -> Profile | None:
        """A client's device profile (``fedsparse.profiles``): what it reported to the transport
        (``Transport.profiles``, deployment: its node config), else its share of
        ``device-profiles`` by partition id (simulation), else None."""
        reported = self._transport.profiles if self._transport is not None else {}
        if client in reported:
            return reported[client]
        if self.cfg.device_profiles and 0 <= client < self.cfg.num_clients:
            return profile_for(self.cfg, client)
        return None

    def plan_round(self, server_round: int, available: Sequence[int]) -> list[ClientTask]:
        """Sample the round's clients and let the algorithm give each a task. Clients with a
        device profile get its local steps and batch size, and an algorithm that sizes its
        tasks (IST) gets their capacities (a client without a profile counts as 1). Clients the
        outlier record has banned are not sampled (``fedsparse.engine.outliers``)."""
        if self.outliers.banned:
            available = self.outliers.eligible(available)
        clients = sample_clients(self.cfg.seed, server_round, available, self.cfg.clients_per_round)
        if not clients:
            raise RuntimeError(f"round {server_round}: no client is available")
        profiles = [self.profile_of(c) for c in clients]
        if any(profiles) and self.algorithm.supports_capacities:
            capacities = [prof.width if prof is not None else 1.0 for prof in profiles]
            tasks = self.algorithm.plan(server_round, self.state, clients, capacities=capacities)  # type: ignore[call-arg]
        else:
            tasks = self.algorithm.plan(server_round, self.state, clients)
        settings = RoundSettings(server_round, self.cfg.local_steps, round_lr(self.cfg, server_round, self.algorithm.client_lr()),
                                 self.cfg.batch_size)
        profile_of = dict(zip(clients, profiles))
        for task in tasks:
            prof = profile_of.get(task.client)
            mine = settings if prof is None else dataclasses.replace(settings, local_steps=prof.local_steps,
                                                                     batch_size=prof.batch_size)
            task.config = {**mine.to_config(), CLIENT_TASK_KEY: self.algorithm.client_task, **task.config}
        return tasks

    def _add_profile_fields(self, records: list[ClientRecord], tasks: Sequence[ClientTask], exchange: Exchange,
                            full: State) -> None:
        """Rounds with device profiles: each per-client record (task order) gains the client's
        profile and capacity, its slice (hidden widths, share of the full head's tensor bytes),
        the bytes of its reply and the local steps and batch size it was given."""
        if not records or len(records) != len(tasks) or not any(self.profile_of(t.client) for t in tasks):
            return
        total = state_bytes(full) or 1
        for rec, task in zip(records, tasks):
            prof = self.profile_of(task.client)
            try:
                dims = list(state_dims(task.arrays))
            except (KeyError, IndexError):
                dims = []
            rec.profile = prof.name if prof is not None else None
            rec.capacity = prof.width if prof is not None else 1.0
            rec.slice_dims, rec.slice_share = dims, state_bytes(task.arrays) / total
            rec.bytes_up = exchange.bytes_up_of.get(task.client)
            given = RoundSettings.from_config(task.config)
            rec.local_steps, rec.batch_size = given.local_steps, given.batch_size

    def check(self, task: ClientTask, reply: Reply) -> "ClientUpdate | RejectedReply":
        """``check_reply`` with this run's bounds: the accepted update, or the rejection."""
        try:
            return check_reply(task, reply, update_bound=self.cfg.update_bound,
                               max_examples=self.max_examples(reply.client))
        except RejectedReply as err:
            return err

    def finish_round(self, server_round: int, tasks: Sequence[ClientTask], exchange: Exchange,
                     started: float) -> RoundMetrics:
        """Check the replies, aggregate, evaluate when due, write the round's files."""
        assert self.metrics is not None, "finish_round before start"
        if self.adversary is not None:  # hostile clients' replies replaced before any check
            exchange = self.adversary.apply(server_round, tasks, exchange)
        task_of = {t.client: t for t in tasks}
        failures = list(exchange.failures)
        accepted: dict[int, ClientUpdate] = {}
        for reply in exchange.replies:
            task = task_of.get(reply.client)
            if task is None or reply.client in accepted:
                log.warning("round %d: ignoring an unexpected reply from client %s", server_round, reply.client)
                continue
            result = reply.checked[1] if reply.checked is not None and reply.checked[0] is task else self.check(task, reply)
            if isinstance(result, RejectedReply):
                failures.append(Failure(reply.client, "invalid", one_line(result), result.code))
            else:
                accepted[reply.client] = result
        answered = set(accepted) | {f.client for f in failures}
        failures += [Failure(t.client, "lost", "no reply in time") for t in tasks if t.client not in answered]
        for f in failures:
            log.warning("round %d: client %s %s: %s", server_round, f.client,
                        {"error": "failed", "invalid": "sent a bad reply", "lost": "did not reply"}[f.kind], f.reason)
        updates = [accepted[t.client] for t in tasks if t.client in accepted]  # task order, not arrival order
        with torch_threads(1):  # sums over clients come out the same whatever this process's thread count
            new_state = self.algorithm.aggregate(server_round, self.state, tasks, updates)
        banned = self.outliers.note(server_round, [u.client for u in updates], [u.metrics for u in updates])
        if banned:
            log.warning("round %d: client(s) %s not sampled again: clipped in %d rounds (outlier-strikes)",
                        server_round, ", ".join(map(str, banned)), self.outliers.needed)
        if self.outliers.strikes:
            self.metrics.outliers = self.outliers.to_dict()
        kept = not all_finite(new_state)
        if kept:
            log.warning("round %d: the aggregated head is not finite; keeping the previous head", server_round)
        else:
            self.state = new_state
        due = server_round % self.cfg.eval_every == 0 or server_round == self.cfg.num_rounds
        accuracy = loss = None
        if due:
            with torch_threads(self.eval_threads):
                accuracy, loss = evaluate(build_head(self.state), self.test.x, self.test.y)
        rejected: dict[str, int] = {}
        for f in failures:
            if f.kind == "invalid":
                rejected[f.code or "undecodable"] = rejected.get(f.code or "undecodable", 0) + 1
        kinds = {k: sum(1 for f in failures if f.kind == k) for k in ("error", "invalid", "lost")}
        nodes = self.nodes.add(r.metrics for r in exchange.replies if r.metrics)  # every reply ran somewhere
        if nodes is not None:
            self.metrics.ray_nodes = self.nodes.rows()
        down, up = exchange.bytes_down, exchange.bytes_up
        entry = RoundMetrics(
            round=server_round, accuracy=accuracy, loss=loss, clients=len(updates),
            examples=sum(u.num_examples for u in updates), sampled=len(tasks),
            subnets=len({t.group if t.group is not None else ("own", t.client)
                         for t in ([t for t in tasks if t.config.get(CLIENT_TASK_KEY) != STATS] or tasks)}),
            failures=len(failures), failed_error=kinds["error"], failed_invalid=kinds["invalid"],
            failed_lost=kinds["lost"],
            bytes_down_per_client=sum(down) / len(down) if down else 0.0,
            bytes_up_per_client=sum(up) / len(up) if up else 0.0,
            bytes_down_total=int(sum(down)), bytes_up_total=int(sum(up)),
            seconds=time.perf_counter() - started, elapsed=time.perf_counter() - self._t_start,
            rejected=rejected, head_kept=kept, **client_summary([u.metrics for u in updates]),
            update_ratio_max=max((u.metrics.get(UPDATE_RATIO_KEY, 0.0) for u in updates), default=None),
            per_client=self._client_records(tasks, accepted, failures, exchange), ray_nodes=nodes,
            server_cpu_seconds=time.process_time() - self._cpu_mark,
        )
        self._add_profile_fields(entry.per_client, tasks, exchange, self.state)
        add_timeline(entry, tasks, exchange, [u.metrics for u in updates])
        self.metrics.rounds.append(entry)
        self.done = server_round
        if self.save_due():
            self._write()
        self.report(entry.line(self.cfg.num_rounds))
        self._cpu_mark = time.process_time()
        return entry

    def save_due(self) -> bool:
        """Whether this round's files are written: ``save-seconds`` after the last write (0:
        every round), the first and the last round always. A simulated round of 0.1 s would
        otherwise write ~10 MB of checkpoint and model every round, on the cores its clients
        train on; ``finish`` writes the last round done of a stopped run."""
        return (self.cfg.save_seconds <= 0 or self._saved < 1 or self.done >= self.cfg.num_rounds
                or time.monotonic() - self._saved_at >= self.cfg.save_seconds)

    @staticmethod
    def _client_records(tasks: Sequence[ClientTask], accepted: dict[int, ClientUpdate], failures: list[Failure],
                        exchange: Exchange) -> list[ClientRecord]:
        """``RoundMetrics.per_client``: one record per task, in task order."""
        if len(tasks) > PER_CLIENT_MAX:
            return []
        down = exchange.bytes_down if len(exchange.bytes_down) == len(tasks) else [None] * len(tasks)
        failed = {f.client: f for f in failures}
        replied = {r.client: r for r in exchange.replies}
        out = []
        for task, sent in zip(tasks, down):
            if task.client in accepted:
                u = accepted[task.client]
                out.append(client_record(task.client, "ok", sent, u.metrics, u.num_examples))
            else:
                f = failed.get(task.client, Failure(task.client, "lost", "no reply in time"))
                got = replied.get(task.client)
                out.append(client_record(task.client, f.kind, sent, got.metrics if got else None, reason=f.reason))
        return out

    # --- the loop ---------------------------------------------------------------------------
    def run(self, transport: Transport) -> RunMetrics:
        """Start (or resume) and run the remaining rounds; returns the run's metrics."""
        self.start(transport)
        for server_round in range(self.done + 1, self.cfg.num_rounds + 1):
            if self.stop.is_set():
                break
            started = time.perf_counter()
            with torch_threads(self.round_threads or torch.get_num_threads()):
                tasks = self.plan_round(server_round, transport.clients(self.cfg.clients_per_round))
                exchange = transport.exchange(server_round, tasks)
                if self.stop.is_set() and len(exchange.replies) < len(tasks):
                    break  # interrupted while waiting: the round in flight is not counted
                self.finish_round(server_round, tasks, exchange, started)
        return self.finish()

    def finish(self) -> RunMetrics:
        """Mark the run finished when every round is done, write metrics and the plot."""
        assert self.metrics is not None
        self.metrics.finished = self.done >= self.cfg.num_rounds
        if self._saved != self.done:  # stopped between two writes: its last round is written now
            self._write()
        self._write(checkpoint=False)
        plot_accuracy(self.metrics, self.out / "accuracy.png")
        return self.metrics

    def _write(self, checkpoint: bool = True) -> None:
        """The round's files: ``checkpoint.pt``, ``model.pt`` and ``metrics.json`` in the
        background (``BackgroundWriter``), from the round's head and copies of the rest taken
        here, so the next round need not wait for the disk; ``checkpoint=False`` (the run's end)
        waits for them and writes ``metrics.json`` before it returns."""
        assert self.metrics is not None
        self.metrics.wall_seconds = time.perf_counter() - self._t_start
        if not checkpoint:
            self._writer.wait()
            self.metrics.write(self.out)
            return
        self._saved, self._saved_at = self.done, time.monotonic()
        metrics = self.metrics.snapshot()
        # no copy of the head: its tensors are never changed in place (each round's aggregate is
        # a new state; tests/test_engine.py checks every algorithm), so the next round cannot
        # change what this write reads. The algorithm's own state may be, so it is copied.
        state = dict(self.state)
        algorithm = clone_tensors(self.algorithm.state_dict())
        done, config, out = self.done, self.cfg.to_run_config(), self.out

        def write() -> None:
            text = metrics.json_text()
            Checkpoint(done, state, algorithm, text, config).save(out)
            atomic_torch_save(state, out / MODEL)
            metrics.write(out, text)

        self._writer.submit(write)


def add_timeline(entry: RoundMetrics, tasks: Sequence[ClientTask], exchange: Exchange,
                 used: Sequence[dict[str, float]]) -> None:
    """The round's overhead (its seconds minus the slowest used client's extract + train seconds)
    and, in each per-client record, that client's timeline: its stamps as seconds after the push
    (``fedsparse.accounting.timeline``), where the reply or the transport carried them."""
    work = [m.get(EXTRACT_SECONDS_KEY, 0.0) + m.get(TRAIN_SECONDS_KEY, 0.0) for m in used
            if EXTRACT_SECONDS_KEY in m or TRAIN_SECONDS_KEY in m]
    if work:
        entry.work_seconds = max(work)
        entry.overhead_seconds = entry.seconds - max(work)
    entry.pushed_at = exchange.pushed_at
    if len(entry.per_client) != len(tasks):
        return
    replied = {r.client: r.metrics for r in exchange.replies}
    for rec, task in zip(entry.per_client, tasks):
        line = client_timeline(replied.get(task.client, {}), exchange.pushed_at, exchange.received_at.get(task.client))
        if line:
            rec.timeline = line


def clone_tensors(obj: Any) -> Any:
    """``obj`` with every tensor in it (in dicts, lists, tuples) cloned: what a background write
    may read while the next round changes the originals."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: clone_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(clone_tensors(v) for v in obj)
    return obj
