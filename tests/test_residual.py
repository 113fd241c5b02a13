"""IST from the closed form: fedsparse/model/residual.py, fedsparse/algorithms/residual_ist.py and
the ceilings (fedsparse/commands/ceilings.py).

The residual head must be ``skip(x) + mlp(x)``; the statistics round must start the head
exactly at the ridge head of the clients counted (divided by the temperature); slices must be
the MLP's IST slices plus the whole skip, and the merge must put every trained weight back
where a naive loop over the hidden neurons puts it; statistics must add up to those of the
union of the clients' data, each client counted once, through the round engine."""

from __future__ import annotations

import warnings

import pytest
import torch

from fedsparse.algorithms import ClientUpdate, make_algorithm
from fedsparse.algorithms.base import FROZEN_KEY, STATS, WITH_STATS_KEY
from fedsparse.algorithms.residual_ist import ResidualIST, STATS_PREFIX
from fedsparse.commands.ceilings import train_early_stopped, validation_split
from fedsparse.config import RunConfig
from fedsparse.engine.plain import PlainTransport
from fedsparse.engine.rounds import RoundEngine
from fedsparse.inputs.features import Features
from fedsparse.model.closed_form import add_stats, ridge_head, stats_for
from fedsparse.model.head import MLPHead
from fedsparse.model.residual import (
    RandomReLUFeatures,
    ResidualHead,
    build_head,
    rf_part,
    rf_weights,
    merge_skip,
    skip_from_linear,
    split_residual,
    zero_last_layer,
)
from fedsparse.protocol import CLIENT_TASK_KEY
from fedsparse.task import client_features, train_slice
from fedsparse.task import test_features as server_test_features
from tests.test_closed_form import central_ridge


def residual_state(d: int = 5, hidden=(6, 4), c: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return ResidualHead(d, hidden, c).state_dict()


class TestResidualHead:
    def test_forward_is_skip_plus_mlp(self) -> None:
        state = residual_state()
        head = build_head(state)
        assert isinstance(head, ResidualHead)
        x = torch.randn(7, 5)
        mlp = MLPHead.from_state_dict(split_residual(state)[0])
        expected = []
        for row in x:  # naive: one example at a time, the skip by hand
            logits = [float(state["skip.bias"][c] + sum(state["skip.weight"][c, j] * row[j] for j in range(5)))
                      for c in range(3)]
            expected.append(torch.tensor(logits) + mlp(row.unsqueeze(0))[0].detach())
        with torch.no_grad():
            assert torch.allclose(head(x), torch.stack(expected), atol=1e-5)
        assert type(build_head(split_residual(state)[0])) is MLPHead  # no skip: the plain MLP

    def test_zero_last_layer_starts_exactly_at_the_skip(self) -> None:
        state = zero_last_layer(residual_state())
        x = torch.randn(9, 5)
        with torch.no_grad():
            got = build_head(state)(x)
        assert torch.equal(got, x @ state["skip.weight"].T + state["skip.bias"])

    def test_bad_skip_is_one_line(self) -> None:
        state = residual_state()
        state["skip.weight"] = torch.zeros(3, 4)
        with pytest.raises(ValueError, match="skip.weight must be 3x5"):
            build_head(state)

    def test_skip_from_linear_normalises_rows_then_divides_by_the_temperature(self) -> None:
        w, b = torch.randn(3, 5), torch.randn(3)
        out = skip_from_linear({"layers.0.weight": w, "layers.0.bias": b}, temperature=0.1, normalize=True)
        for c in range(3):
            norm = float(sum(float(v) ** 2 for v in w[c]) ** 0.5)
            assert torch.allclose(out["skip.weight"][c], w[c] / norm / 0.1, atol=1e-5)
            assert float(out["skip.bias"][c]) == pytest.approx(float(b[c]) / norm / 0.1, rel=1e-5)
        plain = skip_from_linear({"layers.0.weight": w, "layers.0.bias": b}, temperature=2.0)
        assert torch.allclose(plain["skip.weight"], w / 2) and torch.allclose(plain["skip.bias"], b / 2)
        with pytest.raises(ValueError, match="temperature"):
            skip_from_linear({"layers.0.weight": w, "layers.0.bias": b}, temperature=0.0)

    def test_merge_skip_weighs_each_row_by_the_class_counts(self) -> None:
        skip = {"skip.weight": torch.zeros(3, 2), "skip.bias": torch.full((3,), 7.0)}
        a = {"skip.weight": torch.ones(3, 2), "skip.bias": torch.ones(3)}
        b = {"skip.weight": 3 * torch.ones(3, 2), "skip.bias": 3 * torch.ones(3)}
        ca, cb = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([3.0, 2.0, 0.0])
        out = merge_skip(skip, [(a, 1.0, ca), (b, 5.0, cb)])
        for c in range(3):  # naive: row by row
            den = float(ca[c] + cb[c])
            want = 7.0 if den == 0 else (float(ca[c]) * 1 + float(cb[c]) * 3) / den
            assert float(out["skip.bias"][c]) == pytest.approx(want)
            if den:
                assert torch.allclose(out["skip.weight"][c], torch.full((2,), want))
        assert torch.equal(out["skip.weight"][2], skip["skip.weight"][2])  # nobody holds class 2: kept
        out = merge_skip(skip, [(a, 1.0, None), (b, 3.0, None)])  # without counts: by examples
        assert torch.allclose(out["skip.bias"], torch.full((3,), (1 * 1 + 3 * 3) / 4))


@pytest.fixture
def cfg(tmp_path, make_image_tree):
    root = make_image_tree(tmp_path / "data", {"train": 8, "test": 3}, classes=("a", "b", "c"))
    return RunConfig(dataset="imagefolder", data_dir=str(root), encoder="builtin-random", hidden="24,24",
                     strategy="ist", ist_start="closed-form", num_clients=6, clients_per_round=3, num_rounds=4,
                     partitioner="shards", cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / "run"),
                     residual_temperature=0.5, local_steps=3, batch_size=4, ridge_features=0)


