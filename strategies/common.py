"""What both strategies share: seeded client sampling, reply checks, and per-round stats."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Iterable, Mapping

import torch
from flwr.app import Message, MetricRecord
from flwr.serverapp import Grid
from flwr.supercore import log

from fedsparse.ist import check_slice
from fedsparse.protocol import ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES_KEY, TRAIN_LOSS_KEY, wire_bytes

WAIT_LOG_SECONDS = 10.0


def sample_clients(
    grid: Grid, k: int, rng: random.Random, timeout: float | None = None, poll: float = 1.0
) -> list[int]:
    """``k`` connected node ids drawn with ``rng``; waits (and says so) until ``k`` are connected.

    After ``timeout`` seconds it goes on with the nodes that are connected (fewer than ``k``,
    logged), or raises ``RuntimeError`` when there are none.
    """
    start = time.monotonic()
    last_log = 0.0
    while len(nodes := sorted(grid.get_node_ids())) < k:
        waited = time.monotonic() - start
        if timeout is not None and waited >= timeout:
            if not nodes:
                raise RuntimeError(f"no client connected within {timeout:.0f}s")
            log(WARNING, "only %d of %d clients connected after %.0fs; going on with them", len(nodes), k, waited)
            return rng.sample(nodes, len(nodes))
        if time.monotonic() - last_log > WAIT_LOG_SECONDS:
            log(INFO, "waiting for clients: %d connected, %d needed", len(nodes), k)
            last_log = time.monotonic()
        time.sleep(poll)
    return rng.sample(nodes, k)


@dataclass
class RoundStats:
    """Bookkeeping of one training round, filled by a strategy and read by the ServerApp."""

    round: int
    started: float = field(default_factory=time.perf_counter)
    bytes_down: list[int] = field(default_factory=list)
    bytes_up: list[int] = field(default_factory=list)
    sent: int = 0
    subnets: int = 0
    replies: int = 0
    failures: int = 0  # errors + invalid + lost
    errors: int = 0  # the client answered with an error (it raised)
    invalid: int = 0  # malformed reply: missing or mis-shaped arrays, NaN/Inf, bad num-examples
    lost: int = 0  # no answer within round-timeout
    client_metrics: list[dict[str, float]] = field(default_factory=list)

    def record_sent(self, messages: Iterable[Message]) -> list[Message]:
        out = list(messages)
        self.bytes_down.extend(wire_bytes(m) for m in out)
        self.sent = len(out)
        return out

    def mean_metric(self, key: str) -> float | None:
        vals = [m[key] for m in self.client_metrics if key in m]
        return float(sum(vals) / len(vals)) if vals else None

    def max_metric(self, key: str) -> float | None:
        vals = [m[key] for m in self.client_metrics if key in m]
        return float(max(vals)) if vals else None


def parse_reply(
    reply: Message, expected: Mapping[str, tuple[int, ...]]
) -> tuple[dict[str, torch.Tensor], int, dict[str, float]]:
    """(state, num_examples, metrics) of a client's training reply, or ``ValueError`` saying what is wrong.

    ``expected`` maps each array key to the shape the server sent it with.
    """
    if reply.has_error():
        raise ValueError(f"client error {reply.error.code}: {reply.error.reason}")
    arrays = reply.content.array_records
    if ARRAYS_KEY not in arrays:
        raise ValueError(f"reply has no {ARRAYS_KEY!r} ArrayRecord (has {sorted(arrays)})")
    try:
        state = arrays[ARRAYS_KEY].to_torch_state_dict()
    except Exception as err:  # noqa: BLE001 - undecodable arrays from a foreign client
        raise ValueError(f"reply arrays cannot be decoded: {err}") from None
    check_slice(state, expected)
    metrics_rec = reply.content.metric_records.get(METRICS_KEY)
    if metrics_rec is None or NUM_EXAMPLES_KEY not in metrics_rec:
        raise ValueError(f"reply has no {METRICS_KEY!r}.{NUM_EXAMPLES_KEY!r}")
    num_examples = metrics_rec[NUM_EXAMPLES_KEY]
    if not isinstance(num_examples, int) or num_examples < 0:
        raise ValueError(f"reply has invalid {NUM_EXAMPLES_KEY}: {num_examples!r}")
    metrics = {k: float(v) for k, v in metrics_rec.items() if isinstance(v, (int, float))}
    return state, num_examples, metrics


def collect_replies(
    stats: RoundStats, replies: Iterable[Message], expected_for: Mapping[int, Mapping[str, tuple[int, ...]]]
) -> list[tuple[int, dict[str, torch.Tensor], int]]:
    """Valid replies as ``(node_id, state, num_examples)``; every bad or missing one is logged
    in one line and counted in ``stats.failures``, and leaves the model untouched."""
    good: list[tuple[int, dict[str, torch.Tensor], int]] = []
    seen: set[int] = set()
    for reply in replies:
        node = reply.metadata.src_node_id
        stats.bytes_up.append(wire_bytes(reply))
        if node not in expected_for or node in seen:
            log(WARNING, "round %d: ignoring unexpected reply from node %s", stats.round, node)
            continue
        seen.add(node)
        try:
            state, n, metrics = parse_reply(reply, expected_for[node])
        except ValueError as err:
            stats.failures += 1
            if reply.has_error():
                stats.errors += 1
            else:
                stats.invalid += 1
            log(WARNING, "round %d: dropping reply of node %s: %s", stats.round, node, _one_line(str(err)))
            continue
        stats.client_metrics.append(metrics)
        good.append((node, state, n))
    lost = len(set(expected_for) - seen)
    if lost:
        stats.failures += lost
        stats.lost += lost
        log(WARNING, "round %d: %d client(s) did not reply in time", stats.round, lost)
    stats.replies = len(good)
    return good


def _one_line(text: str, limit: int = 300) -> str:
    """A client's error reason (possibly a traceback) as one short log line."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def train_metrics(stats: RoundStats, good: list) -> MetricRecord:
    """The round's MetricRecord: examples used, replies, failures, mean client train loss."""
    total = sum(n for _, _, n in good)
    loss = stats.mean_metric(TRAIN_LOSS_KEY)
    out = {NUM_EXAMPLES_KEY: total, "replies": stats.replies, "failures": stats.failures}
    if loss is not None:
        out[TRAIN_LOSS_KEY] = loss
    return MetricRecord(out)
