"""IST from the closed form: the ridge head of the clients' statistics, then a residual MLP by IST.

``strategy = "ist"`` with ``ist-start = "closed-form"`` (``ist-variant = "skew"``; the authors'
IST never starts from the closed form). The head is a ``ResidualHead``
(``fedsparse.model.residual``): ``logits = skip(x) + mlp(x)``.

- **Statistics once per client.** The first time a client is sampled it sends the ridge
  statistics of its features (``[x 1]^T [x 1]`` as an upper triangle and ``[x 1]^T Y``, float32,
  as ``fed3r``: 83 kB for 192 features and 10 classes) with its reply, under ``stats.<name>``.
  The server adds them up (float64) and solves the ridge head every round in which new
  statistics arrived; ``skip`` moves by the change of ``ridge / residual-temperature`` (so a
  trained ``skip`` keeps what training added).
- **The first round** (nothing counted yet) is a statistics round: its clients only send
  statistics (``stats`` tasks, nothing down but the settings). The server then sets ``skip``
  from the ridge head and **zeroes the MLP's output layer**: the residual head is exactly the
  closed form, and IST trains from its accuracy.
- **Random features** (``ridge-features = W``, default 512): the ridge head reads ``[x,
  relu(A z + a)]`` (``fedsparse.model.residual``), a kernel ridge head where the plain one is
  linear. The first round's statistics fix the standardisation ``z`` (their means and
  variances) and the seed draws ``A`` and ``a``; the state carries both as ``rf.*`` (1.5 kB,
  sent with the skip, never sent back) and the skip starts as the linear ridge head, zero on
  the random features. From round 2 every client, the first round's ones too, sends the
  statistics of ``[x, rf(x)]`` once (``(193 + W)^2 / 2`` floats: 1.0 MB at W = 512) **instead
  of training**, the first time it is sampled (a ``stats`` task that gets the skip and the map,
  group ``STATS_GROUP``), and the skip moves to their ridge head as they arrive. Instead,
  because statistics and a slice in one reply would pass 1/5 of FedAvg's bytes at W = 512; and
  measured at W = 256 (Dirichlet 0.5, 50 rounds), the residual training did not add to the
  closed form (0.575 against its ridge head's 0.579), so a round without it loses nothing.
- **Later rounds** are the skew IST of ``fedsparse.algorithms.ist`` on the MLP part: slices
  of the hidden neurons, label-aware training, per-weight merge, the server optimizer; every
  client also receives ``skip`` whole (C x (D + 1) floats). ``residual-skip = "fixed"``: clients
  do not train it and do not send it back; ``"trained"``: they do, and row ``c`` is averaged
  over the clients that trained it (``merge_skip``).

**Width scaling, always** (``ist-scaling`` is ignored here). Each client trains its slice of
the MLP to correct the closed form's logits on its own; stitched as trained (``none``), the
output would add up the G subnets' corrections, G times too much. ``width`` sends the weights
that read a sliced hidden layer multiplied by full / slice width and takes them back divided
by it, so the stitched MLP's output is the mean of the subnets' corrections. Measured on the
bundled sample (default config, temperature 1, lr 1e-3): without it the head fell from the
closed form's 0.509 to 0.23-0.37 within five rounds; with it, and temperature 0.1, it rose to
0.551-0.557 (docs/algorithms.md).

What differs from the ridge head as the MLP's *initialisation* (README "Closed-form heads",
which local Adam undid): there the ridge solution was written into the MLP's last layer, on
top of the random trunk's hidden activations, and every weight was trained from the first
step, so the first local Adam steps (each moving every weight by about the learning rate)
scrambled it. Here the ridge head reads the features directly and is a separate, fixed
layer; the MLP only adds to its logits, starting from zero, so no gradient step can undo the
closed form, only add to it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from fedsparse.algorithms import register_selector
from fedsparse.algorithms.base import (
    FROZEN_KEY,
    NUM_CLASSES_KEY,
    STATS,
    STATS_KEY,
    CLASS_COUNTS,
    STATS_PREFIX,
    WITH_STATS_KEY,
    ClientTask,
    ClientUpdate,
    State,
)
from fedsparse.algorithms.closed_form import head_io
from fedsparse.algorithms.robust import CLIP_SCALE_KEY, COSINE_KEY, NORM_OUTLIER_KEY, check_directions, clip_updates
from fedsparse.algorithms.ist import IST, ISTOptions
from fedsparse.model.closed_form import (add_stats, check_ridge_stats, ridge_head, standardizer, stats_count, stats_spec,
                                        sub_stats)
from fedsparse.model.residual import (SKIP, is_residual, merge_skip, pad_skip, rf_part, rf_state, skip_from_linear,
                                      split_residual, zero_last_layer)
from fedsparse.seeds import derive_seed
from fedsparse.protocol import CLIENT_TASK_KEY

if TYPE_CHECKING:
    from fedsparse.config import RunConfig



# The ridge head on the random features overfits where few examples are counted: centrally on the
# scale config's features (W = 512, 705 inputs, lambda 1), against the linear head of the same
# examples, 0.479 vs 0.525 at 2,000 examples, 0.543 vs 0.550 at 5,000, level at 8,000, 0.571 vs
# 0.560 at 12,000, 0.591 vs 0.571 at 50,000. So the skip reads them from 16 examples per input on.
RF_EXAMPLES_PER_INPUT = 16
STATS_GROUP = -1  # the statistics tasks of a training round: they share the skip and the map, not a slice


def split_reply(arrays: Mapping[str, torch.Tensor]) -> tuple[State, State, State]:
    """A training reply's (MLP slice and class counts, skip, statistics without their prefix)."""
    stats = {k[len(STATS_PREFIX):]: v for k, v in arrays.items() if k.startswith(STATS_PREFIX)}
    rest = {k: v for k, v in arrays.items() if not k.startswith(STATS_PREFIX)}
    mlp, skip = split_residual(rest)
    return mlp, skip, stats


