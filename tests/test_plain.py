"""The plain driver does exactly what the Flower Strategy adapter + ClientApp do in process
(same model after N rounds, bit for bit, and the same accuracies)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from fedsparse.config import RunConfig
from fedsparse.engine.plain import PlainTransport
from fedsparse.engine.rounds import RoundEngine
from strategies.in_process import in_process_run


@pytest.fixture
def cfg(tmp_path, make_image_tree):
    root = make_image_tree(tmp_path / "data", {"train": 10, "test": 3}, classes=("a", "b", "c"))
    return RunConfig(dataset="imagefolder", data_dir=str(root), encoder="builtin-random", hidden="24,24",
                     num_clients=6, clients_per_round=3, num_rounds=3, local_steps=3, batch_size=4,
                     cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize("strategy, subnets, features", [
    ("ist", 0, 0),  # pure IST (G = K = 3), the closed form on the features alone
    ("ist", 2, 0),  # 3 clients in 2 groups
    ("ist", 0, 512),  # the default: random features, whose statistics replace a new client's training
    ("fedavg", 0, 0),
])
def test_plain_driver_equals_strategy_and_client_app_in_process(cfg, tmp_path, strategy, subnets, features):
    cfg = cfg.replace(strategy=strategy, subnets_per_round=subnets, ridge_features=features)
    plain_cfg = cfg.replace(out_dir=str(tmp_path / "plain"))
    flower_cfg = cfg.replace(out_dir=str(tmp_path / "in-process"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        plain = RoundEngine(plain_cfg, report=lambda s: None)
        plain_metrics = plain.run(PlainTransport(plain_cfg))
        flower = RoundEngine(flower_cfg, report=lambda s: None)
        flower_metrics = in_process_run(flower_cfg, flower)
    assert (plain_metrics.engine, flower_metrics.engine) == ("plain", "in-process")
    assert [r.round for r in plain_metrics.rounds] == [r.round for r in flower_metrics.rounds] == [1, 2, 3]
    assert all(r.clients == 3 and r.failures == 0 for r in plain_metrics.rounds + flower_metrics.rounds)
    initial = plain.initial_head_state()
    assert any(not torch.equal(plain.state[k], initial[k]) for k in initial)  # the rounds did train the head
    assert plain.state.keys() == flower.state.keys()
    for key, value in plain.state.items():
        assert torch.equal(value, flower.state[key]), key
    for out, engine in ((Path(plain_cfg.out_dir), plain), (Path(flower_cfg.out_dir), flower)):
        saved = torch.load(out / "model.pt", weights_only=True)
        assert saved.keys() == engine.state.keys() and all(torch.equal(saved[k], engine.state[k]) for k in saved)
    assert plain_metrics.initial == flower_metrics.initial
    assert [r.accuracy for r in plain_metrics.rounds] == [r.accuracy for r in flower_metrics.rounds]
    expected = [1 if strategy == "fedavg" else (subnets or 3)] * 3
    if strategy == "ist":  # the default IST starts from the closed form: round 1 gathers statistics (one group)
        expected[0] = 1
    if features:  # round 2: every client is new to the random features and only sends their statistics
        expected[1] = 1
        expected[2] = plain_metrics.rounds[2].subnets  # round 3: as many groups as clients already counted
        assert plain_metrics.rounds[1].bytes_up_per_client > plain_metrics.rounds[0].bytes_up_per_client
        assert "rf.seed" in plain.state
    assert [r.subnets for r in plain_metrics.rounds] == expected
