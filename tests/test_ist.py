"""Tests for fedsparse/ist.py: partition, slice and stitch of an MLP head's state dict."""

from __future__ import annotations

import math

import pytest
import torch

from fedsparse.model.head import MLPHead, batch_order, train_steps
from fedsparse.model.ist import (
    SCALINGS,
    SliceUpdate,
    all_finite,
    client_groups,
    hidden_sizes,
    input_scale,
    merge_by_subnet,
    merge_updates,
    num_layers,
    partition,
    slice_state,
    state_bytes,
    stitch,
    worker_indices,
    write_block,
)

IN_DIM, HIDDEN, CLASSES = 5, (10, 11), 3


def random_state(seed: int, in_dim: int = IN_DIM, hidden: tuple[int, ...] = HIDDEN, classes: int = CLASSES) -> dict[str, torch.Tensor]:
    """A full MLP state dict with seeded values (no global RNG)."""
    gen = torch.Generator().manual_seed(seed)
    dims = [in_dim, *hidden, classes]
    state = {}
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        state[f"layers.{i}.weight"] = torch.randn(b, a, generator=gen)
        state[f"layers.{i}.bias"] = torch.randn(b, generator=gen)
    return state


def zeroed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in state.items()}


def naive_stitch(state, updates):
    """Reference stitch, one scalar at a time."""
    out = {k: v.clone() for k, v in state.items()}
    n = num_layers(state)
    for up in updates:
        for layer in range(n):
            w_full = out[f"layers.{layer}.weight"]
            rows = up.index[layer].tolist() if layer < n - 1 else list(range(w_full.shape[0]))
            cols = up.index[layer - 1].tolist() if layer > 0 else list(range(w_full.shape[1]))
            for i, r in enumerate(rows):
                for j, c in enumerate(cols):
                    w_full[r, c] = up.state[f"layers.{layer}.weight"][i, j]
                if layer < n - 1:
                    out[f"layers.{layer}.bias"][r] = up.state[f"layers.{layer}.bias"][i]
    if updates:
        total = sum(u.num_examples for u in updates)
        key = f"layers.{n - 1}.bias"
        acc = torch.zeros_like(out[key])
        for u in updates:
            acc += u.state[key] * (u.num_examples / total)
        out[key] = acc
    return out


class TestPartition:
    @pytest.mark.parametrize("k", [1, 2, 3, 7])
    def test_parts_are_disjoint_cover_and_near_equal(self, k: int) -> None:
        parts = partition(HIDDEN, k, seed=3)
        assert len(parts) == len(HIDDEN)
        for h, layer_parts in zip(HIDDEN, parts):
            assert len(layer_parts) == k
            joined = torch.cat(layer_parts)
            assert sorted(joined.tolist()) == list(range(h))  # disjoint and covering
            sizes = [len(p) for p in layer_parts]
            assert max(sizes) - min(sizes) <= 1
            assert sum(sizes) == h
            for p in layer_parts:
                assert p.dtype == torch.long and torch.all(p[1:] > p[:-1])

    def test_partition_is_deterministic_for_a_seed(self) -> None:
        a, b = partition(HIDDEN, 3, seed=11), partition(HIDDEN, 3, seed=11)
        for la, lb in zip(a, b):
            for pa, pb in zip(la, lb):
                assert torch.equal(pa, pb)

    def test_partition_differs_across_seeds(self) -> None:
        a, b = partition((64, 64), 4, seed=0), partition((64, 64), 4, seed=1)
        assert any(not torch.equal(pa, pb) for la, lb in zip(a, b) for pa, pb in zip(la, lb))

    def test_partition_does_not_touch_global_rng(self) -> None:
        torch.manual_seed(0)
        expected = torch.rand(2)
        torch.manual_seed(0)
        partition(HIDDEN, 3, seed=5)
        assert torch.equal(torch.rand(2), expected)

    @pytest.mark.parametrize("k", [0, -1, 11])
    def test_impossible_k_raises(self, k: int) -> None:
        with pytest.raises(ValueError):
            partition(HIDDEN, k, seed=0)  # 11 > min(hidden) = 10: an empty subnet

    def test_worker_indices_picks_one_part_per_layer(self) -> None:
        parts = partition(HIDDEN, 3, seed=0)
        idx = worker_indices(parts, 2)
        assert [t.tolist() for t in idx] == [parts[0][2].tolist(), parts[1][2].tolist()]


