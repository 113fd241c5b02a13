"""Independent Subnet Training (IST) for an MLP head: partition, slice, stitch.

Pure tensor functions on state dicts of :class:`fedsparse.model.head.MLPHead`
(``layers.{i}.weight: [out, in]``, ``layers.{i}.bias: [out]``); no Flower here.

Each round the neurons of every hidden layer are split into K disjoint, near-equal
parts (H need not divide by K: the first ``H % K`` parts get one neuron more).
Worker k trains the sub-network made of its own neurons in every hidden layer:

- first layer: the rows of its hidden-1 neurons (all inputs);
- middle layer i: the block ``W_i[I_i^k][:, I_{i-1}^k]`` (cross-worker blocks are not trained);
- last layer: the columns of its last-hidden neurons (all outputs);
- hidden biases travel with their neurons; the output bias goes to everyone in full.

Stitching writes every slice back by index, leaves unassigned blocks and the slices of
workers that did not reply unchanged, and averages the output bias over the replies,
weighted by their number of examples. This is the "clean" bias policy of GIST rather than
the authors' code, which never syncs biases (see ``shared/notes/paper-ist-mae.md``).

Subnets and clients: with G subnets for K clients (G <= K), the clients are dealt into G
groups (``client_groups``), every member of a group trains the same subnet, and the group's
replies are averaged, weighted by examples (``merge_by_subnet``), before stitching. G = K is
plain IST; G = 1 is FedAvg on the full head.

Slices sized to capacity (device profiles, ``fedsparse.profiles``): ``proportional_partition``
cuts each hidden layer into parts whose sizes follow the subnets' capacities (largest-remainder
rounding, every part non-empty, disjoint, covering every neuron); ``capacity_groups`` forms
groups of clients of similar capacity when G < K (a group's capacity is its weakest member's).
Slicing and stitching need no change: they work on any index sets.

Scaling (``ist-scaling``): a subnet's middle and last layers sum over 1/G of the inputs they
sum over in the stitched head, so a head stitched from subnets trained apart produces
pre-activations about G times those each subnet learned (the authors' IST evaluates it as is;
Yuan's original IST hid the mismatch with batch-statistics BatchNorm). With ``"width"`` the
server sends every weight that reads a partitioned hidden layer multiplied by
``full width / slice width`` and divides the trained block by the same factor when stitching
(inverted-dropout scaling in weight space; the ReLU network is positively homogeneous, so the
client trains exactly the rescaled sub-network and needs no change). ``"none"`` is the
authors' behaviour.

For label-skewed clients (``ist-variant = "skew"``): ``window_parts`` / ``subnet_parts`` give
overlapping or rolling (FedRolex) subnets, ``merge_per_weight`` averages every weight over the
updates that trained it (output rows over the clients holding the class, when they report
class counts; HeteroFL), and ``robust_mean`` / ``robust_merge`` combine a group's replies by a
coordinate-wise trimmed mean or median instead of the mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Mapping, Sequence

import torch

from fedsparse.model.head import num_layers

State = dict[str, torch.Tensor]

SCALINGS = ("none", "width")


def hidden_sizes(state: Mapping[str, torch.Tensor]) -> list[int]:
    """Widths of the hidden layers of an MLP state dict."""
    return [int(state[f"layers.{i}.weight"].shape[0]) for i in range(num_layers(state) - 1)]


def partition(hidden: Sequence[int], k: int, seed: int) -> list[list[torch.Tensor]]:
    """Seeded random partition of every hidden layer into ``k`` disjoint, near-equal parts.

    Returns:
        ``parts[layer][worker]``: sorted ``LongTensor`` of neuron indices. Parts of one
        layer are disjoint and cover ``range(hidden[layer])``.
    """
    if k < 1:
        raise ValueError(f"number of subnets must be >= 1, got {k}")
    if any(h < k for h in hidden):
        raise ValueError(f"cannot split hidden layers {list(hidden)} into {k} non-empty subnets")
    gen = torch.Generator().manual_seed(int(seed))
    parts: list[list[torch.Tensor]] = []
    for h in hidden:
        perm = torch.randperm(h, generator=gen)
        parts.append([chunk.sort().values for chunk in torch.tensor_split(perm, k)])
    return parts


def proportional_sizes(h: int, capacities: Sequence[float]) -> list[int]:
    """Split ``h`` neurons among subnets in proportion to ``capacities``: ``h * c_i / sum(c)``
    rounded by largest remainder (ties to the subnet listed first), then every empty part
    given one neuron, taken from the largest part (ties: the last listed). Sums to ``h``;
    equal capacities give ``tensor_split``'s sizes (the first ``h % k`` parts one larger)."""
    k = len(capacities)
    if k < 1:
        raise ValueError("proportional_sizes needs at least one capacity")
    if any(not (math.isfinite(float(c)) and float(c) > 0) for c in capacities):
        raise ValueError(f"capacities must be finite and > 0, got {list(capacities)}")
    if h < k:
        raise ValueError(f"cannot split a hidden layer of {h} neurons into {k} non-empty subnets")
    fracs = [Fraction(float(c)) for c in capacities]  # exact: no float ties broken by rounding noise
    total = sum(fracs, Fraction(0))
    raw = [h * c / total for c in fracs]
    sizes = [math.floor(r) for r in raw]
    order = sorted(range(k), key=lambda i: (-(raw[i] - sizes[i]), i))
    for i in order[: h - sum(sizes)]:
        sizes[i] += 1
    for i in range(k):
        if sizes[i] == 0:
            donor = max(range(k), key=lambda j: (sizes[j], j))
            sizes[donor] -= 1
            sizes[i] = 1
    return sizes


