"""Independent Subnet Training as an ``Algorithm``: slices out, merged back.

Each round every hidden layer is split into G subnets (G = ``subnets-per-round``, or K when
0, capped at the clients of the round), the clients are dealt into G groups
(``client_groups``), every member of a group gets its subnet's slice, and the replies are
merged back into the head (``fedsparse.model.ist``). ``ist-scaling`` is applied on the way
out and undone on the way back; ``group-rule`` may make a group's merge robust.

``ist-variant = "authors"`` is the authors' IST (``../shared/notes/paper-ist-mae.md``): a fresh
random partition into disjoint subnets every round, each group's replies averaged (weighted by
examples) and stitched back; a subnet none of whose clients replied stays unchanged.
``ist-variant = "skew"`` (the default) adds what partial-model methods do under label skew,
each with its own key:

- ``label-aware`` (default on): a client's softmax covers only the classes it holds, so it
  trains only their output rows, and it replies its class counts; output row ``c`` is averaged
  over the clients holding ``c``, weighted by their examples of ``c`` (HeteroFL, FedRS);
- every weight is averaged over the clients that trained it (``merge_per_weight``, HeteroFL);
- ``ist-overlap`` > 1: subnets overlap (each neuron in ``ist-overlap`` of them) and
  ``ist-subnets = "rolling"`` rolls windows over a fixed neuron order (FedRolex), so that each
  weight meets more clients (default: disjoint random subnets, as the authors);
- ``server-opt`` (default: SGD with momentum 0.7): a server optimizer step on the merged head
  (FedAvgM, FedAdam), its moments saved with the run.

The README section "IST under label skew" has the measurements behind the defaults.

**Slices sized to capacity** (``device-profiles``, ``fedsparse.profiles``). When the round's
clients have different capacities (a profile's ``width``; a client without a profile counts
as 1), the engine passes them to ``plan`` and every hidden layer is cut in proportion to them
(``proportional_partition``): a client's share of each layer is ``c_i / sum(c)`` of the
round's capacities, so a ``tiny`` client (0.25) receives and trains a smaller slice than a
``large`` one (1.0), and its bytes down and up follow (the middle block shrinks with the
square of the share). Capacities are relative: a share never exceeds ``c_i / max(c)``, and
the partition still covers every neuron. With G < K the clients are ordered by capacity and
cut into G groups of near-equal size (``capacity_groups``), so clients of the same profile
share a subnet, and a group's capacity is its weakest member's (every member trains the
whole slice, so the slice must fit the weakest). Equal capacities (all clients of one profile,
or none with a profile) plan exactly as without profiles.

Between rounds nothing about a neuron's owner is kept: every round re-partitions from
scratch by that round's clients and capacities (``random``: a fresh permutation, cut by the
round's shares; ``rolling``: the run's fixed neuron order turned by one neuron a round and
cut by the round's shares). Every neuron keeps its weights on the server whichever slice it
falls into; a neuron in the slice of a client that fails (or a block between two slices) is
not trained that round and stays unchanged. Overlapping subnets (``ist-overlap`` > 1) with
capacities are refused (one line: the overlap windows have equal widths by construction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from fedsparse.algorithms import register
from fedsparse.algorithms.base import (
    CLASS_COUNTS,
    LABEL_AWARE_KEY,
    NUM_CLASSES_KEY,
    Algorithm,
    ClientTask,
    ClientUpdate,
    State,
)
from fedsparse.algorithms.robust import check_directions, clip_updates
from fedsparse.model.head import num_layers
from fedsparse.model.ist import (
    SliceUpdate,
    client_groups,
    hidden_sizes,
    merge_by_subnet,
    merge_per_weight,
    partition,
    proportional_partition,
    capacity_groups,
    robust_merge,
    slice_state,
    stitch,
    subnet_parts,
    worker_indices,
)
from fedsparse.model.server_opt import ServerOptimizer
from fedsparse.seeds import derive_seed

if TYPE_CHECKING:
    from fedsparse.config import RunConfig


@dataclass(frozen=True)
class ISTOptions:
    """What the IST of a run does; ``from_config`` reads the run's keys."""

    variant: str = "authors"
    scaling: str = "none"
    label_aware: bool = False
    scheme: str = "random"
    overlap: float = 1.0
    group_rule: str = "mean"
    trim: float = 0.1
    server_opt: str = "none"
    server_lr: float = 1.0
    server_momentum: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    label_rows: bool = True  # ablation only: False averages label-aware output rows over all members

    @classmethod
    def from_config(cls, cfg: "RunConfig") -> "ISTOptions":
        common = dict(scaling=cfg.ist_scaling, group_rule=cfg.group_rule, trim=cfg.group_trim)
        if cfg.ist_variant == "authors":
            return cls(variant="authors", **common)
        return cls(variant=cfg.ist_variant, label_aware=cfg.label_aware, scheme=cfg.ist_subnets,
                   overlap=cfg.ist_overlap, server_opt=cfg.server_opt, server_lr=cfg.server_lr,
                   server_momentum=cfg.server_momentum, **common)

    def optimizer(self) -> ServerOptimizer:
        return ServerOptimizer(self.server_opt, self.server_lr, self.server_momentum, self.server_beta2,
                               self.server_tau)