class TestSliceStitch:
    @pytest.mark.parametrize("k", [1, 2, 3, 7])
    def test_stitch_inverts_slice(self, k: int) -> None:
        w = random_state(0)
        parts = partition(HIDDEN, k, seed=k)
        updates = [
            SliceUpdate(worker_indices(parts, j), slice_state(w, worker_indices(parts, j)), num_examples=10)
            for j in range(k)
        ]
        out = stitch(zeroed(w), updates)
        n = num_layers(w)
        # every block some slice covers equals W: layer 0 rows, last-layer columns, middle diagonal blocks
        for j in range(k):
            idx = worker_indices(parts, j)
            for layer in range(n):
                rows = idx[layer] if layer < n - 1 else torch.arange(w[f"layers.{layer}.weight"].shape[0])
                cols = idx[layer - 1] if layer > 0 else torch.arange(w[f"layers.{layer}.weight"].shape[1])
                block = out[f"layers.{layer}.weight"][rows][:, cols]
                assert torch.equal(block, w[f"layers.{layer}.weight"][rows][:, cols])
                if layer < n - 1:
                    assert torch.equal(out[f"layers.{layer}.bias"][rows], w[f"layers.{layer}.bias"][rows])
        # first and last layer are covered in full; the output bias is a mean of equal copies
        assert torch.equal(out["layers.0.weight"], w["layers.0.weight"])
        assert torch.equal(out["layers.0.bias"], w["layers.0.bias"])
        assert torch.equal(out["layers.1.bias"], w["layers.1.bias"])
        assert torch.equal(out["layers.2.weight"], w["layers.2.weight"])
        assert torch.allclose(out["layers.2.bias"], w["layers.2.bias"], atol=1e-6)
        if k == 1:
            assert torch.equal(out["layers.1.weight"], w["layers.1.weight"])

    def test_slice_shapes_match_expected_shapes(self) -> None:
        w = random_state(1)
        idx = worker_indices(partition(HIDDEN, 3, seed=0), 0)  # sizes (4, 4)
        sub = slice_state(w, idx)
        assert {k: tuple(v.shape) for k, v in sub.items()} == {
            "layers.0.weight": (4, IN_DIM),
            "layers.0.bias": (4,),
            "layers.1.weight": (4, 4),
            "layers.1.bias": (4,),
            "layers.2.weight": (CLASSES, 4),
            "layers.2.bias": (CLASSES,),
        }

    def test_slice_is_a_copy_not_a_view(self) -> None:
        w = random_state(2)
        idx = worker_indices(partition(HIDDEN, 1, seed=0), 0)
        sub = slice_state(w, idx)
        sub["layers.2.bias"].add_(1.0)
        sub["layers.0.weight"].add_(1.0)
        assert torch.equal(w["layers.2.bias"], random_state(2)["layers.2.bias"])
        assert torch.equal(w["layers.0.weight"], random_state(2)["layers.0.weight"])

    @pytest.mark.parametrize("k", [1, 2])
    def test_no_tensor_of_a_slice_shares_memory_with_the_state(self, k: int) -> None:
        w = random_state(3)
        for j in range(k):
            sub = slice_state(w, worker_indices(partition(HIDDEN, k, seed=2), j))
            for key, v in sub.items():
                v.add_(1.0)
                assert torch.equal(w[key], random_state(3)[key]), key
        linear = random_state(3, hidden=())  # no hidden layer: nothing is indexed
        scaled = random_state(3, hidden=(4,))  # a slice of half the width, scaled by 2
        for state, index, scaling in ((linear, [], "none"), (scaled, [torch.arange(2)], "width")):
            for key, v in slice_state(state, index, scaling).items():
                assert v.data_ptr() != state[key].data_ptr(), key

    def test_slice_with_wrong_number_of_index_tensors_raises(self) -> None:
        with pytest.raises(ValueError, match="hidden index"):
            slice_state(random_state(0), [torch.arange(3)])

    def test_subnetwork_output_equals_full_network_with_other_neurons_zeroed(self) -> None:
        w = random_state(4)
        x = torch.randn(6, IN_DIM, generator=torch.Generator().manual_seed(9))
        parts = partition(HIDDEN, 3, seed=2)
        for j in range(3):
            idx = worker_indices(parts, j)
            sub = MLPHead.from_state_dict(slice_state(w, idx))
            with torch.no_grad():
                got = sub(x)
            # the full network, by hand, with every hidden neuron outside the slice set to 0
            h = x
            for layer in range(3):
                h = h @ w[f"layers.{layer}.weight"].T + w[f"layers.{layer}.bias"]
                if layer < 2:
                    keep = torch.zeros(HIDDEN[layer])
                    keep[idx[layer]] = 1.0
                    h = torch.relu(h) * keep
            assert torch.allclose(got, h, atol=1e-5)