def proportional_partition(hidden: Sequence[int], capacities: Sequence[float], seed: int,
                           offset: int = 0) -> list[list[torch.Tensor]]:
    """Seeded partition of every hidden layer into ``len(capacities)`` disjoint, non-empty parts
    whose sizes follow ``capacities`` (``proportional_sizes``): a seeded permutation of the
    layer's neurons (one per layer, in layer order, as ``partition``) cut into consecutive runs
    of those sizes, starting ``offset`` positions into the (circular) permutation.

    With equal capacities and ``offset = 0`` this is ``partition(hidden, k, seed)`` exactly.

    Returns:
        ``parts[layer][subnet]``: sorted ``LongTensor`` of neuron indices; the parts of a layer
        are disjoint and cover ``range(hidden[layer])``.
    """
    gen = torch.Generator().manual_seed(int(seed))
    parts: list[list[torch.Tensor]] = []
    for h in hidden:
        sizes = proportional_sizes(h, capacities)
        perm = torch.randperm(h, generator=gen)
        if offset % h:
            perm = torch.roll(perm, -(int(offset) % h))
        parts.append([chunk.sort().values for chunk in torch.split(perm, sizes)])
    return parts


def capacity_groups(capacities: Sequence[float], g: int) -> tuple[list[int], list[float]]:
    """Groups of a round's clients for ``g`` subnets when the clients have capacities, and the
    capacity of each group.

    Clients are ordered by capacity (stable: ties keep the sampled order) and cut into ``g``
    consecutive groups of near-equal size (the first ``k % g`` one larger, as ``client_groups``),
    so that clients of the same capacity share a subnet; a group's capacity is its weakest
    member's (every member trains the whole slice). With ``g == k`` every client is its own
    group with its own capacity. Returns (the subnet of each client, in input order; the
    capacity of each subnet).
    """
    k = len(capacities)
    if not 1 <= g <= k:
        raise ValueError(f"need 1 <= subnets <= clients, got {g} subnets for {k} clients")
    order = sorted(range(k), key=lambda i: (float(capacities[i]), i))
    group = [0] * k
    caps: list[float] = []
    pos = 0
    for s, chunk in enumerate(torch.tensor_split(torch.arange(k), g)):
        members = [order[pos + j] for j in range(len(chunk))]
        pos += len(chunk)
        for i in members:
            group[i] = s
        caps.append(min(float(capacities[i]) for i in members))
    return group, caps


