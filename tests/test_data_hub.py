"""Tests for dataset ``cifar10`` without data-dir: the hub data set through flwr-datasets, saved once
as class folders in the cache. Nothing here touches the network.

The loader is exercised two ways: with ``load_hub_splits`` (the one function that talks to
flwr-datasets) replaced by in-memory splits; and through flwr-datasets itself (in the ``test``
extra, as in ``hub``) on a local mirror of the hub data set that the test writes (parquet files
with the same ``img``/``label`` columns as ``uoft-cs/cifar10``), named by
``FEDSPARSE_HUB_CIFAR10``, with every connection off this machine refused.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import fedsparse.data.datasets as data
from fedsparse.commands.cli import main
from fedsparse.data.datasets import HUB_CIFAR10, load_splits

CLASSES = ("airplane", "automobile", "bird")
# (train labels, test labels), in the data set's row order
LABELS = {"train": [2, 0, 1, 0, 2, 1, 1], "test": [1, 0, 2]}


def pil(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8), "RGB")


class FakeSplit(list):
    """Rows like a ``datasets.Dataset`` of uoft-cs/cifar10: ``{"img": PIL image, "label": int}``."""

    features = {"img": None, "label": SimpleNamespace(names=list(CLASSES))}


def fake_splits() -> dict[str, FakeSplit]:
    return {split: FakeSplit({"img": pil(100 * i + j), "label": y} for j, y in enumerate(ys))
            for i, (split, ys) in enumerate(LABELS.items())}


def assert_layout(train, test, root: Path) -> None:
    for split, s in (("train", train), ("test", test)):
        assert s.classes == CLASSES
        assert s.root == root
        assert len(s) == len(LABELS[split])
        # row j of the split is <split>/<class>/<j>.png, labelled by its class folder
        expected = sorted(f"{split}/{CLASSES[y]}/{j:05d}.png" for j, y in enumerate(LABELS[split]))
        assert sorted(s.paths) == expected
        for p, y in zip(s.paths, s.labels):
            assert CLASSES[y] == Path(p).parts[1]
            assert (root / p).is_file()


class TestHubMaterialization:
    def test_splits_are_written_once_as_class_folders_and_reused(self, tmp_path, monkeypatch) -> None:
        calls = []

        def loader(name, hf_cache_dir):
            calls.append(name)
            return fake_splits()

        monkeypatch.delenv("FEDSPARSE_HUB_CIFAR10", raising=False)
        monkeypatch.setattr(data, "load_hub_splits", loader)
        cache = tmp_path / "cache"
        train, test = load_splits.__wrapped__("cifar10", "", str(cache))
        root = cache / "hub" / "uoft-cs-cifar10"
        assert calls == [HUB_CIFAR10]
        assert_layout(train, test, root)
        # pixels unchanged (PNG is lossless)
        j = 3
        img = Image.open(root / f"train/{CLASSES[LABELS['train'][j]]}/{j:05d}.png")
        assert np.array_equal(np.asarray(img), np.asarray(pil(j)))
        assert not [p for p in (cache / "hub").iterdir() if p.name.startswith(".")]  # no temp or hf leftovers

        def offline(name, hf_cache_dir):
            raise AssertionError("second call must not load from the hub")

        monkeypatch.setattr(data, "load_hub_splits", offline)
        train2, test2 = load_splits.__wrapped__("cifar10", "", str(cache))
        assert train2.paths == train.paths and train2.fingerprint == train.fingerprint
        assert np.array_equal(train2.labels, train.labels) and test2.paths == test.paths

    def test_failed_load_leaves_no_partial_tree(self, tmp_path, monkeypatch) -> None:
        def broken(name, hf_cache_dir):
            splits = fake_splits()
            splits["test"] = FakeSplit([{"img": pil(0), "label": 0}, {"img": None, "label": 1}])
            return splits

        monkeypatch.setattr(data, "load_hub_splits", broken)
        with pytest.raises(AttributeError):
            load_splits.__wrapped__("cifar10", "", str(tmp_path / "c"))
        assert [p.name for p in (tmp_path / "c" / "hub").iterdir()] == []

    def test_a_data_dir_never_goes_to_the_hub(self, tmp_path, monkeypatch, make_image_tree) -> None:
        monkeypatch.setattr(data, "load_hub_splits", lambda *a: pytest.fail("hub loader called"))
        tree = make_image_tree(tmp_path / "c10", {"train": 2, "test": 1})
        train, test = load_splits.__wrapped__("cifar10", str(tree), str(tmp_path / "c"))
        assert len(train) == 4 and len(test) == 2


class TestHubErrors:
    def test_flwr_datasets_missing_is_one_line_naming_the_extra_and_offline_choices(self, tmp_path, monkeypatch) -> None:
        monkeypatch.setitem(sys.modules, "flwr_datasets", None)  # import fails as if not installed
        with pytest.raises(ValueError) as err:
            load_splits.__wrapped__("cifar10", "", str(tmp_path / "c"))
        msg = str(err.value)
        assert "\n" not in msg
        assert "fedsparse[hub]" in msg and "flwr-datasets" in msg
        assert "data-dir" in msg and ".tar.gz" in msg and "cifar10-sample" in msg

    def test_unreachable_hub_is_one_line_naming_the_offline_choices(self, tmp_path, monkeypatch) -> None:
        import socket

        def refuse(*args, **kwargs):
            raise OSError("[Errno -2] Name or service not known")

        for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv("FEDSPARSE_HUB_CIFAR10", raising=False)
        monkeypatch.setattr(socket, "create_connection", refuse)
        monkeypatch.setattr(data, "_federated_dataset_class", lambda name: pytest.fail)  # never constructed
        with pytest.raises(ValueError, match=r"cannot reach the hub .*data-dir.*cifar10-sample") as err:
            load_splits.__wrapped__("cifar10", "", str(tmp_path / "c"))
        assert "\n" not in str(err.value)

    def test_connection_error_from_datasets_is_one_line(self, tmp_path, monkeypatch) -> None:
        """What ``datasets`` raises offline (ConnectionError, after its retries) becomes one line."""

        class FakeFederatedDataset:
            def __init__(self, **kwargs) -> None:
                pass

            def load_split(self, split):
                raise ConnectionError("Couldn't reach 'uoft-cs/cifar10' on the Hub (LocalEntryNotFoundError)\nmore")

        monkeypatch.setattr(data, "_federated_dataset_class", lambda name: FakeFederatedDataset)
        monkeypatch.setattr(data, "_check_hub_reachable", lambda name: None)
        with pytest.raises(ValueError) as err:
            load_splits.__wrapped__("cifar10", "", str(tmp_path / "c"))
        msg = str(err.value)
        assert "\n" not in msg and "more" not in msg
        assert msg.startswith(f"cannot load {HUB_CIFAR10} from the hub (ConnectionError: Couldn't reach")
        assert "data-dir" in msg and "cifar10-sample" in msg
        assert [p.name for p in (tmp_path / "c" / "hub").iterdir()] == []

    def test_cli_prints_the_error_on_one_line(self, tmp_path, monkeypatch, capsys) -> None:
        monkeypatch.setitem(sys.modules, "flwr_datasets", None)
        rc = main(["probe", "--run-config", f"dataset=cifar10 cache-dir='{tmp_path / 'c'}'", "--steps", "1"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2
        assert len(err) == 1 and err[0].startswith("fedsparse: error: dataset cifar10 without data-dir")


def refuse_remote_connections(monkeypatch) -> list:
    """Make every connection to an address off this machine fail at once; returns the refused
    addresses. Local sockets (loopback, Unix) still work."""
    import ipaddress
    import socket

    refused = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def remote(sock, address) -> bool:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return False
        try:
            return not ipaddress.ip_address(address[0]).is_loopback
        except ValueError:  # a host name: only localhost is local
            return address[0] != "localhost"

    def connect(sock, address):
        if remote(sock, address):
            refused.append(address)
            raise ConnectionRefusedError(f"test: no network ({address})")
        return real_connect(sock, address)

    def connect_ex(sock, address):
        if remote(sock, address):
            refused.append(address)
            return 111  # ECONNREFUSED
        return real_connect_ex(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    return refused


def test_through_flwr_datasets_on_a_local_mirror(tmp_path, monkeypatch) -> None:
    """The real loader (FederatedDataset -> datasets.load_dataset) on parquet files laid out like
    the hub repository uoft-cs/cifar10 (``plain_text/{train,test}-00000-of-00001.parquet``),
    offline: flwr-datasets and datasets come with the ``test`` extra, nothing is downloaded."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # not ~/.cache/huggingface (read at import)
    import datasets
    import flwr_datasets  # noqa: F401 - the test extra installs it: a missing one is an error, not a skip

    refused = refuse_remote_connections(monkeypatch)

    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))})
    mirror = tmp_path / "cifar10-mirror"
    for split, split_rows in fake_splits().items():
        ds = datasets.Dataset.from_dict(
            {"img": [r["img"] for r in split_rows], "label": [r["label"] for r in split_rows]}, features=features
        )
        (mirror / "plain_text").mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(mirror / "plain_text" / f"{split}-00000-of-00001.parquet"))
    monkeypatch.setenv("FEDSPARSE_HUB_CIFAR10", str(mirror))
    cache = tmp_path / "cache"
    train, test = load_splits.__wrapped__("cifar10", "", str(cache))
    (root,) = [p for p in (cache / "hub").iterdir()]
    assert root.name.startswith("cifar10-mirror-")
    assert_layout(train, test, root)
    img = Image.open(root / f"test/{CLASSES[LABELS['test'][2]]}/00002.png")
    assert np.array_equal(np.asarray(img), np.asarray(pil(102)))

    mirror.rename(tmp_path / "gone")  # the second call reads the cache only
    train2, test2 = load_splits.__wrapped__("cifar10", "", str(cache))
    assert train2.paths == train.paths and test2.fingerprint == test.fingerprint
    assert refused == []  # nothing even tried the network