class TestWidthScaling:
    """``scaling = "width"``: weights reading a partitioned layer go out scaled by full / slice width."""

    def test_factors_are_full_over_slice_width_and_one_for_the_first_layer(self) -> None:
        w = random_state(0)
        parts = partition(HIDDEN, 3, seed=0)  # hidden 10 -> 4, 3, 3; hidden 11 -> 4, 4, 3
        for j in range(3):
            idx = worker_indices(parts, j)
            assert input_scale(w, idx, 0, "width") == 1.0
            assert input_scale(w, idx, 1, "width") == pytest.approx(10 / len(idx[0]))
            assert input_scale(w, idx, 2, "width") == pytest.approx(11 / len(idx[1]))
            assert all(input_scale(w, idx, layer, "none") == 1.0 for layer in range(3))
        assert {len(worker_indices(parts, j)[0]) for j in range(3)} == {3, 4}  # uneven parts get their own factor

    def test_subnetwork_is_the_full_network_under_inverted_dropout(self) -> None:
        """Subnet j's forward = the full network with the other neurons zeroed and the kept ones
        scaled by full / kept width (inverted dropout), biases not scaled."""
        w = random_state(4)
        x = torch.randn(6, IN_DIM, generator=torch.Generator().manual_seed(9))
        parts = partition(HIDDEN, 3, seed=2)
        for j in range(3):
            idx = worker_indices(parts, j)
            with torch.no_grad():
                got = MLPHead.from_state_dict(slice_state(w, idx, "width"))(x)
            h = x
            for layer in range(3):
                h = h @ w[f"layers.{layer}.weight"].T + w[f"layers.{layer}.bias"]
                if layer < 2:
                    keep = torch.zeros(HIDDEN[layer])
                    keep[idx[layer]] = HIDDEN[layer] / len(idx[layer])
                    h = torch.relu(h) * keep
            assert torch.allclose(got, h, atol=1e-5)

    @pytest.mark.parametrize("k", [1, 2, 3])
    def test_stitch_undoes_the_factor(self, k: int) -> None:
        w = random_state(5)
        parts = partition(HIDDEN, k, seed=k)
        updates = [SliceUpdate(worker_indices(parts, j), slice_state(w, worker_indices(parts, j), "width"), 10)
                   for j in range(k)]
        width = stitch(w, updates, "width")
        plain = stitch(w, [SliceUpdate(u.index, slice_state(w, u.index), 10) for u in updates])
        for key in w:
            assert torch.allclose(width[key], plain[key], atol=1e-6), key
            assert torch.allclose(width[key], w[key], atol=1e-6), key
        if k > 1:  # the slices really were scaled on the way out
            assert not torch.allclose(updates[0].state["layers.1.weight"], slice_state(w, updates[0].index)["layers.1.weight"])

    def test_a_trained_block_is_written_back_divided_by_its_factor(self) -> None:
        w = random_state(6)
        idx = worker_indices(partition(HIDDEN, 2, seed=0), 1)
        sub = slice_state(w, idx, "width")
        sub["layers.2.weight"] = torch.full_like(sub["layers.2.weight"], 3.0)
        out = stitch(w, [SliceUpdate(idx, sub, 1)], "width")
        assert torch.allclose(out["layers.2.weight"][:, idx[1]], torch.full((CLASSES, len(idx[1])), 3.0 * len(idx[1]) / 11))

    def test_unknown_scaling_is_a_one_line_error(self) -> None:
        assert SCALINGS == ("none", "width")
        w = random_state(0)
        idx = worker_indices(partition(HIDDEN, 2, seed=0), 0)
        with pytest.raises(ValueError, match="unknown IST scaling 'half'"):
            slice_state(w, idx, "half")
        with pytest.raises(ValueError, match="unknown IST scaling"):
            stitch(w, [], "half")


