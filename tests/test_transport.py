"""The engine asks a transport what it can do (``Transport.clients_are_partitions``,
``Transport.profiles``); its ``name`` only labels metrics.json."""

from __future__ import annotations

import warnings

import pytest

from fedsparse.config import RunConfig
from fedsparse.task import partition_sizes_of
from fedsparse.engine.plain import PlainTransport
from fedsparse.engine.rounds import RoundEngine
from fedsparse.profiles import PROFILES


@pytest.fixture
def cfg(tmp_path, make_image_tree):
    root = make_image_tree(tmp_path / "data", {"train": 8, "test": 3}, classes=("a", "b", "c"))
    return RunConfig(dataset="imagefolder", data_dir=str(root), encoder="builtin-random", hidden="24,24",
                     num_clients=6, clients_per_round=3, num_rounds=1, local_steps=1, batch_size=4,
                     max_examples=1000, cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / "run"))


class Named(PlainTransport):
    def __init__(self, cfg: RunConfig, name: str, partitions: bool, profiles: dict | None = None) -> None:
        super().__init__(cfg)
        self.name, self.clients_are_partitions, self.profiles = name, partitions, profiles or {}


def started(cfg: RunConfig, transport) -> RoundEngine:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        engine = RoundEngine(cfg, report=lambda s: None)
        engine.start(transport)
    return engine


@pytest.mark.parametrize("name", ["plain", "deployment", "anything"])
def test_the_examples_bound_follows_the_capability_not_the_name(cfg, name) -> None:
    sizes = partition_sizes_of(cfg)
    exact = started(cfg, Named(cfg, name, partitions=True))
    assert [exact.max_examples(c) for c in range(cfg.num_clients)] == sizes
    loose = started(cfg.replace(out_dir=cfg.out_dir + "-2"), Named(cfg, name, partitions=False))
    assert [loose.max_examples(c) for c in range(cfg.num_clients)] == [1000] * cfg.num_clients
    assert exact.metrics.engine == loose.metrics.engine == name  # the name only labels the run


def test_reported_profiles_win_over_device_profiles(cfg) -> None:
    cfg = cfg.replace(device_profiles="tiny:0.5,large:0.5", ist_variant="skew")
    plain = started(cfg, PlainTransport(cfg))
    from_config = [plain.profile_of(c) for c in range(cfg.num_clients)]
    assert all(p is not None for p in from_config)
    reported = started(cfg.replace(out_dir=cfg.out_dir + "-2"),
                       Named(cfg, "plain", True, profiles={0: PROFILES["small"], 1: None}))
    assert reported.profile_of(0) == PROFILES["small"] and reported.profile_of(1) is None
    assert [reported.profile_of(c) for c in range(2, cfg.num_clients)] == from_config[2:]