def worker_indices(parts: Sequence[Sequence[torch.Tensor]], worker: int) -> list[torch.Tensor]:
    """The neuron indices of one worker in every hidden layer: ``[parts[l][worker] for l]``."""
    return [layer_parts[worker] for layer_parts in parts]


def _rows_cols(index: Sequence[torch.Tensor], layer: int, n_layers: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Output (row) and input (column) indices of ``layer`` for one worker; None = all."""
    rows = index[layer] if layer < n_layers - 1 else None
    cols = index[layer - 1] if layer > 0 else None
    return rows, cols


def check_scaling(scaling: str) -> None:
    """Raise a one-line ``ValueError`` unless ``scaling`` is one of ``SCALINGS``."""
    if scaling not in SCALINGS:
        raise ValueError(f"unknown IST scaling {scaling!r}; ist-scaling must be one of {', '.join(SCALINGS)}")


def input_scale(state: Mapping[str, torch.Tensor], index: Sequence[torch.Tensor], layer: int, scaling: str) -> float:
    """Factor on ``layer``'s slice under ``scaling``: ``in width / slice in width`` for a layer
    that reads a partitioned hidden layer with ``"width"``, else 1."""
    check_scaling(scaling)
    if scaling == "none" or layer == 0:
        return 1.0
    return int(state[f"layers.{layer}.weight"].shape[1]) / len(index[layer - 1])


def slice_state(state: Mapping[str, torch.Tensor], index: Sequence[torch.Tensor], scaling: str = "none") -> State:
    """The sub-network of the worker owning ``index`` (one index tensor per hidden layer),
    its weights scaled as ``scaling`` says (see the module docstring)."""
    n = num_layers(state)
    if len(index) != n - 1:
        raise ValueError(f"expected {n - 1} hidden index tensors, got {len(index)}")
    out: State = {}
    for layer in range(n):
        w, b = state[f"layers.{layer}.weight"], state[f"layers.{layer}.bias"]
        rows, cols = _rows_cols(index, layer, n)
        if rows is not None:  # index_select makes new tensors: no clone needed below
            w, b = w.index_select(0, rows), b.index_select(0, rows)
        else:
            b = b.clone()
        if cols is not None:
            w = w.index_select(1, cols)
        scale = input_scale(state, index, layer, scaling)
        if scale != 1.0:
            w = w * scale
        elif rows is None and cols is None:
            w = w.clone()
        out[f"layers.{layer}.weight"] = w
        out[f"layers.{layer}.bias"] = b
    return out


def client_groups(k: int, g: int) -> list[int]:
    """The subnet of each of a round's ``k`` clients, for ``g`` subnets (1 <= g <= k).

    Clients are dealt round-robin in the order the server sampled them (a seeded random
    order, so groups are a deterministic function of the seed and the round): client ``i``
    trains subnet ``i % g``. Group sizes differ by at most one, and with ``g == k`` client
    ``i`` trains subnet ``i``, exactly as plain IST.
    """
    if not 1 <= g <= k:
        raise ValueError(f"need 1 <= subnets <= clients, got {g} subnets for {k} clients")
    return [i % g for i in range(k)]


@dataclass
class SliceUpdate:
    """One worker's trained slice: its hidden indices, its sub-state and its example count.

    ``subnet`` names the subnet the slice belongs to; updates of the same subnet are
    averaged by ``merge_by_subnet``. ``None`` = a subnet of its own. ``class_counts`` ([C],
    optional): the client's examples per class, when it trained only the output rows of the
    classes it holds (label-aware training; ``merge_per_weight`` then weighs row ``c`` by them).
    """

    index: list[torch.Tensor]
    state: Mapping[str, torch.Tensor]
    num_examples: int
    subnet: int | None = None
    class_counts: torch.Tensor | None = None


def example_weights(counts: Sequence[int]) -> list[float]:
    """Example weights (negative counts count as 0); equal weights when no example is reported."""
    total = sum(max(0, int(n)) for n in counts)
    if total > 0:
        return [max(0, int(n)) / total for n in counts]
    return [1.0 / len(counts)] * len(counts)


def weighted_mean(states: Sequence[Mapping[str, torch.Tensor]], counts: Sequence[int]) -> State:
    """``sum_i w_i * state_i`` with ``w_i = example_weights(counts)[i]``, key by key."""
    weights = example_weights(counts)
    out: State = {}
    for key, ref in states[0].items():
        ref = torch.as_tensor(ref)
        acc = torch.zeros_like(ref, dtype=ref.dtype if ref.is_floating_point() else torch.float32)
        for w, s in zip(weights, states):
            acc += w * torch.as_tensor(s[key], dtype=acc.dtype)
        out[key] = acc
    return out


def merge_updates(updates: Sequence[SliceUpdate]) -> SliceUpdate:
    """The example-weighted mean of updates of one subnet (same index), as one update.

    Its ``num_examples`` is the group's total, so that stitching weighs the output bias of
    every client by its own examples. One update is returned as it is.
    """
    if not updates:
        raise ValueError("merge_updates needs at least one update")
    if len(updates) == 1:
        return updates[0]
    first = updates[0]
    for up in updates[1:]:
        if len(up.index) != len(first.index) or any(not torch.equal(a, b) for a, b in zip(up.index, first.index)):
            raise ValueError("merge_updates got updates of different subnets")
    state = weighted_mean([u.state for u in updates], [u.num_examples for u in updates])
    total = sum(max(0, int(u.num_examples)) for u in updates)
    return SliceUpdate(first.index, state, total, first.subnet)


def merge_by_subnet(updates: Sequence[SliceUpdate]) -> list[SliceUpdate]:
    """One merged update per subnet (in order of first appearance); a subnet none of whose
    clients replied has no update, so stitching leaves it unchanged."""
    groups: dict[object, list[SliceUpdate]] = {}
    for i, up in enumerate(updates):
        groups.setdefault(("own", i) if up.subnet is None else up.subnet, []).append(up)
    return [merge_updates(group) for group in groups.values()]


def all_finite(state: Mapping[str, torch.Tensor]) -> bool:
    """True when no tensor of ``state`` holds NaN or Inf.

    The sum of a tensor is finite only if all its entries are (NaN and Inf propagate); only a
    non-finite sum (which finite entries can reach by overflow) needs the entry-wise check.
    The sum is several times cheaper than ``isfinite`` on a big tensor.
    """
    for v in state.values():
        t = torch.as_tensor(v)
        if t.is_floating_point() and not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
            return False
    return True


def write_block(w: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None, block: torch.Tensor) -> None:
    """``w[rows][:, cols] = block`` in place (None = all rows or columns).

    Row and column copies (``index_copy_``) instead of one 2-D advanced-index assignment,
    which builds a (rows x cols) grid of offsets: 1.5x-4x faster on a 1024 x 1024 layer.
    The indices of one slice are distinct, so the result is the same whatever the order of
    the copies."""
    if block.shape != (len(rows) if rows is not None else w.shape[0], len(cols) if cols is not None else w.shape[1]):
        raise ValueError(f"a {tuple(block.shape)} block does not fit {len(rows) if rows is not None else 'all'} rows "
                         f"x {len(cols) if cols is not None else 'all'} columns of a {tuple(w.shape)} weight")
    if rows is not None and cols is not None:
        w.index_copy_(0, rows, w.index_select(0, rows).index_copy_(1, cols, block))
    elif rows is not None:
        w.index_copy_(0, rows, block)
    elif cols is not None:
        w.index_copy_(1, cols, block)
    else:
        w.copy_(block)


def stitch(state: Mapping[str, torch.Tensor], updates: Sequence[SliceUpdate], scaling: str = "none") -> State:
    """Write trained slices back into a copy of the full ``state``, undoing the factor that
    ``slice_state`` applied under the same ``scaling``.

    Blocks no update covers keep their values; the output bias becomes the
    example-weighted mean of the updates' output biases (unchanged with no updates).
    """
    check_scaling(scaling)
    n = num_layers(state)
    out: State = {k: v.detach().clone() for k, v in state.items()}
    for up in updates:
        for layer in range(n):
            rows, cols = _rows_cols(up.index, layer, n)
            w_new = torch.as_tensor(up.state[f"layers.{layer}.weight"], dtype=out[f"layers.{layer}.weight"].dtype)
            scale = input_scale(state, up.index, layer, scaling)
            if scale != 1.0:
                w_new = w_new / scale
            write_block(out[f"layers.{layer}.weight"], rows, cols, w_new)
            if rows is not None:
                bias = out[f"layers.{layer}.bias"]
                bias.index_copy_(0, rows, torch.as_tensor(up.state[f"layers.{layer}.bias"], dtype=bias.dtype))
    if updates:
        key = f"layers.{n - 1}.bias"
        weights = example_weights([u.num_examples for u in updates])
        out[key] = sum(w * torch.as_tensor(u.state[key], dtype=out[key].dtype) for w, u in zip(weights, updates))
    return out


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Raw tensor bytes of a state dict: ``sum(numel * element_size)``."""
    return sum(int(t.numel()) * int(t.element_size()) for t in state.values())


# --- variants for label-skewed clients: overlapping windows, per-weight merge, robust groups ----------

IST_VARIANTS = ("authors", "skew")  # the authors' IST; the label-skew options (fedsparse.algorithms.ist)
SUBNET_SCHEMES = ("random", "rolling")
GROUP_RULES = ("mean", "trimmed-mean", "median")


def window_parts(hidden: Sequence[int], k: int, overlap: float, seed: int, offset: int = 0) -> list[list[torch.Tensor]]:
    """``k`` windows per hidden layer over a seeded circular order of its neurons: window ``s``
    holds positions ``floor(s h / k)`` up to ``floor((s + overlap) h / k)`` (exclusive; at most
    all ``h``), turned by ``offset``.

    Every neuron lies in ``floor(overlap)`` or ``ceil(overlap)`` windows and widths differ by at
    most one; ``overlap = 1`` gives ``k`` disjoint near-equal parts, like ``partition``.
    ``offset`` turns the circle (FedRolex's rolling window: the starts move by ``offset``
    neurons); ``seed`` draws the circle (one permutation per layer).

    Returns:
        ``parts[layer][subnet]``: sorted ``LongTensor`` of neuron indices (windows overlap
        when ``overlap > 1``; together they cover every neuron).
    """
    if k < 1:
        raise ValueError(f"number of subnets must be >= 1, got {k}")
    if not overlap >= 1.0:
        raise ValueError(f"overlap must be >= 1, got {overlap}")
    if any(h < k for h in hidden):
        raise ValueError(f"cannot split hidden layers {list(hidden)} into {k} non-empty subnets")
    frac = Fraction(overlap).limit_denominator(10**6)
    gen = torch.Generator().manual_seed(int(seed))
    parts: list[list[torch.Tensor]] = []
    for h in hidden:
        order = torch.randperm(h, generator=gen)
        layer_parts = []
        for s in range(k):
            start = (s * h) // k
            width = min(h, math.floor((s + frac) * h / k) - start)
            layer_parts.append(order[(start + int(offset) + torch.arange(width)) % h].sort().values)
        parts.append(layer_parts)
    return parts


def subnet_parts(hidden: Sequence[int], k: int, scheme: str, overlap: float, seed: int, server_round: int,
                 round_seed: int) -> list[list[torch.Tensor]]:
    """The round's subnets under ``scheme``.

    - ``random`` (the authors' IST): a fresh seeded permutation every round (``round_seed``),
      cut into ``k`` windows (``partition`` itself when ``overlap = 1``);
    - ``rolling`` (FedRolex): one circular order per layer for the whole run (``seed``), the
      ``k`` windows turned by ``server_round - 1`` neurons each round, so that over the rounds
      every neuron moves through every window and meets every group of clients.
    """
    if scheme not in SUBNET_SCHEMES:
        raise ValueError(f"unknown subnet scheme {scheme!r}; valid: {', '.join(SUBNET_SCHEMES)}")
    if scheme == "random":
        if overlap == 1.0:
            return partition(hidden, k, round_seed)
        return window_parts(hidden, k, overlap, round_seed)
    return window_parts(hidden, k, overlap, seed, offset=server_round - 1)


def _update_weights(updates: Sequence[SliceUpdate]) -> list[float]:
    """Example counts as weights; 1 each when no update reports an example."""
    counts = [max(0, int(u.num_examples)) for u in updates]
    return [float(c) for c in counts] if sum(counts) > 0 else [1.0] * len(updates)


def row_weights(update: SliceUpdate, weight: float, n_out: int) -> torch.Tensor:
    """Per-output-row weights of one update: its class counts when it reports them (a client
    that trained only its own classes' rows), else ``weight`` for every row."""
    if update.class_counts is None:
        return torch.full((n_out,), float(weight))
    counts = torch.as_tensor(update.class_counts, dtype=torch.float32).clamp(min=0)
    if counts.shape != (n_out,):
        raise ValueError(f"class counts of shape {tuple(counts.shape)} for {n_out} output rows")
    return counts


def merge_per_weight(state: Mapping[str, torch.Tensor], updates: Sequence[SliceUpdate], scaling: str = "none") -> State:
    """Every weight becomes the weighted mean of the updates that trained it; weights no update
    trained keep their value (HeteroFL's rule; Diao et al. 2021).

    An update trains its slice (hidden biases with their neurons, the whole output bias). Its
    weight is its example count, except on the output layer when it reports ``class_counts``:
    there row ``c`` (weights and bias) counts with the update's examples of class ``c``, so a
    client that holds no example of ``c`` leaves row ``c`` to those that do. Without class
    counts and without overlapping slices this equals ``stitch(state, merge_by_subnet(updates))``.
    ``scaling`` is undone per update, as in ``stitch``.
    """
    check_scaling(scaling)
    n = num_layers(state)
    out: State = {k: v.detach().clone() for k, v in state.items()}
    if not updates:
        return out
    num = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in state.items()}
    den = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in state.items()}
    for up, weight in zip(updates, _update_weights(updates)):
        for layer in range(n):
            wkey, bkey = f"layers.{layer}.weight", f"layers.{layer}.bias"
            full = state[wkey]
            rows, cols = _rows_cols(up.index, layer, n)
            r = rows if rows is not None else torch.arange(full.shape[0])
            c = cols if cols is not None else torch.arange(full.shape[1])
            w_new = torch.as_tensor(up.state[wkey], dtype=torch.float64)
            scale = input_scale(state, up.index, layer, scaling)
            if scale != 1.0:
                w_new = w_new / scale
            if layer == n - 1:
                rw = row_weights(up, weight, full.shape[0]).to(torch.float64)
            else:
                rw = torch.full((len(r),), float(weight), dtype=torch.float64)
            grid = (r.unsqueeze(1).expand(len(r), len(c)), c.unsqueeze(0).expand(len(r), len(c)))
            num[wkey].index_put_(grid, rw.unsqueeze(1) * w_new, accumulate=True)
            den[wkey].index_put_(grid, rw.unsqueeze(1).expand(len(r), len(c)).clone(), accumulate=True)
            b_new = torch.as_tensor(up.state[bkey], dtype=torch.float64)
            num[bkey].index_put_((r,), rw * b_new, accumulate=True)
            den[bkey].index_put_((r,), rw, accumulate=True)
    for key in out:
        seen = den[key] > 0
        merged = num[key] / den[key].clamp(min=1e-300)
        out[key] = torch.where(seen, merged.to(out[key].dtype), out[key])
    return out