class TestStitch:
    def _updates(self, w, parts, workers, examples, shift):
        ups = []
        for j, n in zip(workers, examples):
            idx = worker_indices(parts, j)
            sub = {k: v + shift * (j + 1) for k, v in slice_state(w, idx).items()}
            ups.append(SliceUpdate(idx, sub, n))
        return ups

    def test_stitch_matches_naive_loop(self) -> None:
        w = random_state(5)
        parts = partition(HIDDEN, 3, seed=1)
        ups = self._updates(w, parts, [0, 1, 2], [3, 5, 8], shift=0.5)
        out, ref = stitch(w, ups), naive_stitch(w, ups)
        assert out.keys() == ref.keys()
        for k in out:
            assert torch.allclose(out[k], ref[k], atol=1e-6), k

    @pytest.mark.parametrize("rows,cols", [(True, True), (True, False), (False, True), (False, False)])
    def test_write_block_is_the_indexed_assignment(self, rows: bool, cols: bool) -> None:
        gen = torch.Generator().manual_seed(7)
        w = torch.randn(9, 8, generator=gen)
        r = torch.randperm(9, generator=gen)[:4] if rows else None  # unsorted, as partitions are
        c = torch.randperm(8, generator=gen)[:5] if cols else None
        block = torch.randn(4 if rows else 9, 5 if cols else 8, generator=gen)
        expected = w.clone()
        rr = r if rows else torch.arange(9)
        cc = c if cols else torch.arange(8)
        for i, ri in enumerate(rr.tolist()):
            for j, cj in enumerate(cc.tolist()):
                expected[ri, cj] = block[i, j]
        write_block(w, r, c, block)
        assert torch.equal(w, expected)

    def test_write_block_refuses_a_block_of_the_wrong_shape(self) -> None:
        w = torch.zeros(6, 6)
        with pytest.raises(ValueError, match=r"\(2, 3\) block does not fit 2 rows x 2 columns"):
            write_block(w, torch.tensor([0, 1]), torch.tensor([2, 3]), torch.ones(2, 3))
        with pytest.raises(ValueError, match="does not fit all rows"):
            write_block(w, None, torch.tensor([2, 3]), torch.ones(1, 2))  # would broadcast
        assert torch.equal(w, torch.zeros(6, 6))

    def test_stitch_is_exactly_the_naive_loop_and_a_later_update_wins(self) -> None:
        w = random_state(8)
        parts = partition(HIDDEN, 2, seed=3)
        ups = self._updates(w, parts, [0, 1], [2, 3], shift=0.25)
        twice = ups + [SliceUpdate(ups[0].index, {k: v * 3 for k, v in ups[0].state.items()}, 2)]
        for updates in (ups, twice):
            out, ref = stitch(w, updates), naive_stitch(w, updates)
            for k in out:
                if k != "layers.2.bias":  # the output bias is a weighted sum, checked elsewhere
                    assert torch.equal(out[k], ref[k]), k

    def test_stitch_leaves_uncovered_blocks_and_missing_workers_unchanged(self) -> None:
        w = random_state(6)
        parts = partition(HIDDEN, 3, seed=4)
        ups = self._updates(w, parts, [0, 2], [4, 4], shift=1.0)  # worker 1 did not reply
        out = stitch(w, ups)
        i0 = [worker_indices(parts, j)[0].tolist() for j in range(3)]
        i1 = [worker_indices(parts, j)[1].tolist() for j in range(3)]
        changed_mid = {(r, c) for j in (0, 2) for r in i1[j] for c in i0[j]}
        for r in range(HIDDEN[1]):
            for c in range(HIDDEN[0]):
                same = bool(out["layers.1.weight"][r, c] == w["layers.1.weight"][r, c])
                assert same != ((r, c) in changed_mid), (r, c)  # cross-worker blocks untouched
        # the silent worker's rows, biases and output columns keep their values
        assert torch.equal(out["layers.0.weight"][i0[1]], w["layers.0.weight"][i0[1]])
        assert torch.equal(out["layers.0.bias"][i0[1]], w["layers.0.bias"][i0[1]])
        assert torch.equal(out["layers.1.bias"][i1[1]], w["layers.1.bias"][i1[1]])
        assert torch.equal(out["layers.2.weight"][:, i1[1]], w["layers.2.weight"][:, i1[1]])
        # the repliers' slices were written
        assert torch.equal(out["layers.0.weight"][i0[2]], w["layers.0.weight"][i0[2]] + 3.0)
        assert torch.equal(out["layers.2.weight"][:, i1[0]], w["layers.2.weight"][:, i1[0]] + 1.0)

    def test_output_bias_is_example_weighted_mean(self) -> None:
        w = random_state(7)
        parts = partition(HIDDEN, 3, seed=0)
        ups = self._updates(w, parts, [0, 1, 2], [1, 3, 6], shift=1.0)
        b = w["layers.2.bias"]
        expected = (1 * (b + 1) + 3 * (b + 2) + 6 * (b + 3)) / 10
        assert torch.allclose(stitch(w, ups)["layers.2.bias"], expected, atol=1e-6)

    def test_output_bias_is_plain_mean_when_no_examples_are_reported(self) -> None:
        w = random_state(7)
        parts = partition(HIDDEN, 2, seed=0)
        ups = self._updates(w, parts, [0, 1], [0, 0], shift=1.0)
        b = w["layers.2.bias"]
        assert torch.allclose(stitch(w, ups)["layers.2.bias"], ((b + 1) + (b + 2)) / 2, atol=1e-6)

    def test_stitch_without_updates_returns_an_equal_copy(self) -> None:
        w = random_state(8)
        out = stitch(w, [])
        assert all(torch.equal(out[k], w[k]) for k in w)
        out["layers.0.weight"].add_(1.0)
        assert torch.equal(w["layers.0.weight"], random_state(8)["layers.0.weight"])

    def test_stitch_does_not_modify_its_input(self) -> None:
        w = random_state(9)
        parts = partition(HIDDEN, 2, seed=0)
        stitch(w, self._updates(w, parts, [0, 1], [1, 1], shift=1.0))
        ref = random_state(9)
        assert all(torch.equal(w[k], ref[k]) for k in w)


def check_slice(sub: dict, sent: dict) -> None:
    """The server's check of a reply (``fedsparse.engine.rounds.check_reply``) on a returned slice."""
    from fedsparse.algorithms.base import ClientTask
    from fedsparse.engine.rounds import Reply, check_reply

    check_reply(ClientTask(0, sent), Reply(0, sub, 1))


class TestCheckSlice:
    def _valid(self):
        w = random_state(0)
        idx = worker_indices(partition(HIDDEN, 2, seed=0), 1)
        return slice_state(w, idx), slice_state(w, idx)

    def test_valid_slice_passes(self) -> None:
        sub, shapes = self._valid()
        check_slice(sub, shapes)  # no exception

    def test_missing_key_is_rejected(self) -> None:
        sub, shapes = self._valid()
        del sub["layers.1.bias"]
        with pytest.raises(ValueError, match="layers.1.bias"):
            check_slice(sub, shapes)

    def test_unexpected_key_is_rejected(self) -> None:
        sub, shapes = self._valid()
        sub["layers.3.weight"] = torch.zeros(1, 1)
        with pytest.raises(ValueError, match="layers.3.weight"):
            check_slice(sub, shapes)

    def test_wrong_shape_is_rejected(self) -> None:
        sub, shapes = self._valid()
        sub["layers.1.weight"] = sub["layers.1.weight"][:, :-1]
        with pytest.raises(ValueError, match="layers.1.weight"):
            check_slice(sub, shapes)

    @pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
    def test_non_finite_values_are_rejected(self, bad: float) -> None:
        sub, shapes = self._valid()
        sub["layers.2.bias"] = sub["layers.2.bias"].clone()
        sub["layers.2.bias"][1] = bad
        with pytest.raises(ValueError, match="layers.2.bias"):
            check_slice(sub, shapes)