def split_class_counts(arrays: Mapping[str, torch.Tensor]) -> tuple[State, torch.Tensor | None]:
    """A reply's slice and its class counts (None when it sent none)."""
    rest = {k: v for k, v in arrays.items() if k != CLASS_COUNTS}
    return rest, arrays.get(CLASS_COUNTS)


def merge_groups(state: Mapping[str, torch.Tensor], slices: Sequence[SliceUpdate], rule: str, trim: float,
                 scaling: str, per_weight: bool) -> State:
    """The merged head: each group's replies combined by ``rule`` (``robust_merge``; for the
    mean under ``per_weight`` this step is folded into the next), then either stitched
    (``per_weight = False``, the authors' IST) or every weight averaged over the updates that
    trained it (``merge_per_weight``)."""
    if not per_weight:
        if rule == "mean":
            return stitch(state, merge_by_subnet(slices), scaling)
    if rule != "mean":
        groups: dict[object, list[SliceUpdate]] = {}
        for i, up in enumerate(slices):
            groups.setdefault(("own", i) if up.subnet is None else up.subnet, []).append(up)
        slices = [robust_merge(g, rule, trim) for g in groups.values()]
        if not per_weight:
            return stitch(state, slices, scaling)
    return merge_per_weight(state, slices, scaling)


