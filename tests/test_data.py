"""Tests for fedsparse/data.py: data-set listing, train/test splits and client partitions."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from fedsparse.data.datasets import default_cache_dir, describe, load_splits
from fedsparse.data.partition import client_split, partition_indices

LABELS = np.repeat(np.arange(10), 60)  # 600 examples, 10 balanced classes
PARTITIONERS = ["iid", "dirichlet", "shards"]


def class_entropy(labels: np.ndarray, part: np.ndarray, num_classes: int = 10) -> float:
    counts = np.bincount(labels[part], minlength=num_classes).astype(float)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


class TestPartitionIndices:
    @pytest.mark.parametrize("partitioner", PARTITIONERS)
    @pytest.mark.parametrize("k", [1, 3, 7])
    def test_partition_covers_every_index_exactly_once(self, partitioner: str, k: int) -> None:
        parts = partition_indices(LABELS, k, partitioner, seed=0, alpha=0.5)
        assert len(parts) == k
        joined = np.concatenate(parts)
        assert sorted(joined.tolist()) == list(range(len(LABELS)))
        for p in parts:
            assert p.dtype == np.int64 and len(p) > 0 and np.all(np.diff(p) > 0)

    @pytest.mark.parametrize("partitioner", PARTITIONERS)
    def test_partition_is_reproducible_for_a_seed(self, partitioner: str) -> None:
        a = partition_indices(LABELS, 5, partitioner, seed=3)
        b = partition_indices(LABELS, 5, partitioner, seed=3)
        c = partition_indices(LABELS, 5, partitioner, seed=4)
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
        assert any(not np.array_equal(x, y) for x, y in zip(a, c))

    def test_iid_parts_are_near_equal(self) -> None:
        sizes = [len(p) for p in partition_indices(LABELS, 7, "iid", seed=0)]
        assert max(sizes) - min(sizes) <= 1

    def test_dirichlet_with_small_alpha_is_label_skewed(self) -> None:
        iid = partition_indices(LABELS, 6, "iid", seed=0)
        skewed = partition_indices(LABELS, 6, "dirichlet", seed=0, alpha=0.1)
        h_iid = np.mean([class_entropy(LABELS, p) for p in iid])
        h_dir = np.mean([class_entropy(LABELS, p) for p in skewed])
        assert h_iid > 0.9 * np.log(10)  # near-uniform classes per client
        assert h_dir < 0.7 * h_iid

    def test_dirichlet_never_leaves_a_client_empty(self) -> None:
        """Alpha 0.1 for 400 clients of 600 examples leaves clients empty in every draw: the
        last draw's empty clients get one example each, and the parts still cover every example once."""
        parts = partition_indices(LABELS, 400, "dirichlet", seed=0, alpha=0.1)
        assert min(len(p) for p in parts) >= 1
        assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(LABELS)))
        assert sum(len(p) == 1 for p in parts) > 10  # the repaired ones (and others)
        again = partition_indices(LABELS, 400, "dirichlet", seed=0, alpha=0.1)
        assert all(np.array_equal(x, y) for x, y in zip(parts, again))

    def test_shards_give_each_client_few_classes(self) -> None:
        parts = partition_indices(LABELS, 5, "shards", seed=0)  # 10 shards of 60: one class each
        for p in parts:
            assert len(np.unique(LABELS[p])) == 2

    def test_unknown_partitioner_raises_listing_choices(self) -> None:
        with pytest.raises(ValueError, match="iid.*dirichlet.*shards"):
            partition_indices(LABELS, 3, "pathological")

    @pytest.mark.parametrize("k", [0, 601])
    def test_impossible_partition_count_raises(self, k: int) -> None:
        with pytest.raises(ValueError):
            partition_indices(LABELS, k, "iid")

    def test_client_split_is_the_clients_partition(self, tmp_path, make_image_tree) -> None:
        tree = make_image_tree(tmp_path / "imgs", {"train": 4, "test": 1})
        train, _ = load_splits("imagefolder", str(tree), str(tmp_path / "cache"))
        parts = partition_indices(train.labels, 2, "iid", seed=5)
        one = client_split(train, 1, 2, "iid", 5, 0.5)
        assert one.paths == tuple(train.paths[i] for i in parts[1])
        assert np.array_equal(one.labels, train.labels[parts[1]])
        with pytest.raises(ValueError, match="partition-id"):
            client_split(train, 2, 2, "iid", 5, 0.5)


