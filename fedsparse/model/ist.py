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

Scaling (``ist-scaling``): a subnet's middle and last layers sum over 1/G of the inputs they
sum over in the stitched head, so a head stitched from subnets trained apart produces
pre-activations about G times those each subnet learned (the authors' IST evaluates it as is;
Yuan's original IST hid the mismatch with batch-statistics BatchNorm). With ``"width"`` the
server sends every weight that reads a partitioned hidden layer multiplied by
``full width / slice width`` and divides the trained block by the same factor when stitching
(inverted-dropout scaling in weight space; the ReLU network is positively homogeneous, so the
client trains exactly the rescaled sub-network and needs no change). ``"none"`` is the
authors' behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass
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
        if rows is not None:
            w, b = w.index_select(0, rows), b.index_select(0, rows)
        if cols is not None:
            w = w.index_select(1, cols)
        scale = input_scale(state, index, layer, scaling)
        out[f"layers.{layer}.weight"] = w * scale if scale != 1.0 else w.clone()
        out[f"layers.{layer}.bias"] = b.clone()
    return out


def expected_slice_shapes(state: Mapping[str, torch.Tensor], index: Sequence[torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Shapes that ``slice_state(state, index)`` has; used to validate client replies."""
    n = num_layers(state)
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(n):
        out_dim, in_dim = state[f"layers.{layer}.weight"].shape
        rows, cols = _rows_cols(index, layer, n)
        out_dim = len(rows) if rows is not None else out_dim
        in_dim = len(cols) if cols is not None else in_dim
        shapes[f"layers.{layer}.weight"] = (int(out_dim), int(in_dim))
        shapes[f"layers.{layer}.bias"] = (int(out_dim),)
    return shapes


def check_slice(sub: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]) -> None:
    """Raise ``ValueError`` naming the first key whose presence, shape or values are wrong."""
    missing = sorted(set(expected) - set(sub))
    extra = sorted(set(sub) - set(expected))
    if missing or extra:
        raise ValueError(f"slice keys differ: missing {missing}, unexpected {extra}")
    for key, shape in expected.items():
        got = tuple(sub[key].shape)
        if got != tuple(shape):
            raise ValueError(f"slice {key} has shape {got}, expected {tuple(shape)}")
        if not torch.isfinite(sub[key]).all():
            raise ValueError(f"slice {key} holds NaN or Inf")


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
    averaged by ``merge_by_subnet``. ``None`` = a subnet of its own.
    """

    index: list[torch.Tensor]
    state: Mapping[str, torch.Tensor]
    num_examples: int
    subnet: int | None = None


def example_weights(counts: Sequence[int]) -> list[float]:
    """Example weights (negative counts count as 0); equal weights when no example is reported."""
    total = sum(max(0, int(n)) for n in counts)
    if total > 0:
        return [max(0, int(n)) / total for n in counts]
    return [1.0 / len(counts)] * len(counts)


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
    weights = example_weights([u.num_examples for u in updates])
    state: State = {}
    for key, ref in first.state.items():
        ref = torch.as_tensor(ref)
        acc = torch.zeros_like(ref, dtype=ref.dtype if ref.is_floating_point() else torch.float32)
        for w, u in zip(weights, updates):
            acc += w * torch.as_tensor(u.state[key], dtype=acc.dtype)
        state[key] = acc
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
    """True when no tensor of ``state`` holds NaN or Inf."""
    return all(bool(torch.isfinite(torch.as_tensor(v)).all()) for v in state.values())


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
            w = out[f"layers.{layer}.weight"]
            r = rows if rows is not None else torch.arange(w.shape[0])
            c = cols if cols is not None else torch.arange(w.shape[1])
            w[r.unsqueeze(1), c.unsqueeze(0)] = w_new
            if rows is not None:
                out[f"layers.{layer}.bias"][rows] = torch.as_tensor(up.state[f"layers.{layer}.bias"], dtype=w.dtype)
    if updates:
        key = f"layers.{n - 1}.bias"
        weights = example_weights([u.num_examples for u in updates])
        out[key] = sum(w * torch.as_tensor(u.state[key], dtype=out[key].dtype) for w, u in zip(weights, updates))
    return out


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Raw tensor bytes of a state dict: ``sum(numel * element_size)``."""
    return sum(int(t.numel()) * int(t.element_size()) for t in state.values())