def robust_mean(values: torch.Tensor, mask: torch.Tensor | None, rule: str, trim: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinate-wise ``rule`` over dim 0 of ``values``, counting only entries where ``mask``.

    - ``mean``: the plain mean;
    - ``trimmed-mean``: drop the ``floor(trim * m)`` smallest and largest of the ``m`` entries
      of every coordinate, average the rest (Yin et al. 2018);
    - ``median``: the middle entry (the mean of the two middle ones for an even ``m``).

    Returns ``(result, count)``: coordinates with ``count == 0`` (no entry) hold 0.
    """
    if rule not in GROUP_RULES:
        raise ValueError(f"unknown group rule {rule!r}; valid: {', '.join(GROUP_RULES)}")
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    values = values.to(torch.float64)
    if mask is None:
        mask = torch.ones_like(values, dtype=torch.bool)
    m = mask.sum(0)
    if rule == "mean":
        total = torch.where(mask, values, torch.zeros_like(values)).sum(0)
        return total / m.clamp(min=1), m
    n = values.shape[0]
    if rule == "median" and n > 0 and bool(mask.all()):  # every entry counts: select, no sort (5x faster)
        lower = torch.kthvalue(values, (n + 1) // 2, dim=0).values
        upper = lower if n % 2 else torch.kthvalue(values, n // 2 + 1, dim=0).values
        return (lower + upper) / 2, m
    ordered = torch.where(mask, values, torch.full_like(values, float("inf"))).sort(0).values
    pos = torch.arange(n).view(-1, *([1] * (values.dim() - 1)))
    if rule == "trimmed-mean":
        lo = torch.floor(trim * m.to(torch.float64)).to(torch.long)
        hi = m - lo  # exclusive
    else:
        lo, hi = (m - 1).clamp(min=0) // 2, m // 2 + 1
    keep = (pos >= lo) & (pos < hi) & (pos < m)
    total = torch.where(keep, ordered, torch.zeros_like(ordered)).sum(0)
    return total / keep.sum(0).clamp(min=1), m


def robust_merge(updates: Sequence[SliceUpdate], rule: str, trim: float = 0.1) -> SliceUpdate:
    """One update from updates of one subnet (same index): ``rule`` per coordinate (``robust_mean``).

    ``mean`` is ``merge_updates`` (example-weighted). The robust rules weigh every client
    alike (a count that a client reports is not trusted to weigh its vote); on the output layer
    of updates with ``class_counts`` only the clients holding a class vote on its row. The
    result reports the group's total examples and summed class counts, so that groups are
    weighed by their examples when merged with others.
    """
    if len(updates) == 1:
        return updates[0]
    if rule == "mean":
        if any(u.class_counts is not None for u in updates):
            raise ValueError("robust_merge: updates with class counts are averaged by merge_per_weight")
        return merge_updates(updates)
    first = updates[0]
    for up in updates[1:]:
        if len(up.index) != len(first.index) or any(not torch.equal(a, b) for a, b in zip(up.index, first.index)):
            raise ValueError("robust_merge got updates of different subnets")
    n_layers = len(first.index) + 1
    out_w, out_b = f"layers.{n_layers - 1}.weight", f"layers.{n_layers - 1}.bias"
    aware = any(u.class_counts is not None for u in updates)
    n_out = int(torch.as_tensor(first.state[out_b]).shape[0])
    rows = torch.stack([row_weights(u, 1.0, n_out) > 0 for u in updates]) if aware else None
    state: State = {}
    for key, ref in first.state.items():
        stack = torch.stack([torch.as_tensor(u.state[key]) for u in updates])
        mask = None
        if rows is not None and key in (out_w, out_b):
            mask = rows.view(len(updates), n_out, *([1] * (stack.dim() - 2))).expand_as(stack)
        value, count = robust_mean(stack, mask, rule, trim)
        ref_t = torch.as_tensor(ref)
        if mask is not None:  # a row no member trained: keep what was sent (all members hold it)
            value = torch.where(count > 0, value, stack[0].to(torch.float64))
        state[key] = value.to(ref_t.dtype)
    total = sum(max(0, int(u.num_examples)) for u in updates)
    counts = None
    if aware:
        counts = sum(row_weights(u, max(0, int(u.num_examples)), n_out) for u in updates)
    return SliceUpdate(first.index, state, total, first.subnet, counts)