class TestBundledSample:
    def test_sample_has_10000_train_and_2000_test_images(self, session_cache: Path) -> None:
        train, test = load_splits("cifar10-sample", "", str(session_cache))
        assert (len(train), len(test)) == (10000, 2000)
        assert len(train.classes) == 10 and train.classes == test.classes
        assert "airplane" in train.classes and "truck" in train.classes
        assert np.bincount(train.labels).tolist() == [1000] * 10
        assert np.bincount(test.labels).tolist() == [200] * 10

    def test_sample_labels_match_folder_names(self, session_cache: Path) -> None:
        train, test = load_splits("cifar10-sample", "", str(session_cache))
        for split, name in ((train, "train"), (test, "test")):
            for path, label in zip(split.paths, split.labels):
                top, cls, _ = Path(path).parts
                assert top == name and split.classes[label] == cls
        assert set(train.paths).isdisjoint(test.paths)
        assert all((train.root / p).is_file() for p in train.paths[:: 997])


class TestImageFolder:
    def test_train_test_subfolders_are_used(self, tmp_path, make_image_tree) -> None:
        tree = make_image_tree(tmp_path / "imgs", {"train": 3, "test": 2}, classes=("b_dog", "a_cat"))
        train, test = load_splits("imagefolder", str(tree), str(tmp_path / "c"))
        assert (len(train), len(test)) == (6, 4)
        assert train.classes == ("a_cat", "b_dog")  # sorted: label = index in sorted folders
        for path, label in zip(train.paths, train.labels):
            assert Path(path).parts[0] == "train" and Path(path).parts[1] == train.classes[label]

    def test_tree_without_splits_is_split_80_20_deterministically(self, tmp_path, make_image_tree) -> None:
        tree = make_image_tree(tmp_path / "flat", {"": 10}, classes=("x", "y"))
        train, test = load_splits("imagefolder", str(tree), str(tmp_path / "c"))
        assert (len(train), len(test)) == (16, 4)
        assert set(train.paths).isdisjoint(test.paths)
        assert sorted(train.paths + test.paths) == sorted(str(p.relative_to(tree)) for p in tree.rglob("*.png"))
        for path, label in zip(train.paths + test.paths, np.concatenate([train.labels, test.labels])):
            assert train.classes[label] == Path(path).parts[0]
        # the same tree elsewhere (a fresh listing, not the per-process cache) splits the same way
        copy = tmp_path / "copy"
        shutil.copytree(tree, copy)
        train2, test2 = load_splits.__wrapped__("imagefolder", str(copy), str(tmp_path / "c2"))
        assert (train2.paths, test2.paths) == (train.paths, test.paths)

    def test_archive_with_wrapper_folder_is_extracted_and_unwrapped(self, tmp_path, make_image_tree) -> None:
        src = make_image_tree(tmp_path / "src" / "RSSCN7", {"train": 2, "test": 1})
        archive = tmp_path / "rsscn7.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(src, arcname="RSSCN7")
        train, test = load_splits("imagefolder", str(archive), str(tmp_path / "cache"))
        assert (len(train), len(test)) == (4, 2)
        assert train.classes == ("cat", "dog")
        assert str(tmp_path / "cache") in str(train.root)

    def test_folder_of_split_archives_is_merged(self, tmp_path, make_image_tree) -> None:
        src = make_image_tree(tmp_path / "src", {"train": 2, "test": 1})
        folder = tmp_path / "archives"
        folder.mkdir()
        for split in ("train", "test"):
            with tarfile.open(folder / f"{split}.tar.gz", "w:gz") as tar:
                tar.add(src / split, arcname=split)
        train, test = load_splits("cifar10", str(folder), str(tmp_path / "cache"))
        assert (len(train), len(test)) == (4, 2)

    def test_missing_data_dir_raises_file_not_found(self, tmp_path) -> None:
        with pytest.raises(FileNotFoundError):
            load_splits("imagefolder", str(tmp_path / "absent"), str(tmp_path / "c"))

    def test_empty_data_dir_setting_raises(self, tmp_path) -> None:
        with pytest.raises(ValueError, match="data-dir"):
            load_splits("imagefolder", "", str(tmp_path / "c"))

    def test_empty_folder_raises(self, tmp_path) -> None:
        (tmp_path / "empty").mkdir()
        with pytest.raises(ValueError):
            load_splits("imagefolder", str(tmp_path / "empty"), str(tmp_path / "c"))

    def test_single_class_raises(self, tmp_path, make_image_tree) -> None:
        tree = make_image_tree(tmp_path / "one", {"train": 2, "test": 1}, classes=("only",))
        with pytest.raises(ValueError, match="class"):
            load_splits("imagefolder", str(tree), str(tmp_path / "c"))

    def test_single_class_without_splits_raises(self, tmp_path, make_image_tree) -> None:
        tree = make_image_tree(tmp_path / "one", {"": 3}, classes=("only",))
        with pytest.raises(ValueError):
            load_splits("imagefolder", str(tree), str(tmp_path / "c"))

    def test_train_and_test_classes_must_agree(self, tmp_path, make_image_tree) -> None:
        tree = make_image_tree(tmp_path / "t", {"train": 1}, classes=("a", "b"))
        make_image_tree(tree, {"test": 1}, classes=("a", "c"))
        with pytest.raises(ValueError, match="differ"):
            load_splits("imagefolder", str(tree), str(tmp_path / "c"))

    def test_cifar10_requires_train_and_test(self, tmp_path, make_image_tree) -> None:
        tree = make_image_tree(tmp_path / "flat", {"": 2})
        with pytest.raises(ValueError, match="train/ and test/"):
            load_splits("cifar10", str(tree), str(tmp_path / "c"))

    def test_unknown_dataset_raises_listing_choices(self, tmp_path) -> None:
        with pytest.raises(ValueError, match="cifar10-sample.*imagefolder"):
            load_splits("mnist", "", str(tmp_path))

    def test_non_image_files_are_ignored(self, tmp_path, make_image_tree) -> None:
        tree = make_image_tree(tmp_path / "t", {"train": 1, "test": 1})
        (tree / "train" / "cat" / "notes.txt").write_text("not an image")
        (tree / "train" / ".hidden").mkdir()
        train, _ = load_splits("imagefolder", str(tree), str(tmp_path / "c"))
        assert len(train) == 2 and train.classes == ("cat", "dog")

    def test_subset_and_describe(self, tmp_path, make_image_tree) -> None:
        tree = make_image_tree(tmp_path / "t", {"train": 3, "test": 1})
        train, _ = load_splits("imagefolder", str(tree), str(tmp_path / "c"))
        sub = train.subset([0, 5])
        assert sub.paths == (train.paths[0], train.paths[5]) and sub.labels.tolist() == [0, 1]
        assert sub.fingerprint == train.fingerprint
        assert describe(train) == '{"cat": 3, "dog": 3}'