class TestIstRound:
    def test_one_subnet_round_equals_plain_training(self) -> None:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(24, IN_DIM, generator=gen)
        y = torch.randint(0, CLASSES, (24,), generator=gen)
        batches = batch_order(24, steps=6, batch_size=5, generator=torch.Generator().manual_seed(1))
        w = random_state(10)

        full = MLPHead(IN_DIM, HIDDEN, CLASSES)
        full.load_state_dict(w)
        plain_loss = train_steps(full, x, y, batches, lr=0.01)

        idx = worker_indices(partition(HIDDEN, 1, seed=3), 0)
        sub = MLPHead.from_state_dict(slice_state(w, idx))
        ist_loss = train_steps(sub, x, y, batches, lr=0.01)
        stitched = stitch(w, [SliceUpdate(idx, sub.state_dict(), num_examples=24)])

        assert ist_loss == pytest.approx(plain_loss, rel=1e-6)
        trained = full.state_dict()
        for k in w:
            assert torch.allclose(stitched[k], trained[k], atol=1e-6), k
            assert not torch.equal(stitched[k], w[k]), f"{k} did not train"


class TestSmallHelpers:
    def test_layer_counts_and_widths(self) -> None:
        w = random_state(0)
        assert num_layers(w) == 3 and hidden_sizes(w) == list(HIDDEN)

    def test_state_bytes_is_numel_times_element_size(self) -> None:
        w = random_state(0)
        params = IN_DIM * 10 + 10 + 10 * 11 + 11 + 11 * CLASSES + CLASSES
        assert state_bytes(w) == params * 4
        assert state_bytes({k: v.half() for k, v in w.items()}) == params * 2