@register
class IST(Algorithm):
    name = "ist"
    supports_capacities = True

    def __init__(self, cfg: "RunConfig", options: ISTOptions | None = None) -> None:
        super().__init__(cfg)
        self.options = options if options is not None else ISTOptions.from_config(cfg)
        self.server = self.options.optimizer()

    def num_subnets(self, k: int) -> int:
        """G for a round with ``k`` clients."""
        return min(self.cfg.subnets_per_round or k, k)

    @property
    def per_weight(self) -> bool:
        """Whether replies are merged weight by weight (every variant but the authors')."""
        return self.options.variant != "authors"

    def parts(self, server_round: int, state: Mapping[str, torch.Tensor], g: int) -> list[list[torch.Tensor]]:
        round_seed = derive_seed("partition", self.cfg.seed, server_round)
        if self.options.variant == "authors":
            return partition(hidden_sizes(state), g, round_seed)
        return subnet_parts(hidden_sizes(state), g, self.options.scheme, self.options.overlap,
                            derive_seed("neuron-order", self.cfg.seed), server_round, round_seed)

    def capacity_parts(self, server_round: int, state: Mapping[str, torch.Tensor],
                       capacities: Sequence[float]) -> list[list[torch.Tensor]]:
        """The round's subnets with sizes in proportion to ``capacities`` (module docstring)."""
        opts = self.options
        if opts.variant != "authors" and opts.overlap != 1.0:
            raise ValueError(f"IST slices sized to capacity need disjoint subnets (ist-overlap = 1), "
                             f"got ist-overlap {opts.overlap:g}")
        if opts.variant != "authors" and opts.scheme == "rolling":
            return proportional_partition(hidden_sizes(state), capacities, derive_seed("neuron-order", self.cfg.seed),
                                          offset=server_round - 1)
        return proportional_partition(hidden_sizes(state), capacities, derive_seed("partition", self.cfg.seed,
                                                                                   server_round))

    def plan(self, server_round: int, state: Mapping[str, torch.Tensor], clients: Sequence[int],
             capacities: Sequence[float] | None = None, idle: Sequence[float] = ()) -> list[ClientTask]:
        """One slice per group; with ``capacities`` (one per client, > 0) that differ, slices
        sized to them (module docstring), else near-equal slices.

        ``idle``: one entry (its capacity, or 1.0) per client sampled this round that trains
        nothing (it sends statistics instead): the subnets and slices are those of the round
        in which it trained too, the training clients are dealt into them as usual, and a slice
        nobody trains stays as it is. So a client's slice, and its bytes, do not grow when
        others in its round send statistics."""
        opts = self.options
        k = len(clients)
        g = self.num_subnets(k + len(idle))
        if capacities is not None and len(capacities) != k:
            raise ValueError(f"got {len(capacities)} capacities for {k} clients")
        if capacities is None or len({float(c) for c in [*capacities, *idle]}) <= 1:
            groups = client_groups(k, g) if g <= k else list(range(k))  # fewer trainers: one subnet each
            parts = self.parts(server_round, state, g)
        else:
            every, group_caps = capacity_groups([*capacities, *idle], g)
            groups = every[:k]
            parts = self.capacity_parts(server_round, state, group_caps)
        indices = [worker_indices(parts, s) for s in range(g)]
        used = set(groups)
        slices = [slice_state(state, index, opts.scaling) if s in used else {} for s, index in enumerate(indices)]
        config: dict[str, Any] = {"num-subnets": g}
        replies: list[dict | None] = [None] * g
        if opts.label_aware:
            num_classes = int(state[f"layers.{num_layers(state) - 1}.weight"].shape[0])
            config.update({LABEL_AWARE_KEY: 1, NUM_CLASSES_KEY: num_classes})
            replies = [{**{k: (tuple(v.shape), v.dtype) for k, v in sub.items()},
                        CLASS_COUNTS: ((num_classes,), torch.float32)} for sub in slices]
        return [
            ClientTask(client, slices[s], {"subnet": s, **config}, group=s, meta=indices[s], reply=replies[s])
            for client, s in zip(clients, groups)
        ]

    def aggregate(self, server_round: int, state: Mapping[str, torch.Tensor], tasks: Sequence[ClientTask],
                  updates: Sequence[ClientUpdate]) -> State:
        opts = self.options
        task_of = {t.client: t for t in tasks}
        updates = clip_updates(tasks, updates, self.cfg.clip_factor)
        n = num_layers(state)
        updates = check_directions(tasks, updates, self.cfg.min_cosine, (f"layers.{n - 1}.weight", f"layers.{n - 1}.bias"))
        slices = []
        for u in updates:
            arrays, counts = split_class_counts(u.arrays)
            if not opts.label_rows:
                counts = None
            slices.append(SliceUpdate(task_of[u.client].meta, arrays, u.num_examples, task_of[u.client].group, counts))
        if not slices:
            return dict(state)
        merged = merge_groups(state, slices, opts.group_rule, opts.trim, opts.scaling, self.per_weight)
        return self.server.step(state, merged)

    def state_dict(self) -> dict[str, Any]:
        return {f"server.{k}": v for k, v in self.server.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.server.load_state_dict({k[len("server."):]: v for k, v in state.items() if k.startswith("server.")})

    def describe(self) -> str:
        k = self.cfg.clients_per_round
        g = self.num_subnets(k)
        kind = "pure IST" if g == k else ("FedAvg on the full head" if g == 1 else "grouped IST")
        opts = self.options
        text = f"IST ({opts.variant}): {k} clients and {g} subnets per round ({kind}), scaling {opts.scaling}"
        if opts.variant != "authors":
            text += (f", label-aware {'on' if opts.label_aware else 'off'}, {opts.scheme} subnets, overlap "
                     f"{opts.overlap:g}, per-weight merge, {self.server.describe()}")
        if opts.group_rule != "mean":
            text += f", group rule {opts.group_rule}" + (f" (trim {opts.trim:g})" if opts.group_rule == "trimmed-mean" else "")
        return text