class TestCacheDir:
    def test_explicit_dir_wins(self, tmp_path, monkeypatch) -> None:
        monkeypatch.setenv("FEDSPARSE_CACHE", str(tmp_path / "env"))
        assert default_cache_dir(str(tmp_path / "arg")) == tmp_path / "arg"

    def test_env_var_then_xdg(self, tmp_path, monkeypatch) -> None:
        monkeypatch.setenv("FEDSPARSE_CACHE", str(tmp_path / "env"))
        assert default_cache_dir() == tmp_path / "env"
        monkeypatch.delenv("FEDSPARSE_CACHE")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert default_cache_dir() == tmp_path / "xdg" / "fedsparse"


class TestAuthorSplits:
    def test_split_is_torch_random_split_under_seed_1234(self, tmp_path, make_image_tree) -> None:
        import torch
        from torch.utils.data import random_split

        from fedsparse.data.datasets import author_split

        root = make_image_tree(tmp_path / "rs", {"": 7}, classes=("a", "b", "c"))
        from fedsparse.data.datasets import _image_set

        every = _image_set(root, "", "aid")
        train, test = author_split(every, 18, 3)
        torch.manual_seed(1234)
        ref_train, ref_test = random_split(range(21), [18, 3])
        assert train.paths == tuple(every.paths[i] for i in sorted(ref_train.indices))
        assert test.paths == tuple(every.paths[i] for i in sorted(ref_test.indices))

    def test_subset_folder_keeps_the_proportions(self, tmp_path, make_image_tree) -> None:
        root = make_image_tree(tmp_path / "aid", {"": 10}, classes=("x", "y", "z"))
        train, test = load_splits("aid", str(root), str(tmp_path / "cache"))
        assert (len(train), len(test)) == (26, 4)  # round(30 * 8500 / 10000) = 26 (85%)
        assert not set(train.paths) & set(test.paths)
        train45, test45 = load_splits("resisc45", str(root), str(tmp_path / "cache"))
        assert (len(train45), len(test45)) == (26, 4)  # 27000 / 31500 = 85.7%