class TestSubnetGroups:
    """subnets-per-round: G subnets for K clients, each group's replies averaged before stitching."""

    @pytest.mark.parametrize("k, g", [(1, 1), (4, 1), (4, 2), (7, 3), (5, 5)])
    def test_groups_are_near_equal_and_cover_every_subnet(self, k: int, g: int) -> None:
        groups = client_groups(k, g)
        assert len(groups) == k and set(groups) == set(range(g))
        sizes = [groups.count(s) for s in range(g)]
        assert max(sizes) - min(sizes) <= 1

    def test_one_group_per_client_is_the_identity(self) -> None:
        assert client_groups(6, 6) == list(range(6))

    @pytest.mark.parametrize("k, g", [(3, 0), (3, 4), (0, 0)])
    def test_impossible_groups_raise(self, k: int, g: int) -> None:
        with pytest.raises(ValueError):
            client_groups(k, g)

    def test_merge_is_the_example_weighted_mean(self) -> None:
        w = random_state(0)
        idx = worker_indices(partition(HIDDEN, 2, seed=0), 1)
        sub = slice_state(w, idx)
        ups = [SliceUpdate(idx, {k: v + d for k, v in sub.items()}, n, subnet=1) for d, n in [(1.0, 10), (4.0, 30)]]
        merged = merge_updates(ups)
        assert merged.num_examples == 40 and merged.subnet == 1
        for k in sub:
            assert torch.allclose(merged.state[k], sub[k] + 3.25), k  # (1*10 + 4*30) / 40

    def test_merge_of_one_update_returns_it_unchanged(self) -> None:
        w = random_state(0)
        idx = worker_indices(partition(HIDDEN, 2, seed=0), 0)
        up = SliceUpdate(idx, slice_state(w, idx), 7, subnet=0)
        assert merge_updates([up]) is up

    def test_merge_rejects_different_subnets(self) -> None:
        w = random_state(0)
        parts = partition(HIDDEN, 2, seed=0)
        ups = [SliceUpdate(worker_indices(parts, j), slice_state(w, worker_indices(parts, j)), 1) for j in (0, 1)]
        with pytest.raises(ValueError, match="different subnets"):
            merge_updates(ups)

    def _round(self, w, k, g, examples, seed=3, fail=()):
        """One aggregation as the IST strategy does it: client i trains subnet groups[i]
        (here: adds i + 1 to every value) unless it is in ``fail``."""
        parts = partition(HIDDEN, g, seed=seed)
        groups = client_groups(k, g)
        ups = []
        for i, (subnet, n) in enumerate(zip(groups, examples)):
            if i in fail:
                continue
            idx = worker_indices(parts, subnet)
            ups.append(SliceUpdate(idx, {key: v + (i + 1) for key, v in slice_state(w, idx).items()}, n, subnet))
        return parts, groups, stitch(w, merge_by_subnet(ups))

    def test_one_subnet_is_fedavg_on_the_full_head(self) -> None:
        w = random_state(11)
        examples = [5, 10, 20, 15]
        _, _, out = self._round(w, k=4, g=1, examples=examples)
        # FedAvg: example-weighted average of the four full models w + (i + 1)
        fedavg = {key: sum(n * (v + i + 1) for i, n in enumerate(examples)) / sum(examples) for key, v in w.items()}
        for key in w:
            assert torch.allclose(out[key], fedavg[key], atol=1e-5), key

    def test_one_subnet_per_client_is_plain_ist(self) -> None:
        w = random_state(12)
        examples = [3, 5, 8]
        parts, _, grouped = self._round(w, k=3, g=3, examples=examples)
        plain = stitch(w, [
            SliceUpdate(worker_indices(parts, j), {key: v + (j + 1) for key, v in slice_state(w, worker_indices(parts, j)).items()}, n)
            for j, n in enumerate(examples)
        ])
        assert all(torch.equal(grouped[key], plain[key]) for key in w)

    def test_group_replies_are_averaged_before_stitching(self) -> None:
        w = random_state(13)
        examples = [1, 2, 3, 4, 5]  # K = 5, G = 2: clients 0, 2, 4 train subnet 0; clients 1, 3 subnet 1
        parts, groups, out = self._round(w, k=5, g=2, examples=examples)
        assert groups == [0, 1, 0, 1, 0]
        for subnet, members in ((0, [0, 2, 4]), (1, [1, 3])):
            idx = worker_indices(parts, subnet)
            shift = sum(examples[i] * (i + 1) for i in members) / sum(examples[i] for i in members)
            got, orig = slice_state(out, idx), slice_state(w, idx)
            for key in got:
                if key != "layers.2.bias":
                    assert torch.allclose(got[key], orig[key] + shift, atol=1e-5), (subnet, key)
        # the output bias is the mean over every client, weighted by its own examples
        shift = sum(n * (i + 1) for i, n in enumerate(examples)) / sum(examples)
        assert torch.allclose(out["layers.2.bias"], w["layers.2.bias"] + shift, atol=1e-5)

    def test_a_group_that_failed_as_a_whole_leaves_its_subnet_unchanged(self) -> None:
        w = random_state(14)
        parts, groups, out = self._round(w, k=4, g=2, examples=[1, 1, 1, 1], fail={1, 3})  # all of subnet 1
        assert groups == [0, 1, 0, 1]
        idx = worker_indices(parts, 1)
        got, orig = slice_state(out, idx), slice_state(w, idx)
        for key in got:
            if key != "layers.2.bias":
                assert torch.equal(got[key], orig[key]), key
        idx0 = worker_indices(parts, 0)
        assert torch.allclose(slice_state(out, idx0)["layers.0.weight"], slice_state(w, idx0)["layers.0.weight"] + 2.0)

    def test_all_finite(self) -> None:
        w = random_state(0)
        assert all_finite(w)
        w["layers.1.bias"][0] = float("nan")
        assert not all_finite(w)


# --- variants for label skew: windows, per-weight merge, robust group rules --------------------

from fedsparse.model.ist import (  # noqa: E402
    GROUP_RULES,
    merge_per_weight,
    robust_mean,
    robust_merge,
    subnet_parts,
    window_parts,
)


def naive_merge_per_weight(state, updates, scaling="none"):
    """Reference per-weight merge, one scalar at a time: every entry is the weighted mean of
    the updates whose slice holds it (weights: examples, or the class count of an output row
    for updates that report class counts); entries no update holds keep their value."""
    n = num_layers(state)
    counts = [max(0, u.num_examples) for u in updates]
    weights = [float(c) for c in counts] if sum(counts) else [1.0] * len(updates)
    out = {k: v.clone() for k, v in state.items()}
    for layer in range(n):
        for kind in ("weight", "bias"):
            key = f"layers.{layer}.{kind}"
            full = state[key]
            for pos in torch.cartesian_prod(*[torch.arange(s) for s in full.shape]).reshape(-1, full.dim()).tolist():
                r = pos[0]
                c = pos[1] if kind == "weight" else None
                num = den = 0.0
                for up, weight in zip(updates, weights):
                    rows = up.index[layer].tolist() if layer < n - 1 else list(range(full.shape[0]))
                    cols = up.index[layer - 1].tolist() if layer > 0 else list(range(state[f"layers.{layer}.weight"].shape[1]))
                    if r not in rows or (c is not None and c not in cols):
                        continue
                    wt = weight
                    if layer == n - 1 and up.class_counts is not None:
                        wt = float(up.class_counts[r])
                    value = up.state[key][rows.index(r)] if c is None else up.state[key][rows.index(r), cols.index(c)]
                    if kind == "weight" and layer > 0 and scaling == "width":
                        value = value / (state[f"layers.{layer}.weight"].shape[1] / len(up.index[layer - 1]))
                    num += wt * float(value)
                    den += wt
                if den > 0:
                    out[key][tuple(pos)] = num / den
    return out


