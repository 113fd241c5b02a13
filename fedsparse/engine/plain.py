"""The plain driver: every client of a round runs in this process, no Flower, no messages.

The reference the Flower drivers are checked against (same tasks, same client code, same
model bit for bit), and the fastest way to run an experiment on one machine. Bytes are the
raw tensor bytes of what a client receives and sends (no serialization).
"""

from __future__ import annotations

from fedsparse.algorithms import ClientTask
from fedsparse.algorithms.base import State
from fedsparse.config import RunConfig
from fedsparse.engine.client import run_task
from fedsparse.engine.rounds import Exchange, Failure, Reply, one_line
from fedsparse.model.ist import state_bytes
from fedsparse.profiles import profile_for


class PlainTransport:
    """Clients ``0 .. num-clients - 1`` (partition ids), trained one after the other."""

    name = "plain"
    clients_are_partitions = True  # every client is a partition of the server's data set


    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.profiles: dict = {}  # no client reports a profile: the engine uses device-profiles

    def clients(self, k: int) -> list[int]:
        return list(range(self.cfg.num_clients))

    def model_bytes(self, state: State) -> int:
        return state_bytes(state)

    def exchange(self, server_round: int, tasks: list[ClientTask]) -> Exchange:
        replies, failures, up, up_of = [], [], [], {}
        for task in tasks:
            try:
                arrays, n, metrics = run_task(self.cfg, task.client, self.cfg.num_clients, task.arrays, task.config,
                                              profile=profile_for(self.cfg, task.client))
            except Exception as err:  # noqa: BLE001 - a failing client is counted, not fatal
                failures.append(Failure(task.client, "error", one_line(f"{type(err).__name__}: {err}")))
                continue
            replies.append(Reply(task.client, arrays, n, metrics))
            up.append(state_bytes(arrays))
            up_of[task.client] = up[-1]
        return Exchange(replies, failures, [state_bytes(t.arrays) for t in tasks], up, up_of)