def test_full_partitioner_gives_every_client_the_whole_training_set(tmp_path, make_image_tree) -> None:
    root = make_image_tree(tmp_path / "full", {"train": 4, "test": 1})
    train, _ = load_splits("imagefolder", str(root), str(tmp_path / "cache"))
    for pid in range(3):
        assert client_split(train, pid, 3, "full", 0, 0.5).paths == train.paths


# --- a client's own data: class folders labelled by the run's class list ---------


class TestOwnData:
    RUN = ("bird", "cat", "dog")

    def test_labels_follow_the_run_class_list_not_the_folder(self, tmp_path, make_image_tree) -> None:
        from fedsparse.data.datasets import own_images

        root = make_image_tree(tmp_path / "mine", {"": 2}, classes=("dog", "bird"))  # a subset, any order
        mine = own_images(root, self.RUN)
        assert mine.classes == self.RUN
        by_class = {p.split("/")[0]: int(label) for p, label in zip(mine.paths, mine.labels)}
        assert by_class == {"bird": 0, "dog": 2}
        one_class = own_images(make_image_tree(tmp_path / "one", {"": 1}, classes=("cat",)), self.RUN)
        assert one_class.labels.tolist() == [1]  # a single class is enough for a client

    def test_unknown_class_is_a_one_line_error(self, tmp_path, make_image_tree) -> None:
        from fedsparse.data.datasets import own_images

        root = make_image_tree(tmp_path / "mine", {"": 1}, classes=("cat", "zebra"))
        with pytest.raises(ValueError, match="class folder 'zebra', which is not one of the run's 3 classes") as err:
            own_images(root, self.RUN)
        assert "\n" not in str(err.value)

    def test_fingerprint_follows_data_and_classes(self, tmp_path, make_image_tree, image_writer) -> None:
        from fedsparse.data.datasets import own_images

        a = make_image_tree(tmp_path / "a", {"": 1}, classes=("cat",))
        b = make_image_tree(tmp_path / "b", {"": 1}, classes=("cat",))  # same relative paths, another folder
        fa, fb = own_images(a, self.RUN).fingerprint, own_images(b, self.RUN).fingerprint
        assert fa != fb and fa == own_images(a, self.RUN).fingerprint
        assert own_images(a, ("cat", "dog")).fingerprint != fa  # other labels: another cache entry
        image_writer(a / "cat" / "extra.png", seed=99)
        assert own_images(a, self.RUN).fingerprint != fa

    @pytest.mark.parametrize("case, fragment", [
        ("missing", "data-dir not found"), ("empty", "no images found under"), ("loose", "lie in no class folder"),
    ])
    def test_bad_folders_are_one_line(self, tmp_path, image_writer, case, fragment) -> None:
        from fedsparse.data.datasets import own_images

        root = tmp_path / case
        if case != "missing":
            root.mkdir()
        if case == "loose":
            image_writer(root / "x.png")
        with pytest.raises((ValueError, FileNotFoundError), match=fragment) as err:
            own_images(root, self.RUN)
        assert "\n" not in str(err.value)

    @pytest.mark.parametrize("text, fragment", [
        ("cat", "only one class"), ("cat,,dog", "empty name"), ("cat,dog,cat", "'cat' twice"),
    ])
    def test_classes_key_is_checked(self, text, fragment) -> None:
        from fedsparse.config import RunConfig

        with pytest.raises(ValueError, match=fragment):
            RunConfig(classes=text)
        assert RunConfig(classes=" cat , dog ").classes == " cat , dog "

    def test_node_data_reads_the_node_config(self, tmp_path) -> None:
        from fedsparse.data.partition import NodeData, node_data

        (tmp_path / "d").mkdir()
        assert node_data({"partition-id": 1, "num-partitions": 4}) == NodeData(1, 4, "")
        assert node_data({"data-dir": str(tmp_path / "d")}) == NodeData(None, 1, str(tmp_path / "d"))
        assert node_data({"data-dir": str(tmp_path / "d"), "client-id": 7}).client_id == 7
        for config, fragment in [
            ({"data-dir": str(tmp_path / "nope")}, "data-dir .* is not found"),
            ({"data-dir": 3}, "data-dir must be a folder path"),
            ({"data-dir": str(tmp_path / "d"), "partition-id": 0}, "both data-dir and partition-id"),
            ({"data-dir": str(tmp_path / "d"), "client-id": -1}, "client-id must be an integer >= 0"),
            ({"data-dir": str(tmp_path / "d"), "client-id": "a"}, "client-id must be an integer >= 0"),
            ({"num-partitions": 2}, "lacks 'partition-id'"),
        ]:
            with pytest.raises(ValueError, match=fragment) as err:
                node_data(config)
            assert "\n" not in str(err.value)


