"""fedsparse.task: a client's features per mask mode, the server's test features."""

from __future__ import annotations

import warnings

import pytest
import torch

from fedsparse.config import RunConfig
from fedsparse.task import client_features, test_features


@pytest.fixture
def cfg(tmp_path, make_image_tree):
    root = make_image_tree(tmp_path / "data", {"train": 6, "test": 2})
    return RunConfig(dataset="imagefolder", data_dir=str(root), encoder="builtin-random", mask_ratio=0.75,
                     num_clients=2, clients_per_round=2, cache_dir=str(tmp_path / "cache"))


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def test_fixed_masks_extract_once_then_hit_the_cache_in_every_round(cfg):
    first = client_features(cfg, 0, 2, server_round=1)
    again = client_features(cfg, 0, 2, server_round=2)
    assert (first.cache_hit, again.cache_hit) == (False, True)
    assert torch.equal(first.x, again.x)


def test_random_masks_are_drawn_anew_every_round_and_never_cached(cfg):
    c = cfg.replace(mask_mode="random")
    r1, r2, r1_again = (client_features(c, 0, 2, server_round=r) for r in (1, 2, 1))
    assert not any(f.cache_hit for f in (r1, r2, r1_again)) and r1.seconds > 0
    assert not torch.allclose(r1.x, r2.x)  # other masks, other CLS vectors
    assert torch.equal(r1.x, r1_again.x)  # but reproducible from (mask-seed, round)
    assert torch.equal(r1.y, r2.y)


def test_random_mode_evaluates_on_fixed_test_masks(cfg):
    fixed, n_classes = test_features(cfg)
    rand, _ = test_features(cfg.replace(mask_mode="random"))
    assert n_classes == 2 and torch.equal(fixed.x, rand.x)


def test_clients_read_their_rows_of_the_whole_split_once_it_is_cached(cfg):
    """Per-image masks depend on the image alone, so a client's features are its rows of the
    whole training split's entry, for any partitioning: no extraction after the first."""
    from fedsparse.task import whole_split_features

    settings = [cfg, cfg.replace(partitioner="dirichlet", num_clients=3, clients_per_round=3)]
    alone = [[client_features(c, i, c.num_clients) for i in range(c.num_clients)] for c in settings]
    assert not any(f.cache_hit for fs in alone for f in fs)  # each client extracted its own images
    whole = whole_split_features(cfg)
    assert not whole.cache_hit and len(whole.y) == 12
    for c, extracted in zip(settings, alone):
        for i, own in enumerate(extracted):
            rows = client_features(c, i, c.num_clients)
            assert rows.cache_hit and rows.seconds == 0.0
            assert torch.equal(rows.y, own.y) and torch.allclose(rows.x, own.x, atol=1e-5)  # batch rounding aside
    other = client_features(cfg.replace(mask_ratio=0.5), 0, 2)  # no whole-split entry at this ratio
    assert not other.cache_hit


def test_rows_of_the_whole_split_carry_the_runs_class_list(cfg):
    """With ``classes`` ordering the labels unlike the folders, the whole split is extracted
    under the run's labels and its clients read their rows from it."""
    from fedsparse.task import client_images, whole_split_features

    c = cfg.replace(classes="dog,cat")  # the tree's folders are cat, dog
    whole_split_features(c)
    rows = client_features(c, 0, 2)  # no entry of its own exists: a hit can only be the whole split
    assert rows.cache_hit and rows.seconds == 0.0
    assert rows.y.tolist() == client_images(c, 0, 2).labels.tolist()
    assert rows.y.tolist() != client_images(cfg, 0, 2).labels.tolist()  # the folders' order differs