def run(cfg: RunConfig) -> tuple[RoundEngine, object]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        engine = RoundEngine(cfg, report=lambda s: None)
        return engine, engine.run(PlainTransport(cfg))


def union(cfg: RunConfig, clients) -> tuple[torch.Tensor, torch.Tensor]:
    feats = [client_features(cfg, c, cfg.num_clients) for c in sorted(clients)]
    return torch.cat([f.x for f in feats]), torch.cat([f.y for f in feats])


class TestResidualIST:
    def test_selected_by_ist_start_and_never_for_the_authors(self, cfg) -> None:
        assert type(make_algorithm(cfg)) is ResidualIST
        assert type(make_algorithm(cfg.replace(ist_start="random"))) is not ResidualIST
        assert type(make_algorithm(cfg.replace(ist_variant="authors"))) is not ResidualIST

    def test_the_first_round_is_statistics_and_starts_exactly_at_the_ridge_head(self, cfg) -> None:
        engine, metrics = run(cfg.replace(num_rounds=1))
        alg = engine.algorithm
        x, y = union(cfg, alg.counted)
        assert len(alg.counted) == 3
        weight, bias = central_ridge(x, y, 3, cfg.ridge_lambda)
        state = engine.state
        assert torch.allclose(state["skip.weight"].double(), weight / 0.5, rtol=1e-4, atol=1e-5)
        assert torch.allclose(state["skip.bias"].double(), bias / 0.5, rtol=1e-4, atol=1e-5)
        assert not state["layers.2.weight"].any() and not state["layers.2.bias"].any()
        test, _ = server_test_features(cfg)
        with torch.no_grad():
            ridge_pred = (test.x.double() @ weight.T + bias).argmax(1)
            head_pred = build_head(state)(test.x).argmax(1)
        assert torch.equal(head_pred, ridge_pred)
        entry = metrics.rounds[0]
        d = x.shape[1] + 1
        assert entry.bytes_down_total == 0 and entry.bytes_up_per_client == (d * (d + 1) // 2 + d * 3) * 4
        assert entry.accuracy == pytest.approx(float((ridge_pred == test.y).float().mean()))

    def test_statistics_add_up_once_per_client_over_rounds_and_resume_exactly(self, cfg, tmp_path) -> None:
        cfg = cfg.replace(residual_skip="fixed")
        engine, metrics = run(cfg.replace(num_rounds=4))
        alg = engine.algorithm
        x, y = union(cfg, alg.counted)
        assert len(alg.counted) > 3  # later rounds brought new clients' statistics with their training
        total = None
        for c in sorted(alg.counted):  # naive: each counted client's statistics once
            f = client_features(cfg, c, cfg.num_clients)
            total = add_stats(total, stats_for("ridge", f.x, f.y, 3))
        for k in total:
            assert torch.allclose(alg.total[k], total[k], rtol=1e-6, atol=1e-6)
        weight, _ = central_ridge(x, y, 3, cfg.ridge_lambda)
        assert torch.allclose(alg.ridge_skip["skip.weight"].double(), weight / 0.5, rtol=1e-4, atol=1e-5)
        # a fixed skip is the ridge head of every client counted so far
        assert torch.allclose(engine.state["skip.weight"].double(), weight / 0.5, rtol=1e-4, atol=1e-5)
        # bytes: statistics go up only the first time a client is sampled
        up = [r.bytes_up_total for r in metrics.rounds]
        assert all(u > 0 for u in up)
        short, _ = run(cfg.replace(num_rounds=2, out_dir=str(tmp_path / "resumed")))
        resumed, _ = run(cfg.replace(out_dir=str(tmp_path / "resumed"), resume=True))
        assert all(torch.equal(resumed.state[k], engine.state[k]) for k in engine.state)
        assert resumed.algorithm.counted == alg.counted

    def test_slices_are_the_mlp_slices_plus_the_whole_skip_and_merge_back_by_index(self, cfg) -> None:
        alg = make_algorithm(cfg.replace(label_aware=False, server_opt="none", residual_skip="fixed"))
        state = zero_last_layer(residual_state(d=5, hidden=(6, 4), c=3, seed=1))
        state["layers.2.weight"] = torch.randn(3, 4)
        alg.counted = {0}
        tasks = alg.plan(2, state, [0, 1, 2])
        mlp, skip = split_residual(state)
        seen_h1 = []
        for t in tasks:
            idx1, idx2 = t.meta
            seen_h1 += idx1.tolist()
            # naive slicing: rows of layer 0 by idx1, layer 1 rows by idx2 and columns by idx1, layer 2 columns by idx2
            assert torch.equal(t.arrays["layers.0.weight"], torch.stack([mlp["layers.0.weight"][i] for i in idx1]))
            # width scaling, always: weights that read a sliced layer go out times full / slice width
            s1, s2 = 6 / len(idx1), 4 / len(idx2)
            block = torch.tensor([[float(mlp["layers.1.weight"][i, j]) * s1 for j in idx1] for i in idx2])
            assert torch.allclose(t.arrays["layers.1.weight"], block)
            assert torch.allclose(t.arrays["layers.2.weight"], mlp["layers.2.weight"][:, idx2] * s2)
            assert torch.equal(t.arrays["skip.weight"], skip["skip.weight"])  # whole, to every client
            assert t.config[FROZEN_KEY] == "skip."
            spec = t.reply_spec()
            assert "skip.weight" not in spec  # fixed: not sent back
            assert (STATS_PREFIX + "xty" in spec) == (t.client not in alg.counted)
            assert (WITH_STATS_KEY in t.config) == (t.client not in alg.counted)
        assert sorted(seen_h1) == list(range(6))  # the subnets cover the hidden layer
        # replies: every slice + 1, statistics from the new clients
        updates = []
        for t in tasks:
            arrays = {k: v + 1 for k, v in t.arrays.items() if not k.startswith("skip.")}
            if t.client not in alg.counted:
                arrays.update({STATS_PREFIX + "gram-triu": torch.ones(21), STATS_PREFIX + "xty": torch.ones(6, 3)})
            updates.append(ClientUpdate(t.client, arrays, 10))
        alg.ridge_skip = dict(skip)
        alg.total = {"gram-triu": torch.eye(6)[torch.triu_indices(6, 6)[0], torch.triu_indices(6, 6)[1]].double() * 5,
                     "xty": torch.zeros(6, 3, dtype=torch.float64)}
        out = alg.aggregate(2, state, tasks, updates)
        expected = {k: v.clone() for k, v in mlp.items()}
        for t in tasks:  # naive stitching: every trained weight back at its index, the width scale undone
            idx1, idx2 = t.meta
            s1, s2 = 6 / len(idx1), 4 / len(idx2)
            for a, i in enumerate(idx1):
                expected["layers.0.weight"][i] = mlp["layers.0.weight"][i] + 1
                expected["layers.0.bias"][i] = mlp["layers.0.bias"][i] + 1
                for b, j in enumerate(idx2):
                    expected["layers.1.weight"][j, i] = mlp["layers.1.weight"][j, i] + 1 / s1
            for b, j in enumerate(idx2):
                expected["layers.1.bias"][j] = mlp["layers.1.bias"][j] + 1
                expected["layers.2.weight"][:, j] = mlp["layers.2.weight"][:, j] + 1 / s2
        expected["layers.2.bias"] = mlp["layers.2.bias"] + 1  # every client trains the whole output bias
        for k in expected:
            assert torch.allclose(out[k], expected[k], atol=1e-6), k
        assert alg.counted == {0, 1, 2}
        total_xty = 2 * torch.ones(6, 3, dtype=torch.float64)  # two new clients
        assert torch.equal(alg.total["xty"], total_xty)
        ridge = skip_from_linear(ridge_head(alg.total, cfg.ridge_lambda, 5), 0.5)
        assert torch.allclose(out["skip.weight"], ridge["skip.weight"], atol=1e-6)  # fixed skip = new ridge

    def test_a_trained_skip_keeps_its_training_when_the_ridge_moves(self, cfg) -> None:
        alg = make_algorithm(cfg.replace(residual_skip="trained", label_aware=False, server_opt="none"))
        state = zero_last_layer(residual_state(seed=2))
        alg.counted = {0, 1}
        tasks = alg.plan(2, state, [0, 1, 2])
        assert all(FROZEN_KEY not in t.config and "skip.weight" in t.reply_spec() for t in tasks)
        old_ridge = {k: v.clone() for k, v in split_residual(state)[1].items()}
        alg.ridge_skip = old_ridge
        alg.total = None
        updates = []
        for t in tasks:
            arrays = {k: v for k, v in t.arrays.items()}
            arrays["skip.bias"] = arrays["skip.bias"] + 2.0  # every client moved the bias by 2
            if t.client == 2:
                x, y = torch.randn(8, 5), torch.arange(8) % 3
                arrays.update({STATS_PREFIX + k: v for k, v in stats_for("ridge", x, y, 3).items()})
            updates.append(ClientUpdate(t.client, arrays, 4))
        out = alg.aggregate(2, state, tasks, updates)
        new_ridge = skip_from_linear(ridge_head(alg.total, cfg.ridge_lambda, 5), 0.5)
        want = state["skip.bias"] + 2.0 + (new_ridge["skip.bias"] - old_ridge["skip.bias"])
        assert torch.allclose(out["skip.bias"], want, atol=1e-5)

    def test_a_client_trains_around_a_frozen_skip_and_sends_its_statistics(self, cfg) -> None:
        from fedsparse.engine.client import run_task

        state = zero_last_layer(residual_state(d=int(client_features(cfg, 0, 6).x.shape[1]), hidden=(8, 8), c=3))
        config = {"server-round": 2, "local-steps": 3, "lr": 0.01, "batch-size": 4, CLIENT_TASK_KEY: "train",
                  FROZEN_KEY: "skip.", WITH_STATS_KEY: "ridge", "num-classes": 3}
        arrays, n, _ = run_task(cfg, 0, 6, state, config)
        feats = client_features(cfg, 0, 6)
        assert "skip.weight" not in arrays and n == len(feats.y)
        assert arrays["layers.2.weight"].abs().sum() > 0  # the residual MLP trained
        stats = stats_for("ridge", feats.x, feats.y, 3)
        assert all(torch.equal(arrays[STATS_PREFIX + k], v) for k, v in stats.items())
        # the same training with the skip passed in but frozen gives the same MLP as training by hand
        trained, _ = train_slice(cfg, state, Features(feats.x, feats.y, 0.0, True, 0), 2, 0, steps=3, batch_size=4,
                                 lr=0.01, frozen="skip.")
        assert all(torch.equal(trained[k], arrays[k]) for k in trained)


def naive_rf(x: torch.Tensor, shift, scale, seed: int, width: int) -> torch.Tensor:
    """``[x, relu(A ((x - shift) * scale) + a)]`` one example and one unit at a time."""
    a_mat, a_vec = rf_weights(x.shape[1], width, seed)
    rows = []
    for row in x.tolist():
        z = [(v - float(shift[i])) * float(scale[i]) for i, v in enumerate(row)]
        h = [max(0.0, sum(z[i] * float(a_mat[i, j]) for i in range(len(z))) + float(a_vec[j])) for j in range(width)]
        rows.append(row + h)
    return torch.tensor(rows, dtype=torch.float64)


class TestRandomFeatures:
    """``ridge-features``: the skip reads ``[x, relu(A z + a)]`` (``fedsparse.model.residual``)."""

    def test_the_map_is_the_naive_one_and_its_draw_depends_only_on_the_seed(self) -> None:
        gen = torch.Generator().manual_seed(0)
        x, shift, scale = torch.randn(5, 4, generator=gen), torch.randn(4, generator=gen), torch.rand(4, generator=gen) + 0.5
        feats = RandomReLUFeatures(4, 3)
        feats.load_state_dict({"shift": shift, "scale": scale, "seed": torch.tensor(11)})
        with torch.no_grad():
            out = feats(x)
        assert out.shape == (5, 7)
        assert torch.allclose(out.double(), naive_rf(x, shift, scale, 11, 3), atol=1e-5)
        assert torch.equal(rf_weights(4, 3, 11)[0], rf_weights(4, 3, 11)[0])
        assert not torch.equal(rf_weights(4, 3, 11)[0], rf_weights(4, 3, 12)[0])

    def test_a_head_with_random_features_round_trips_and_refuses_a_partial_map(self) -> None:
        torch.manual_seed(0)
        head = ResidualHead(5, (6,), 3, rf_width=4)
        head.rf.seed.fill_(7)
        state = head.state_dict()
        assert set(rf_part(state)) == {"rf.shift", "rf.scale", "rf.seed"} and state["skip.weight"].shape == (3, 9)
        again = build_head(state)
        x = torch.randn(6, 5)
        with torch.no_grad():
            assert torch.equal(again(x), head(x))
        with pytest.raises(ValueError, match="rf.seed"):
            build_head({k: v for k, v in state.items() if k != "rf.seed"})
        with pytest.raises(ValueError, match="skip.weight"):
            build_head({**state, "skip.weight": torch.zeros(3, 5)})

    def test_standardizer_is_the_mean_and_std_of_the_union(self) -> None:
        from fedsparse.model.closed_form import standardizer

        gen = torch.Generator().manual_seed(1)
        parts = [torch.randn(n, 4, generator=gen) * 3 + 1 for n in (5, 9, 2)]
        total = None
        for x in parts:
            total = add_stats(total, stats_for("ridge", x, torch.zeros(len(x), dtype=torch.long), 2))
        mean, scale = standardizer(total, 4)
        allx = torch.cat(parts).double()
        assert torch.allclose(mean, allx.mean(0), atol=1e-5)
        assert torch.allclose(scale, 1 / allx.std(0, unbiased=False), rtol=1e-4)

    def test_round_one_fixes_the_map_and_later_statistics_are_those_of_the_map_exactly(self, cfg, tmp_path,
                                                                                      monkeypatch) -> None:
        import fedsparse.algorithms.residual_ist as residual_ist

        monkeypatch.setattr(residual_ist, "RF_EXAMPLES_PER_INPUT", 0)  # the random features' head at once
        cfg = cfg.replace(ridge_features=4, residual_skip="fixed")
        engine, _ = run(cfg.replace(num_rounds=1))
        state, alg = engine.state, engine.algorithm
        rf = rf_part(state)
        assert set(rf) == {"rf.shift", "rf.scale", "rf.seed"}
        assert alg.total is None and not alg.counted  # everyone sends the statistics of the map next
        # the skip: the linear ridge head, zero on the random features
        assert state["skip.weight"].shape[1] == state["layers.0.weight"].shape[1] + 4
        assert not state["skip.weight"][:, -4:].any()
        everyone, _ = run(cfg.replace(num_rounds=1, clients_per_round=6, out_dir=str(tmp_path / "all")))
        x, _ = union(cfg, range(6))  # standardised by the statistics of round 1's clients: here all of them
        assert torch.allclose(everyone.state["rf.shift"].double(), x.double().mean(0), atol=1e-4)
        assert torch.allclose(everyone.state["rf.scale"].double(), 1 / x.double().std(0, unbiased=False), rtol=1e-3)
        engine, metrics = run(cfg.replace(num_rounds=3, out_dir=str(tmp_path / "three")))
        alg, state = engine.algorithm, engine.state
        rf = rf_part(state)
        assert alg.counted  # statistics of [x, rf(x)] from the clients sampled in rounds 2 and 3
        total = None
        for c in sorted(alg.counted):  # naive: each client's features through the map, one example at a time
            f = client_features(cfg, c, cfg.num_clients)
            phi = naive_rf(f.x, rf["rf.shift"], rf["rf.scale"], int(rf["rf.seed"]), 4)
            total = add_stats(total, stats_for("ridge", phi, f.y, 3))
        for k in total:
            assert torch.allclose(alg.total[k], total[k], rtol=1e-4, atol=1e-4), k
        x, y = union(cfg, alg.counted)
        phi = naive_rf(x, rf["rf.shift"], rf["rf.scale"], int(rf["rf.seed"]), 4)
        weight, bias = central_ridge(phi, y, 3, cfg.ridge_lambda)
        # a fixed skip is the ridge head on [x, rf(x)] of every client counted since round 1
        assert torch.allclose(state["skip.weight"].double(), weight / 0.5, rtol=1e-3, atol=1e-4)
        assert torch.allclose(state["skip.bias"].double(), bias / 0.5, rtol=1e-3, atol=1e-4)
        # the map was fixed by round 1's statistics and never moved
        assert all(torch.equal(v, run(cfg.replace(num_rounds=1, out_dir=str(tmp_path / "one")))[0].state[k])
                   for k, v in rf.items())
        short, _ = run(cfg.replace(num_rounds=2, out_dir=str(tmp_path / "resumed")))
        resumed, _ = run(cfg.replace(num_rounds=3, out_dir=str(tmp_path / "resumed"), resume=True))
        assert all(torch.equal(resumed.state[k], state[k]) for k in state)

    def test_with_few_examples_counted_the_skip_stays_the_linear_ridge_head(self, cfg, tmp_path) -> None:
        import fedsparse.algorithms.residual_ist as residual_ist

        cfg = cfg.replace(ridge_features=4, residual_skip="fixed")
        engine, _ = run(cfg.replace(num_rounds=3))
        alg, state = engine.algorithm, engine.state
        later = sorted(alg.counted)
        x, y = union(cfg, later)
        assert len(y) < residual_ist.RF_EXAMPLES_PER_INPUT * (x.shape[1] + 4 + 1)  # too few for the random features
        # the linear head of whichever counts more examples: round 1's clients or the later ones
        n_first = float(alg.linear["gram-triu"][-1])
        if len(y) >= n_first:
            weight, bias = central_ridge(x, y, 3, cfg.ridge_lambda)
        else:
            weight, bias = ridge_head(alg.linear, cfg.ridge_lambda, x.shape[1]).values()
            weight, bias = weight.double(), bias.double()
        assert torch.allclose(state["skip.weight"][:, :-4].double(), weight / 0.5, rtol=1e-3, atol=1e-4)
        assert not state["skip.weight"][:, -4:].any()
        assert torch.allclose(state["skip.bias"].double(), bias / 0.5, rtol=1e-3, atol=1e-4)
        # round 1's statistics are kept in the checkpoint: a resumed run ends on the same head
        run(cfg.replace(num_rounds=2, out_dir=str(tmp_path / "resumed")))
        resumed, _ = run(cfg.replace(num_rounds=3, out_dir=str(tmp_path / "resumed"), resume=True))
        assert all(torch.equal(resumed.state[k], state[k]) for k in state)
        assert all(torch.equal(resumed.algorithm.linear[k], alg.linear[k]) for k in alg.linear)

    def test_sub_stats_are_the_statistics_of_the_kept_features(self) -> None:
        from fedsparse.model.closed_form import stats_count, sub_stats

        gen = torch.Generator().manual_seed(5)
        x, y = torch.randn(9, 6, generator=gen), torch.randint(0, 3, (9,), generator=gen)
        cut = sub_stats(stats_for("ridge", x, y, 3), 6, 4)
        want = stats_for("ridge", x[:, :4], y, 3)
        assert all(torch.allclose(cut[k], want[k], atol=1e-5) for k in want)
        assert stats_count(cut) == 9.0

    def test_a_client_gets_the_map_trains_through_it_and_never_sends_it_back(self, cfg) -> None:
        from fedsparse.engine.client import run_task

        d = int(client_features(cfg, 0, 6).x.shape[1])
        torch.manual_seed(3)
        head = ResidualHead(d, (8, 8), 3, rf_width=5)
        head.rf.seed.fill_(9)
        state = zero_last_layer(head.state_dict())
        config = {"server-round": 2, "local-steps": 3, "lr": 0.01, "batch-size": 4, CLIENT_TASK_KEY: "train",
                  WITH_STATS_KEY: "ridge", "num-classes": 3}
        arrays, _, _ = run_task(cfg, 0, 6, state, config)
        assert not rf_part(arrays) and arrays["skip.weight"].shape == (3, d + 5)
        feats = client_features(cfg, 0, 6)
        phi = naive_rf(feats.x, state["rf.shift"], state["rf.scale"], 9, 5)
        want = stats_for("ridge", phi, feats.y, 3)
        assert all(torch.allclose(arrays[STATS_PREFIX + k], v, rtol=1e-4, atol=1e-3) for k, v in want.items())

    def test_clients_train_at_residual_lr_under_the_lr_schedule(self, cfg) -> None:
        import math

        for schedule in ("constant", "cosine"):
            run_cfg = cfg.replace(lr=0.01, residual_lr=0.0002, lr_schedule=schedule, num_rounds=4)
            first, _ = run(run_cfg.replace(num_rounds=1))
            engine = RoundEngine(run_cfg, report=lambda s: None)  # four rounds: the schedule's T
            engine.state, engine.algorithm = first.state, first.algorithm
            tasks = engine.plan_round(3, list(range(6)))
            factor = 1.0 if schedule == "constant" else 0.5 * (1 + math.cos(math.pi * 2 / 4))
            assert tasks and all(t.config["lr"] == pytest.approx(0.0002 * factor) for t in tasks)
            fedavg = RoundEngine(run_cfg.replace(strategy="fedavg"), report=lambda s: None)
            assert all(t.config["lr"] == pytest.approx(0.01 * factor) for t in fedavg.plan_round(3, list(range(6))))

    def test_a_trainers_slice_does_not_grow_when_others_send_statistics(self, cfg) -> None:
        alg = make_algorithm(cfg.replace(ridge_features=4, subnets_per_round=0))  # pure IST: G = sampled clients
        torch.manual_seed(0)
        head = ResidualHead(5, (12, 8), 3, rf_width=4)
        state = zero_last_layer(head.state_dict())
        alg.counted = {0, 1}
        tasks = alg.plan(3, state, [0, 1, 2, 3])  # 2 and 3 are new: statistics
        train = [t for t in tasks if t.meta != "stats"]
        assert sorted(t.client for t in train) == [0, 1] and len(tasks) == 4
        everyone = make_algorithm(cfg.replace(ridge_features=4, subnets_per_round=0))
        everyone.counted = {0, 1, 2, 3}  # the same round with every client training
        full = everyone.plan(3, state, [0, 1, 2, 3])
        for t in train:  # the slice it gets when everyone trains: a quarter of each hidden layer
            same = next(f for f in full if f.client == t.client)
            assert all(torch.equal(t.meta[i], same.meta[i]) for i in range(2))
            assert t.arrays["layers.0.weight"].shape[0] == 3

    def test_a_negative_width_is_a_one_line_error(self) -> None:
        with pytest.raises(ValueError, match="ridge-features must be >= 0"):
            RunConfig(ridge_features=-1)


class TestCeilings:
    def test_the_ridge_ceiling_with_random_features_is_the_naive_kernel_ridge(self, cfg, tmp_path) -> None:
        from fedsparse.commands.ceilings import ceiling
        from fedsparse.seeds import derive_seed
        from fedsparse.task import whole_split_features

        cfg = cfg.replace(ridge_features=4, out_dir=str(tmp_path / "ceiling"))
        got = ceiling(cfg, "ridge")
        x, y = whole_split_features(cfg).x.double(), whole_split_features(cfg).y
        mean, std = x.mean(0), x.std(0, unbiased=False)
        phi = naive_rf(x.float(), mean, 1 / std, derive_seed("ridge-features", cfg.seed), 4)
        weight, bias = central_ridge(phi, y, 3, cfg.ridge_lambda)
        test, _ = server_test_features(cfg)
        phi_test = naive_rf(test.x, mean, 1 / std, derive_seed("ridge-features", cfg.seed), 4)
        want = float(((phi_test @ weight.T + bias).argmax(1) == test.y).float().mean())
        assert got.rounds[-1].accuracy == pytest.approx(want)
        linear = ceiling(cfg.replace(ridge_features=0, out_dir=str(tmp_path / "linear")), "ridge")
        assert got.model_params == linear.model_params + 4 * 3


    def test_validation_split_is_disjoint_seeded_and_covers_everything(self) -> None:
        tr, val = validation_split(100, 0.1, seed=3)
        assert len(val) == 10 and len(tr) == 90
        assert sorted(tr.tolist() + val.tolist()) == list(range(100))
        assert torch.equal(validation_split(100, 0.1, seed=3)[1], val)
        assert not torch.equal(validation_split(100, 0.1, seed=4)[1], val)

    def test_early_stopping_keeps_the_best_validation_checkpoint(self) -> None:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(200, 4, generator=gen)
        y = (x[:, 0] > 0).long()
        cfg = RunConfig(batch_size=16, lr=0.05)
        model = MLPHead(4, [8], 2)
        fit = train_early_stopped(model, (x[:150], y[:150]), (x[150:], y[150:]), (x[150:], y[150:]), cfg,
                                  eval_steps=5, patience=3, max_epochs=20)
        curve = fit["curve"]
        best = curve[fit["best_at"]]
        assert best["val_accuracy"] == max(c["val_accuracy"] for c in curve)
        # stopped after `patience` evaluations without a better one, or at the step cap
        assert len(curve) - 1 - fit["best_at"] <= 3
        with torch.no_grad():
            acc = float((model(x[150:]).argmax(1) == y[150:]).float().mean())
        assert acc == pytest.approx(best["val_accuracy"])


def test_the_new_keys_show_in_fedsparse_keys_with_their_defaults(capsys) -> None:
    from fedsparse.commands.cli import main

    assert main(["keys"]) == 0
    out = capsys.readouterr().out
    for line in ("ist-start = 'closed-form'", "residual-temperature = 0.1", "residual-normalize = False",
                 "residual-skip = 'trained'", "ridge-features = 512", "residual-lr = 3e-05"):
        assert line in out
    with pytest.raises(ValueError, match="ist-start"):
        RunConfig(ist_start="ridge")
    with pytest.raises(ValueError, match="residual-temperature"):
        RunConfig(residual_temperature=0.0)


class TestImplausibleStatistics:
    def test_honest_statistics_pass_and_scaled_negated_or_inflated_ones_do_not(self) -> None:
        from fedsparse.model.closed_form import check_ridge_stats

        gen = torch.Generator().manual_seed(0)
        for n in (1, 7, 50):
            x, y = torch.randn(n, 5, generator=gen) * 3, torch.randint(0, 3, (n,), generator=gen)
            stats = stats_for("ridge", x, y, 3)
            check_ridge_stats(stats, n, 5)  # every honest reply
            for bad, claimed in (({k: 100 * v for k, v in stats.items()}, n),  # weights x 100
                                 ({k: -v for k, v in stats.items()}, n),  # negated
                                 (stats, n + 1),  # claims more examples than it counted
                                 ({**stats, "xty": stats["xty"] * 2}, n)):  # X^T Y inflated
                with pytest.raises(ValueError, match="ridge statistics"):
                    check_ridge_stats(bad, claimed, 5)

    def test_the_engine_refuses_them_as_implausible(self, cfg) -> None:
        from fedsparse.engine.rounds import RejectedReply, Reply, check_reply

        alg = make_algorithm(cfg)
        in_dim = int(client_features(cfg, 0, 6).x.shape[1])
        state = MLPHead(in_dim, [24, 24], 3).state_dict()
        task = alg.plan(1, state, [0])[0]
        assert task.config[CLIENT_TASK_KEY] == STATS
        feats = client_features(cfg, 0, 6)
        honest = stats_for("ridge", feats.x, feats.y, 3)
        assert check_reply(task, Reply(0, honest, len(feats.y))).num_examples == len(feats.y)
        with pytest.raises(RejectedReply) as err:
            check_reply(task, Reply(0, {k: 100 * v for k, v in honest.items()}, len(feats.y)))
        assert err.value.code == "implausible"
        fed3r = make_algorithm(cfg.replace(strategy="fed3r")).plan(1, state, [0])[0]
        with pytest.raises(RejectedReply):
            check_reply(fed3r, Reply(0, {k: -v for k, v in honest.items()}, len(feats.y)))