class TestFoldersPartitioner:
    def make(self, root: Path, make_image_tree, clients=("alice", "bob", "carol")) -> Path:
        make_image_tree(root / "test", {"": 1}, classes=("bird", "cat", "dog"))
        for i, name in enumerate(clients):
            make_image_tree(root / name, {"": 1 + i}, classes=(("bird", "cat"), ("dog",), ("cat", "dog"))[i % 3])
        return root

    def cfg(self, root: Path, tmp_path: Path, **changes):
        from fedsparse.config import RunConfig

        values = dict(dataset="imagefolder", data_dir=str(root), partitioner="folders", num_clients=3,
                      clients_per_round=2, cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / "out"))
        return RunConfig(**{**values, **changes})

    def test_one_client_per_sub_folder_sorted_by_name(self, tmp_path, make_image_tree) -> None:
        from fedsparse.task import client_images, partition_sizes_of, run_classes, test_images

        cfg = self.cfg(self.make(tmp_path / "fed", make_image_tree), tmp_path)
        assert run_classes(cfg) == ("bird", "cat", "dog")  # from data-dir/test/
        assert len(test_images(cfg)) == 3
        got = [client_images(cfg, i, 3) for i in range(3)]
        assert [g.root.name for g in got] == ["alice", "bob", "carol"]
        assert [sorted(set(g.labels.tolist())) for g in got] == [[0, 1], [2], [1, 2]]
        assert partition_sizes_of(cfg) == [2, 2, 6]

    def test_classes_key_orders_the_labels(self, tmp_path, make_image_tree) -> None:
        from fedsparse.task import client_images, test_images

        cfg = self.cfg(self.make(tmp_path / "fed", make_image_tree), tmp_path, classes="dog,cat,bird,fish")
        assert client_images(cfg, 1, 3).labels.tolist() == [0, 0]  # bob's dog folder
        assert test_images(cfg).classes == ("dog", "cat", "bird", "fish")

    @pytest.mark.parametrize("case, fragment", [
        ("count", r"num-clients .* is 4, but data-dir holds 3 client folders \(alice, bob, carol\)"),
        ("no-test", "needs data-dir/test/"),
        ("no-data-dir", "partitioner folders needs data-dir"),
        ("unknown-class", "client folder 'bob' of data-dir .* has class folder 'zebra'"),
        ("test-class", "the server's test set has class folder 'dog', which is not one of the run's 2 classes"),
    ])
    def test_bad_layouts_are_one_line_errors(self, tmp_path, make_image_tree, case, fragment) -> None:
        from fedsparse.task import preflight

        root = self.make(tmp_path / "fed", make_image_tree)
        changes: dict = {}
        if case == "count":
            changes = {"num_clients": 4}
        elif case == "no-test":
            shutil.rmtree(root / "test")
        elif case == "no-data-dir":
            changes = {"data_dir": ""}
        elif case == "unknown-class":
            make_image_tree(root / "bob", {"": 1}, classes=("zebra",))
        elif case == "test-class":
            changes = {"classes": "bird,cat"}
        with pytest.raises((ValueError, FileNotFoundError), match=fragment) as err:
            preflight(self.cfg(root, tmp_path, **changes))
        assert "\n" not in str(err.value)

    def test_a_run_with_folder_clients(self, tmp_path, make_image_tree) -> None:
        """Two rounds of the plain driver: every client trains on its own folder, and the
        server evaluates on data-dir/test/."""
        from fedsparse.engine.plain import PlainTransport
        from fedsparse.engine.rounds import RoundEngine

        cfg = self.cfg(self.make(tmp_path / "fed", make_image_tree), tmp_path, hidden="16,16", num_rounds=2,
                       local_steps=2, batch_size=4)
        metrics = RoundEngine(cfg, report=lambda s: None).run(PlainTransport(cfg))
        assert [(r.clients, r.failures) for r in metrics.rounds] == [(2, 0), (2, 0)]
        assert metrics.num_classes == 3 and metrics.test_examples == 3
        sizes = {0: 2, 1: 2, 2: 6}  # alice, bob, carol
        for r in metrics.rounds:  # one record per sampled client, with what its reply reported
            assert [c.status for c in r.per_client] == ["ok", "ok"]
            for c in r.per_client:
                assert c.examples == sizes[c.client] and c.train_seconds >= 0
                assert c.bytes_down > 0 or r.round == 1  # round 1 of the default IST: statistics only, nothing down