def naive_robust(values, mask, rule, trim):
    """Reference robust rule per coordinate: sort the counted entries, cut, average."""
    flat_v = values.reshape(values.shape[0], -1).T.tolist()
    flat_m = (mask if mask is not None else torch.ones_like(values, dtype=torch.bool)).reshape(values.shape[0], -1).T.tolist()
    out = []
    for vs, ms in zip(flat_v, flat_m):
        xs = sorted(v for v, m in zip(vs, ms) if m)
        if not xs:
            out.append(0.0)
            continue
        if rule == "mean":
            kept = xs
        elif rule == "trimmed-mean":
            k = int(math.floor(trim * len(xs)))
            kept = xs[k:len(xs) - k]
        else:
            kept = xs[(len(xs) - 1) // 2: len(xs) // 2 + 1]
        out.append(sum(kept) / len(kept))
    return torch.tensor(out, dtype=torch.float64).reshape(values.shape[1:])


def trained(state, index, shift, seed):
    """A slice of ``state`` with seeded noise added, as a client would send it back."""
    sub = slice_state(state, index)
    gen = torch.Generator().manual_seed(seed)
    return {k: v + shift * torch.randn(v.shape, generator=gen) for k, v in sub.items()}


class TestWindows:
    @pytest.mark.parametrize("k, overlap", [(1, 1.0), (3, 1.0), (3, 2.0), (4, 1.5), (2, 3.0)])
    def test_windows_have_the_width_cover_and_multiplicity(self, k: int, overlap: float) -> None:
        parts = window_parts(HIDDEN, k, overlap, seed=4)
        for h, layer_parts in zip(HIDDEN, parts):
            widths = [len(p) for p in layer_parts]
            assert max(widths) - min(widths) <= 1
            assert all(min(h, math.floor(overlap * h / k)) <= x <= min(h, math.ceil(overlap * h / k)) for x in widths)
            hits = torch.bincount(torch.cat(layer_parts), minlength=h)
            if overlap * h / k < h:  # no window holds everything: multiplicities floor/ceil(overlap)
                assert math.floor(overlap) <= int(hits.min()) and int(hits.max()) <= math.ceil(overlap)
            assert int(hits.min()) >= 1  # every neuron is in some window
            for p in layer_parts:
                assert torch.all(p[1:] > p[:-1])  # sorted, no repeats

    def test_overlap_one_gives_disjoint_parts(self) -> None:
        for layer_parts, h in zip(window_parts(HIDDEN, 3, 1.0, seed=1), HIDDEN):
            assert sorted(torch.cat(layer_parts).tolist()) == list(range(h))

    def test_random_scheme_without_overlap_is_the_authors_partition(self) -> None:
        a = subnet_parts(HIDDEN, 3, "random", 1.0, seed=5, server_round=4, round_seed=77)
        b = partition(HIDDEN, 3, seed=77)
        assert all(torch.equal(x, y) for la, lb in zip(a, b) for x, y in zip(la, lb))

    def test_rolling_windows_turn_one_neuron_per_round_over_a_fixed_order(self) -> None:
        r1 = subnet_parts((12,), 3, "rolling", 1.0, seed=5, server_round=1, round_seed=1)
        r2 = subnet_parts((12,), 3, "rolling", 1.0, seed=5, server_round=2, round_seed=2)
        order = torch.randperm(12, generator=torch.Generator().manual_seed(5))
        assert r1[0][0].tolist() == sorted(order[0:4].tolist())
        assert r2[0][0].tolist() == sorted(order[1:5].tolist())
        assert r2[0][2].tolist() == sorted(order[[9, 10, 11, 0]].tolist())
        # over 12 rounds every neuron has been in every subnet
        seen = [set() for _ in range(3)]
        for r in range(1, 13):
            for s, p in enumerate(subnet_parts((12,), 3, "rolling", 1.0, seed=5, server_round=r, round_seed=r)[0]):
                seen[s] |= set(p.tolist())
        assert all(s == set(range(12)) for s in seen)

    def test_bad_arguments_raise(self) -> None:
        with pytest.raises(ValueError, match="overlap"):
            window_parts(HIDDEN, 2, 0.5, seed=0)
        with pytest.raises(ValueError, match="subnet scheme"):
            subnet_parts(HIDDEN, 2, "static", 1.0, 0, 1, 1)


class TestMergePerWeight:
    @pytest.mark.parametrize("scaling", ["none", "width"])
    def test_overlapping_slices_with_class_counts_match_a_naive_loop(self, scaling: str) -> None:
        w = random_state(10)
        parts = window_parts(HIDDEN, 3, 2.0, seed=3)
        counts = [torch.tensor([5.0, 0.0, 2.0]), None, torch.tensor([0.0, 0.0, 7.0]), torch.tensor([1.0, 3.0, 0.0])]
        updates = []
        for i, (subnet, cc) in enumerate(zip([0, 1, 2, 0], counts)):
            idx = worker_indices(parts, subnet)
            sub = trained(w, idx, 0.5, seed=i)
            if scaling == "width":  # as sent: weights reading a partitioned layer scaled up
                sub = {k: v * input_scale(w, idx, int(k.split(".")[1]), scaling) if k.endswith("weight") else v
                       for k, v in sub.items()}
            n = int(cc.sum()) if cc is not None else 4
            updates.append(SliceUpdate(idx, sub, n, subnet, cc))
        got = merge_per_weight(w, updates, scaling)
        expected = naive_merge_per_weight(w, updates, scaling)
        for key in w:
            assert torch.allclose(got[key], expected[key], atol=1e-5), key

    def test_rows_no_holder_trained_keep_their_value(self) -> None:
        w = random_state(11)
        idx = worker_indices(partition(HIDDEN, 2, seed=0), 0)
        up = SliceUpdate(idx, trained(w, idx, 1.0, seed=1), 6, 0, torch.tensor([6.0, 0.0, 0.0]))
        out = merge_per_weight(w, [up])
        assert torch.equal(out["layers.2.weight"][1:], w["layers.2.weight"][1:])
        assert torch.equal(out["layers.2.bias"][1:], w["layers.2.bias"][1:])
        assert torch.allclose(out["layers.2.weight"][0, idx[1]], up.state["layers.2.weight"][0])

    @pytest.mark.parametrize("scaling", ["none", "width"])
    def test_without_overlap_or_class_counts_it_is_the_authors_stitch(self, scaling: str) -> None:
        w = random_state(12)
        parts = partition(HIDDEN, 3, seed=2)
        updates = [SliceUpdate(worker_indices(parts, s), trained(w, worker_indices(parts, s), 0.3, seed=i), n, s)
                   for i, (s, n) in enumerate([(0, 3), (1, 5), (0, 2), (2, 4), (1, 0)])]
        got = merge_per_weight(w, updates, scaling)
        expected = stitch(w, merge_by_subnet(updates), scaling)
        for key in w:
            assert torch.allclose(got[key], expected[key], atol=1e-5), key

    def test_no_updates_returns_an_equal_copy(self) -> None:
        w = random_state(13)
        out = merge_per_weight(w, [])
        assert all(torch.equal(out[k], w[k]) and out[k] is not w[k] for k in w)


class TestRobustRules:
    @pytest.mark.parametrize("rule", GROUP_RULES)
    @pytest.mark.parametrize("n", [1, 2, 5, 6])
    def test_robust_mean_matches_a_naive_loop(self, rule: str, n: int) -> None:
        gen = torch.Generator().manual_seed(n)
        values = torch.randn(n, 3, 4, generator=gen)
        mask = torch.rand(n, 3, 4, generator=gen) > 0.3
        for m in (None, mask):
            got, count = robust_mean(values, m, rule, trim=0.2)
            assert torch.allclose(got, naive_robust(values, m, rule, 0.2), atol=1e-6)
            assert torch.equal(count, (m if m is not None else torch.ones_like(values, dtype=torch.bool)).sum(0))

    def test_median_and_trimmed_mean_ignore_one_outlier(self) -> None:
        values = torch.tensor([[1.0], [2.0], [3.0], [4.0], [1e9]])
        assert float(robust_mean(values, None, "median")[0]) == 3.0
        assert float(robust_mean(values, None, "trimmed-mean", trim=0.2)[0]) == 3.0
        assert float(robust_mean(values, None, "mean")[0]) > 1e8

    @pytest.mark.parametrize("rule", ["trimmed-mean", "median"])
    def test_robust_merge_of_a_group_matches_a_naive_loop(self, rule: str) -> None:
        w = random_state(14)
        idx = worker_indices(partition(HIDDEN, 2, seed=1), 1)
        counts = [torch.tensor([2.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, 4.0]), torch.tensor([3.0, 1.0, 0.0]),
                  torch.tensor([1.0, 0.0, 1.0])]
        ups = [SliceUpdate(idx, trained(w, idx, 1.0, seed=i), int(c.sum()), 1, c) for i, c in enumerate(counts)]
        merged = robust_merge(ups, rule, trim=0.25)
        for key in ups[0].state:
            stack = torch.stack([u.state[key] for u in ups])
            mask = None
            if key.startswith("layers.2."):
                rows = torch.stack([c > 0 for c in counts])
                mask = rows.view(4, 3, *([1] * (stack.dim() - 2))).expand_as(stack)
            expected = naive_robust(stack, mask, rule, 0.25).to(torch.float32)
            if mask is not None:  # row 1 has one voter; no row is without one here
                assert bool(mask.any(0).all())
            assert torch.allclose(merged.state[key], expected, atol=1e-6), key
        assert merged.num_examples == sum(u.num_examples for u in ups)
        assert torch.equal(merged.class_counts, sum(counts))

    def test_robust_merge_rejects_different_subnets_and_unknown_rules(self) -> None:
        w = random_state(15)
        parts = partition(HIDDEN, 2, seed=0)
        a = SliceUpdate(worker_indices(parts, 0), slice_state(w, worker_indices(parts, 0)), 1, 0)
        b = SliceUpdate(worker_indices(parts, 1), slice_state(w, worker_indices(parts, 1)), 1, 1)
        with pytest.raises(ValueError, match="different subnets"):
            robust_merge([a, b], "median")
        with pytest.raises(ValueError, match="group rule"):
            robust_mean(torch.zeros(2, 1), None, "mode")
