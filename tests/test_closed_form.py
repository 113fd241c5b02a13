"""Closed-form heads: fedsparse/model/closed_form.py and the fed3r / fedncm algorithms.

Fed3R must equal a centralized ridge solve on the union of the clients' features, whatever
the split; FedNCM must predict the nearest class mean; both go through the round engine
(a ``stats`` task, replies checked against the task's reply spec, bytes counted)."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

from fedsparse.algorithms import ClientTask, make_algorithm
from fedsparse.config import RunConfig
from fedsparse.engine.plain import PlainTransport
from fedsparse.engine.rounds import RejectedReply, Reply, RoundEngine, check_reply
from fedsparse.model.closed_form import (
    COUNTS,
    GRAM,
    SUMS,
    XTY,
    add_stats,
    ncm_head,
    pack_triu,
    ridge_head,
    stats_for,
    stats_spec,
    sufficient_stats,
    unpack_triu,
)
from fedsparse.model.head import MLPHead
from fedsparse.model.ist import state_bytes
from fedsparse.task import client_features
from fedsparse.task import test_features as server_test_features


def central_ridge(x: torch.Tensor, y: torch.Tensor, num_classes: int, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``argmin |[x 1] B - Y|^2 + lam |B|^2`` on all the data at once, in float64: (weight, bias)."""
    x1 = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    onehot = torch.nn.functional.one_hot(y.long(), num_classes).double()
    beta = torch.linalg.solve(x1.T @ x1 + lam * torch.eye(x1.shape[1], dtype=torch.float64), x1.T @ onehot)
    return beta[:-1].T, beta[-1]


def blobs(seed: int, n: int = 120, d: int = 6, c: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=gen)
    x = torch.randn(n, d, generator=gen) + 2.0 * torch.nn.functional.one_hot(y, d)[:, :d].float()
    return x, y


class TestMath:
    def test_triangle_round_trip(self) -> None:
        a = torch.randn(5, 5, dtype=torch.float64)
        sym = a + a.T
        packed = pack_triu(sym)
        assert packed.shape == (15,)
        assert torch.equal(unpack_triu(packed, 5), sym)
        with pytest.raises(ValueError, match="5x5"):
            unpack_triu(packed[:-1], 5)

    def test_statistics_add_up_over_any_split(self) -> None:
        x, y = blobs(0)
        whole = sufficient_stats(x, y, 4, torch.float64)
        parts = None
        for chunk in torch.tensor_split(torch.randperm(len(y), generator=torch.Generator().manual_seed(1)), 7):
            parts = add_stats(parts, sufficient_stats(x[chunk], y[chunk], 4, torch.float64))
        for key in whole:
            assert torch.allclose(parts[key], whole[key], atol=1e-9), key

    @pytest.mark.parametrize("lam", [0.01, 1.0])
    def test_ridge_from_label_skewed_client_stats_equals_the_central_solve(self, lam: float) -> None:
        x, y = blobs(2, n=300)
        total = None
        for c in range(4):  # one client per class: the most skewed split there is
            mine = y == c
            total = add_stats(total, stats_for("ridge", x[mine], y[mine], 4))  # float32 on the wire
        head = ridge_head(total, lam, x.shape[1])
        weight, bias = central_ridge(x, y, 4, lam)
        assert torch.allclose(head["layers.0.weight"].double(), weight, rtol=1e-4, atol=1e-5)
        assert torch.allclose(head["layers.0.bias"].double(), bias, rtol=1e-4, atol=1e-5)

    @pytest.mark.parametrize("metric", ["euclidean", "cosine"])
    def test_ncm_predicts_the_nearest_class_mean(self, metric: str) -> None:
        x, y = blobs(3)
        stats = sufficient_stats(x, y, 5)  # class 4 is held by nobody
        head = MLPHead.from_state_dict(ncm_head(stats, metric))
        means = torch.stack([x[y == c].mean(0) for c in range(4)])
        probe = torch.randn(50, x.shape[1], generator=torch.Generator().manual_seed(4)) * 3
        if metric == "euclidean":
            expected = torch.cdist(probe, means).argmin(1)
        else:
            expected = torch.nn.functional.cosine_similarity(probe.unsqueeze(1), means.unsqueeze(0), dim=2).argmax(1)
        with torch.no_grad():
            assert torch.equal(head(probe).argmax(1), expected)

    def test_spec_names_the_keys_shapes_and_dtype_of_what_is_sent(self) -> None:
        x, y = blobs(5)
        for kind, keys in (("ridge", {GRAM, XTY}), ("ncm", {COUNTS, SUMS})):
            spec = stats_spec(kind, x.shape[1], 4)
            stats = stats_for(kind, x, y, 4)
            assert set(spec) == set(stats) == keys
            assert all(tuple(stats[k].shape) == spec[k][0] and stats[k].dtype == spec[k][1] for k in spec)
        with pytest.raises(ValueError, match="statistics"):
            stats_spec("pca", 3, 2)


