"""The plain loop does exactly what the Flower strategy + ClientApp do (same model after N rounds)."""

from __future__ import annotations

import warnings

import pytest
import torch

from fedsparse.config import RunConfig
from fedsparse.plain import plain_rounds
from strategies.measure import local_rounds


@pytest.fixture
def cfg(tmp_path, make_image_tree):
    root = make_image_tree(tmp_path / "data", {"train": 10, "test": 3}, classes=("a", "b", "c"))
    return RunConfig(dataset="imagefolder", data_dir=str(root), encoder="builtin-random", hidden="24,24",
                     num_clients=6, clients_per_round=3, num_rounds=3, local_steps=3, batch_size=4,
                     cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize("subnets", [0, 2])  # pure IST (G = K = 3), and 3 clients in 2 groups
def test_plain_loop_equals_strategy_and_client_app_in_process(cfg, subnets):
    cfg = cfg.replace(subnets_per_round=subnets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        plain = plain_rounds(cfg, report=lambda s: None)
        flower = local_rounds(cfg, report=lambda s: None)
    assert [r["round"] for r in plain["rounds"]] == [1, 2, 3]
    for key, value in plain["state"].items():
        assert torch.equal(value, flower["state"][key]), key
    assert [r["accuracy"] for r in plain["rounds"]] == [r["accuracy"] for r in flower["rounds"]]
