"""Tests for fedsparse/model/server_opt.py: FedAvgM and FedAdam steps against naive loops."""

from __future__ import annotations

import io
import math

import pytest
import torch

from fedsparse.model.server_opt import SERVER_OPTIMIZERS, ServerOptimizer


def states(seed: int, n: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(3, 2, generator=gen), "b": torch.randn(4, generator=gen)} for _ in range(n)]


def naive_run(kind: str, x0: dict, aggregates: list[dict], lr: float, beta1: float, beta2: float, tau: float) -> dict:
    """The optimizer one scalar at a time, in plain Python floats."""
    x = {k: v.flatten().tolist() for k, v in x0.items()}
    m = {k: [0.0] * len(v) for k, v in x.items()}
    v2 = {k: [0.0] * len(v) for k, v in x.items()}
    for agg in aggregates:
        for key in x:
            a = agg[key].flatten().tolist()
            for i in range(len(x[key])):
                g = x[key][i] - a[i]
                if kind == "none":
                    x[key][i] = a[i]
                elif kind == "sgd":
                    m[key][i] = beta1 * m[key][i] + g
                    x[key][i] -= lr * m[key][i]
                else:
                    m[key][i] = beta1 * m[key][i] + (1 - beta1) * g
                    v2[key][i] = beta2 * v2[key][i] + (1 - beta2) * g * g
                    x[key][i] -= lr * m[key][i] / (math.sqrt(v2[key][i]) + tau)
    return {k: torch.tensor(v).reshape(x0[k].shape) for k, v in x.items()}


@pytest.mark.parametrize("kind, lr, beta1", [("none", 1.0, 0.9), ("sgd", 1.0, 0.9), ("sgd", 0.5, 0.0), ("adam", 0.1, 0.9)])
def test_steps_equal_a_naive_loop(kind: str, lr: float, beta1: float) -> None:
    x0, *aggs = states(0, 5)
    opt = ServerOptimizer(kind, lr=lr, beta1=beta1, beta2=0.99, tau=1e-3)
    x = x0
    for agg in aggs:
        x = opt.step(x, agg)
    expected = naive_run(kind, x0, aggs, lr, beta1, 0.99, 1e-3)
    for key in x0:
        assert torch.allclose(x[key], expected[key], atol=1e-5), key
        assert x[key].dtype == x0[key].dtype


def test_sgd_with_lr_one_and_no_momentum_is_the_aggregate() -> None:
    x0, agg = states(1, 2)
    out = ServerOptimizer("sgd", lr=1.0, beta1=0.0).step(x0, agg)
    assert all(torch.allclose(out[k], agg[k], atol=1e-6) for k in agg)


def test_none_takes_the_aggregate_without_copying_it() -> None:
    # states are never changed in place (tests/test_engine.py), so the aggregate, a new state,
    # is the next state as it is: no 7 MB copy a round
    x0, agg = states(2, 2)
    before = {k: v.clone() for k, v in x0.items()}
    out = ServerOptimizer("none").step(x0, agg)
    assert out is not agg and out.keys() == agg.keys() and all(out[k] is agg[k] for k in agg)
    assert all(torch.equal(x0[k], before[k]) for k in x0)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_state_dict_survives_a_checkpoint_and_continues_exactly(kind: str) -> None:
    x0, *aggs = states(3, 6)
    straight = ServerOptimizer(kind, lr=0.3)
    x = x0
    for agg in aggs:
        x = straight.step(x, agg)
    first = ServerOptimizer(kind, lr=0.3)
    y = x0
    for agg in aggs[:2]:
        y = first.step(y, agg)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = ServerOptimizer(kind, lr=0.3)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.steps == 2
    for agg in aggs[2:]:
        y = resumed.step(y, agg)
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_unknown_kind_is_one_line_listing_choices() -> None:
    with pytest.raises(ValueError, match="server-opt must be one of " + ", ".join(SERVER_OPTIMIZERS)):
        ServerOptimizer("yogi")