class TestReplySpec:
    def task(self) -> ClientTask:
        return ClientTask(0, {}, reply={"a": ((2, 3), torch.float32), "b": ((4,), torch.float32)})

    def test_a_reply_matching_the_spec_is_accepted(self) -> None:
        update = check_reply(self.task(), Reply(0, {"a": torch.zeros(2, 3), "b": torch.ones(4)}, 5))
        assert update.num_examples == 5 and set(update.arrays) == {"a", "b"}

    @pytest.mark.parametrize("arrays, code", [
        ({"a": torch.zeros(2, 3)}, "arrays"),
        ({"a": torch.zeros(2, 3), "b": torch.ones(4), "c": torch.ones(1)}, "arrays"),
        ({"a": torch.zeros(3, 2), "b": torch.ones(4)}, "shape"),
        ({"a": torch.zeros(2, 3, dtype=torch.float64), "b": torch.ones(4)}, "dtype"),
        ({"a": torch.full((2, 3), float("nan")), "b": torch.ones(4)}, "non-finite"),
    ])
    def test_anything_else_is_rejected(self, arrays, code) -> None:
        with pytest.raises(RejectedReply) as err:
            check_reply(self.task(), Reply(0, arrays, 5))
        assert err.value.code == code

    def test_without_a_spec_the_reply_must_equal_what_was_sent(self) -> None:
        task = ClientTask(0, {"w": torch.zeros(2)})
        assert task.reply_spec() == {"w": ((2,), torch.float32)}
        with pytest.raises(RejectedReply):
            check_reply(task, Reply(0, {"w": torch.zeros(3)}, 1))


@pytest.fixture
def cfg(tmp_path, shared_image_tree, shared_feature_cache):
    root = shared_image_tree({"train": 8, "test": 3}, classes=("a", "b", "c"))
    return RunConfig(dataset="imagefolder", data_dir=str(root), encoder="builtin-random", hidden="24,24",
                     strategy="fed3r", num_clients=6, clients_per_round=6, num_rounds=1, partitioner="shards",
                     cache_dir=str(shared_feature_cache), out_dir=str(tmp_path / "run"))


def run(cfg: RunConfig) -> tuple[RoundEngine, object]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        engine = RoundEngine(cfg, report=lambda s: None)
        return engine, engine.run(PlainTransport(cfg))


def union(cfg: RunConfig, clients) -> tuple[torch.Tensor, torch.Tensor]:
    feats = [client_features(cfg, c, cfg.num_clients) for c in sorted(clients)]
    return torch.cat([f.x for f in feats]), torch.cat([f.y for f in feats])


class TestAlgorithms:
    def test_fed3r_in_one_round_equals_the_central_ridge_on_the_union(self, cfg) -> None:
        engine, metrics = run(cfg)
        x, y = union(cfg, range(cfg.num_clients))
        weight, bias = central_ridge(x, y, 3, cfg.ridge_lambda)
        assert set(engine.state) == {"layers.0.weight", "layers.0.bias"}
        assert torch.allclose(engine.state["layers.0.weight"].double(), weight, rtol=1e-4, atol=1e-5)
        assert torch.allclose(engine.state["layers.0.bias"].double(), bias, rtol=1e-4, atol=1e-5)
        entry = metrics.rounds[0]
        d = x.shape[1] + 1
        assert entry.clients == 6 and entry.failures == 0
        assert entry.bytes_down_total == 0  # nothing goes down but the round's settings
        assert entry.bytes_up_per_client == (d * (d + 1) // 2 + d * 3) * 4  # the triangle and X^T Y, float32
        test, _ = server_test_features(cfg)
        with torch.no_grad():
            predicted = MLPHead.from_state_dict(engine.state)(test.x).argmax(1)
        assert entry.accuracy == pytest.approx(float((predicted == test.y).float().mean()))

    def test_fed3r_counts_each_client_once_over_rounds_and_resumes_exactly(self, cfg, tmp_path) -> None:
        cfg = cfg.replace(clients_per_round=2, num_rounds=5)
        engine, metrics = run(cfg)
        algorithm = engine.algorithm
        seen = algorithm.counted
        assert sum(r.clients for r in metrics.rounds) == len(seen)  # nobody sends twice
        x, y = union(cfg, seen)
        weight, _ = central_ridge(x, y, 3, cfg.ridge_lambda)
        assert torch.allclose(engine.state["layers.0.weight"].double(), weight, rtol=1e-4, atol=1e-5)
        # interrupted after round 2, resumed: the same head
        short, _ = run(cfg.replace(num_rounds=2, out_dir=str(tmp_path / "resumed")))
        resumed, _ = run(cfg.replace(out_dir=str(tmp_path / "resumed"), resume=True))
        assert all(torch.equal(resumed.state[k], engine.state[k]) for k in engine.state)
        assert resumed.algorithm.counted == seen
        buf = io.BytesIO()
        torch.save(algorithm.state_dict(), buf)
        buf.seek(0)
        torch.load(buf, weights_only=True)  # what checkpoint.pt holds loads safely

    def test_fedncm_is_the_nearest_class_mean_of_the_union(self, cfg) -> None:
        engine, metrics = run(cfg.replace(strategy="fedncm"))
        x, y = union(cfg, range(cfg.num_clients))
        means = torch.stack([x[y == c].mean(0) for c in range(3)])
        test, _ = server_test_features(cfg)
        expected = torch.cdist(test.x, means).argmin(1)
        with torch.no_grad():
            got = MLPHead.from_state_dict(engine.state)(test.x).argmax(1)
        assert torch.equal(got, expected)
        assert metrics.rounds[0].bytes_up_per_client == (3 + 3 * x.shape[1]) * 4
        assert make_algorithm(cfg.replace(strategy="fedncm")).describe().startswith("FedNCM")

    def test_plain_bytes_of_a_stats_reply_are_its_tensor_bytes(self, cfg) -> None:
        feats = client_features(cfg, 0, cfg.num_clients)
        stats = stats_for("ridge", feats.x, feats.y, 3)
        assert state_bytes(stats) == sum(v.numel() * 4 for v in stats.values())
