"""The hostile clients of a run (``fault-mode`` one of ``fedsparse.attacks.ATTACK_MODES``).

The round engine hands every round's ``Exchange`` to ``Adversary.apply`` before it checks the
replies: the replies of the hostile clients (``fedsparse.attacks.is_hostile``: a fixed set of
about ``fault-rate`` of all clients) are replaced by what the attack builds from their honest
replies (and, for the colluding attacks, from the honest replies of their group), or, with
``drop``, turned into failures. The replaced replies then go through the same checks as any
other. Because it acts on the exchange, the same attack runs in every driver: the plain loop,
the in-process Flower driver and the Simulation Engine (where the ClientApp's fault mod lets
attack modes pass). ``label-flip`` retrains the hostile client on flipped labels here, so it
needs the server to hold the clients' partitions (plain, in-process, simulation).

**Statistics stay inside the bounds.** The update attacks (every mode but ``label-flip``)
leave a hostile client's reply to a statistics task (``client-task = stats``) as it is:
scaled, noisy or negated statistics fail the plausibility check outright
(``check_ridge_stats``), and a client whose statistics are refused is never counted, so under
IST from the closed form it would never be sent a slice to attack. The attacker that passes
every check sends its true statistics, is counted, and attacks its updates. ``label-flip``
sends the statistics of its flipped labels, a plausible lie the check cannot see.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from fedsparse.algorithms.base import (CLASS_COUNTS, LABEL_AWARE_KEY, NUM_CLASSES_KEY, STATS, STATS_KEY, STATS_PREFIX,
                                       WITH_STATS_KEY, ClientTask)
from fedsparse.engine.client import stats_input
from fedsparse.model.residual import skip_input
from fedsparse.attacks import (
    ATTACK_MODES,
    COLLUDING,
    DROP,
    attack_generator,
    attacked_keys,
    colluding_attack,
    flip_labels,
    hostile_clients,
    single_attack,
)
from fedsparse.config import RunConfig
from fedsparse.engine.exchange import Exchange, Failure, Reply
from fedsparse.protocol import CLIENT_TASK_KEY

NEEDS_DATA = ("label-flip",)


def make_adversary(cfg: RunConfig) -> "Adversary | None":
    """The run's adversary, or None when ``fault-mode`` is no attack or ``fault-rate`` is 0."""
    if cfg.fault_mode not in ATTACK_MODES or cfg.fault_rate <= 0:
        return None
    return Adversary(cfg)


def label_flip_reply(cfg: RunConfig, task: ClientTask) -> tuple[dict[str, torch.Tensor], int]:
    """What client ``task.client`` sends after training (or computing its statistics) on
    flipped labels: the honest client's work, on poisoned data."""
    from fedsparse.model.closed_form import stats_for
    from fedsparse.task import client_features, train_slice

    conf = task.config
    server_round = int(conf["server-round"])
    feats = client_features(cfg, task.client, cfg.num_clients, server_round)
    if CLASS_COUNTS in (task.reply or {}) or NUM_CLASSES_KEY in conf:
        num_classes = int(conf[NUM_CLASSES_KEY])
    else:
        last = max(int(k.split(".")[1]) for k in task.arrays if k.startswith("layers."))
        num_classes = int(task.arrays[f"layers.{last}.weight"].shape[0])
    y = flip_labels(feats.y, num_classes)
    if str(conf.get(CLIENT_TASK_KEY, "train")) == STATS:
        with torch.no_grad():
            return stats_for(str(conf[STATS_KEY]), stats_input(task.arrays, feats.x), y, num_classes), len(y)
    label_aware = bool(int(conf.get(LABEL_AWARE_KEY, 0)))
    trained, _ = train_slice(cfg, task.arrays, replace(feats, y=y), server_round, task.client,
                             steps=int(conf["local-steps"]), batch_size=int(conf["batch-size"]), lr=float(conf["lr"]),
                             label_aware=label_aware)
    if label_aware:
        trained[CLASS_COUNTS] = torch.bincount(y.long(), minlength=num_classes)[:num_classes].to(torch.float32)
    if WITH_STATS_KEY in conf:  # the statistics a first-time client sends with its slice, of flipped labels too
        with torch.no_grad():
            stats = stats_for(str(conf[WITH_STATS_KEY]), skip_input(task.arrays, feats.x), y, num_classes)
        trained.update({STATS_PREFIX + k: v for k, v in stats.items()})
    return trained, len(y)


def is_stats_task(task: ClientTask) -> bool:
    return str(task.config.get(CLIENT_TASK_KEY, "train")) == STATS


class Adversary:
    """Replaces the hostile clients' replies of each round (module docstring)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.attack = cfg.fault_mode
        self.clients = hostile_clients(cfg.seed, cfg.num_clients, cfg.fault_rate)

    def hostile(self, client: int) -> bool:
        return client in self.clients

    def check_transport(self, clients_are_partitions: bool, name: str) -> None:
        """A one-line error where the attack cannot run on this driver: it retrains hostile
        clients on their partitions, which the server has only where clients are partitions."""
        if self.attack in NEEDS_DATA and not clients_are_partitions:
            raise ValueError(f"fault-mode {self.attack!r} retrains hostile clients on the server's copy of their "
                             f"partitions; the {name!r} driver has none")

    def apply(self, server_round: int, tasks: Sequence[ClientTask], exchange: Exchange) -> Exchange:
        """The exchange with the hostile clients' replies replaced (or failed, with ``drop``)."""
        task_of = {t.client: t for t in tasks}
        hostile = [r for r in exchange.replies if r.client in task_of and self.hostile(r.client)]
        if not hostile:
            return exchange
        replies, failures = list(exchange.replies), list(exchange.failures)
        bad = {r.client for r in hostile}
        if self.attack == DROP:
            replies = [r for r in replies if r.client not in bad]
            failures += [Failure(c, "error", "hostile client failing (fault-mode drop)") for c in sorted(bad)]
            return replace(exchange, replies=replies, failures=failures)
        new: dict[int, dict[str, torch.Tensor]] = {}
        counts: dict[int, object] = {}
        if self.attack != "label-flip":  # statistics go as they are (module docstring)
            bad -= {r.client for r in hostile if is_stats_task(task_of[r.client])}
            hostile = [r for r in hostile if r.client in bad]
        if self.attack in COLLUDING:
            groups: dict[object, list[Reply]] = {}
            for r in replies:
                t = task_of.get(r.client)
                if t is not None and not is_stats_task(t):
                    groups.setdefault(("own", r.client) if t.group is None else t.group, []).append(r)
            for members in groups.values():
                mine = [r for r in members if r.client in bad]
                if not mine:
                    continue
                sent = task_of[mine[0].client].arrays
                mal = colluding_attack(self.attack, sent, [r.arrays for r in members], len(mine), self.cfg.attack_strength)
                for r in mine:
                    keys = attacked_keys(sent, r.arrays)
                    new[r.client] = {**r.arrays, **{k: mal[k] for k in keys}}
        else:
            for r in hostile:
                task = task_of[r.client]
                if self.attack == "label-flip":
                    new[r.client], counts[r.client] = label_flip_reply(self.cfg, task)
                else:
                    gen = attack_generator(self.cfg.seed, server_round, r.client)
                    new[r.client] = single_attack(self.attack, task.arrays, r.arrays, self.cfg.attack_strength, gen)
        out = [Reply(r.client, new[r.client], counts.get(r.client, r.num_examples), dict(r.metrics)) if r.client in new
               else r for r in replies]
        return replace(exchange, replies=out, failures=failures)