def stats_check(in_dim: int, prefix: str):
    """The check of a reply's ridge statistics (``check_ridge_stats``) under ``prefix``."""

    def check(arrays: Mapping[str, torch.Tensor], num_examples: int) -> None:
        check_ridge_stats({k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}, num_examples, in_dim)

    return check


class ResidualIST(IST):
    """The skew IST on a residual head that starts at the ridge head (module docstring)."""

    name = "ist"

    def __init__(self, cfg: "RunConfig") -> None:
        # subnets always train at the stitched head's scale (module docstring: "Width scaling")
        super().__init__(cfg, dataclasses.replace(ISTOptions.from_config(cfg), scaling="width"))
        self.total: State | None = None  # summed statistics (float64)
        self.counted: set[int] = set()
        self.ridge_skip: State | None = None  # skip_from_linear of the last ridge solution
        self.linear: State | None = None  # with random features: round 1's statistics of the features alone

    # --- plan ---------------------------------------------------------------------------------
    def plan(self, server_round: int, state: Mapping[str, torch.Tensor], clients: Sequence[int],
             capacities: Sequence[float] | None = None) -> list[ClientTask]:
        in_dim, num_classes = head_io(state)
        if not is_residual(state):  # nothing solved yet: a statistics round
            config = {CLIENT_TASK_KEY: STATS, STATS_KEY: "ridge", NUM_CLASSES_KEY: num_classes}
            check = stats_check(in_dim, "")
            return [ClientTask(c, {}, dict(config), group=0, meta="stats", reply=dict(stats_spec("ridge", in_dim, num_classes)),
                               check=check) for c in clients]
        mlp, skip = split_residual(state)
        rf = rf_part(state)
        width = int(skip["skip.weight"].shape[1])  # what the skip reads: the features, and their random features
        spec = stats_spec("ridge", width, num_classes)
        stats_tasks: list[ClientTask] = []
        idle: list[float] = []
        if rf:  # the statistics of [x, rf(x)] are a training reply's size: a new client sends only them
            new = [i for i, c in enumerate(clients) if c not in self.counted]
            config = {CLIENT_TASK_KEY: STATS, STATS_KEY: "ridge", NUM_CLASSES_KEY: num_classes}
            stats_tasks = [ClientTask(clients[i], {**skip, **rf}, dict(config), group=STATS_GROUP, meta="stats",
                                      reply=dict(spec), check=stats_check(width, "")) for i in new]
            keep = sorted(set(range(len(clients))) - set(new))
            idle = [float(capacities[i]) if capacities is not None else 1.0 for i in new]
            clients = [clients[i] for i in keep]
            capacities = [capacities[i] for i in keep] if capacities is not None else None
        # the slices of the round in which every sampled client trained: a trainer's does not grow
        tasks = super().plan(server_round, mlp, clients, capacities=capacities, idle=idle) if clients else []
        fixed = self.cfg.residual_skip == "fixed"
        for task in tasks:
            reply = task.reply_spec()
            task.arrays = {**task.arrays, **skip, **rf}
            if fixed:
                task.config[FROZEN_KEY] = SKIP
            else:
                reply.update({k: (tuple(v.shape), v.dtype) for k, v in skip.items()})
            if task.client not in self.counted:
                task.config.update({WITH_STATS_KEY: "ridge", NUM_CLASSES_KEY: num_classes})
                reply.update({STATS_PREFIX + k: v for k, v in spec.items()})
                task.check = stats_check(width, STATS_PREFIX)
            task.reply = reply
        return tasks + stats_tasks

    # --- aggregate ----------------------------------------------------------------------------
    def aggregate(self, server_round: int, state: Mapping[str, torch.Tensor], tasks: Sequence[ClientTask],
                  updates: Sequence[ClientUpdate]) -> State:
        new_stats = False
        trained: list[ClientUpdate] = []
        skips: list[tuple[State, float, torch.Tensor | None]] = []
        skip_of: dict[int, int] = {}  # client -> its entry of skips
        for u in updates:
            mlp, skip, stats = split_reply(u.arrays)
            if not stats and set(u.arrays) <= set(stats_spec("ridge", *head_io(state))):  # a statistics task
                stats, mlp = dict(u.arrays), {}
            if stats and u.client not in self.counted:
                self.total = add_stats(self.total, stats)
                self.counted.add(u.client)
                new_stats = True
            if mlp:
                trained.append(ClientUpdate(u.client, mlp, u.num_examples, u.metrics))
            if skip:
                counts = mlp.get(CLASS_COUNTS) if self.options.label_aware else None
                skips.append((skip, float(u.num_examples), counts))
                skip_of[u.client] = len(skips) - 1
        mlp_state, skip_state = split_residual(state)
        rf = rf_part(state)
        if not skip_state:  # the statistics round: start exactly at the closed form
            if self.total is None:
                return dict(state)
            in_dim = head_io(state)[0]
            self.ridge_skip = self.solve(in_dim)
            if not self.cfg.ridge_features:
                return {**zero_last_layer(mlp_state), **self.ridge_skip}
            # random features: standardised by these statistics, drawn from the run's seed; the
            # skip starts as the linear ridge head (zero on them), and every client sampled from
            # now on, these ones too, sends the statistics of [x, rf(x)] once
            rf = rf_state(*standardizer(self.total, in_dim), derive_seed("ridge-features", self.cfg.seed))
            self.ridge_skip = pad_skip(self.ridge_skip, self.cfg.ridge_features)
            self.linear, self.total, self.counted = self.total, None, set()
            return {**zero_last_layer(mlp_state), **self.ridge_skip, **rf}
        train_tasks = [t for t in tasks if t.meta != "stats"]
        new_mlp = super().aggregate(server_round, mlp_state, train_tasks, trained) if trained else dict(mlp_state)
        skips = self.defend_skip(skip_state, skips, [u for u in trained if u.client in skip_of], skip_of)
        new_skip = merge_skip(skip_state, skips) if skips else dict(skip_state)
        if new_stats:
            ridge = self.solve_skip(head_io(state)[0], int(skip_state["skip.weight"].shape[1]))
            old = self.ridge_skip or ridge
            new_skip = {k: new_skip[k] + (ridge[k] - old[k]) for k in new_skip}
            self.ridge_skip = ridge
        return {**new_mlp, **new_skip, **rf}

    def defend_skip(self, skip_state: State, skips: list[tuple[State, float, torch.Tensor | None]],
                    trained: Sequence[ClientUpdate], skip_of: Mapping[int, int]) -> list[tuple[State, float, torch.Tensor | None]]:
        """The round's trained ridge heads (``skips``, entry ``skip_of[client]``) through the same
        defences as the MLP's slices (``fedsparse.algorithms.robust``), all of them one group
        (every client was sent the same ``skip``): clipped to ``clip-factor`` x their median
        update RMS, then dropped when their cosine with the median update (on the rows of the
        classes each client holds) is below ``min-cosine``. A client's record (the metrics of its
        ``trained`` update, shared with its reply) keeps the smaller clip scale and cosine of its
        two parts, and ``norm-outlier`` when either part was clipped."""
        clients = sorted(skip_of, key=skip_of.get)
        tasks = [ClientTask(c, skip_state, group=0) for c in clients]
        ups = []
        for c in clients:
            arrays, examples, counts = skips[skip_of[c]]
            ups.append(ClientUpdate(c, {**arrays, **({CLASS_COUNTS: counts} if counts is not None else {})},
                                    int(examples)))
        ups = clip_updates(tasks, ups, self.cfg.clip_factor)
        kept = check_directions(tasks, ups, self.cfg.min_cosine, tuple(skip_state))
        record = {u.client: u.metrics for u in trained}
        for u in ups:
            mine = record.get(u.client)
            for key in (CLIP_SCALE_KEY, COSINE_KEY):
                if mine is not None and key in u.metrics:
                    mine[key] = min(float(u.metrics[key]), float(mine.get(key, u.metrics[key])))
            if mine is not None and u.metrics.get(NORM_OUTLIER_KEY):
                mine[NORM_OUTLIER_KEY] = 1.0
        return [(split_residual(u.arrays)[1], *skips[skip_of[u.client]][1:]) for u in kept]

    def solve_skip(self, in_dim: int, width: int) -> State:
        """The skip from what has been counted: the ridge head of the features and their random
        features once their statistics count ``RF_EXAMPLES_PER_INPUT`` examples per input, else
        the linear ridge head (padded with zeros) of whichever counts more examples, round 1's
        statistics or the features' block of the later ones."""
        assert self.total is not None
        if width == in_dim or stats_count(self.total) >= RF_EXAMPLES_PER_INPUT * (width + 1):
            return self.solve(width)
        linear = sub_stats(self.total, width, in_dim)
        if self.linear is not None and stats_count(self.linear) > stats_count(linear):
            linear = self.linear
        skip = skip_from_linear(ridge_head(linear, self.cfg.ridge_lambda, in_dim), self.cfg.residual_temperature,
                                self.cfg.residual_normalize)
        return pad_skip(skip, width - in_dim)

    def client_lr(self) -> float:
        return self.cfg.residual_lr

    def solve(self, width: int) -> State:
        """The skip of the summed statistics of inputs ``width`` wide (the features, or with their random features)."""
        assert self.total is not None
        return skip_from_linear(ridge_head(self.total, self.cfg.ridge_lambda, width), self.cfg.residual_temperature,
                                self.cfg.residual_normalize)

    # --- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["counted"] = torch.tensor(sorted(self.counted), dtype=torch.long)
        out.update({f"total.{k}": v.clone() for k, v in (self.total or {}).items()})
        out.update({f"ridge.{k}": v.clone() for k, v in (self.ridge_skip or {}).items()})
        out.update({f"linear.{k}": v.clone() for k, v in (self.linear or {}).items()})
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.counted = {int(c) for c in torch.as_tensor(state.get("counted", torch.zeros(0, dtype=torch.long))).tolist()}
        total = {k[len("total."):]: torch.as_tensor(v).clone() for k, v in state.items() if k.startswith("total.")}
        self.total = total or None
        ridge = {k[len("ridge."):]: torch.as_tensor(v).clone() for k, v in state.items() if k.startswith("ridge.")}
        self.ridge_skip = ridge or None
        linear = {k[len("linear."):]: torch.as_tensor(v).clone() for k, v in state.items() if k.startswith("linear.")}
        self.linear = linear or None

    def describe(self) -> str:
        feats = (f"the features and {self.cfg.ridge_features} random ReLU features of them" if self.cfg.ridge_features
                 else "the features")
        return (super().describe() + f"; from the closed form: ridge statistics once per client (lambda "
                f"{self.cfg.ridge_lambda:g}, on {feats}), residual MLP (client lr {self.cfg.residual_lr:g}), ridge head {self.cfg.residual_skip} "
                f"(temperature {self.cfg.residual_temperature:g}, normalized {self.cfg.residual_normalize})")


@register_selector("ist")
def select(cfg: "RunConfig") -> type | None:
    """``ist`` with ``ist-start = "closed-form"`` (any variant but the authors') is ``ResidualIST``."""
    if cfg.ist_start == "closed-form" and cfg.ist_variant != "authors":
        return ResidualIST
    return None
