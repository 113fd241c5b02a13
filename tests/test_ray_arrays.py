"""strategies.ray_arrays: Flower Arrays through shared-memory files between the Simulation
Engine's processes (the whole path through Ray is in tests/test_engine.py's determinism test)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import torch
from flwr.app import Array

from strategies import ray_arrays


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    path = tmp_path / "arrays"
    path.mkdir()
    monkeypatch.setattr(ray_arrays, "_dir", str(path))
    monkeypatch.setattr(ray_arrays, "_node", "node-a")  # this process's Ray node
    monkeypatch.setattr(ray_arrays, "_peer", "node-a")  # and its receiver's, unless sending_to says otherwise
    monkeypatch.setattr(ray_arrays, "COUNTS", {"sent": 0, "received": 0, "inline": 0})
    monkeypatch.setattr(ray_arrays, "CROSS_NODE", {"sent": 0, "received": 0, "put": 0, "by_ref": 0})
    monkeypatch.setattr(ray_arrays, "_shared", {})
    return path


def test_a_big_array_goes_through_a_file_read_once_into_the_same_array(run_dir):
    big = Array(torch.randn(300, 100))  # 120 kB: over MIN_BYTES
    fields = ray_arrays._pack(big)
    files = list(run_dir.iterdir())
    assert len(files) == 1 and files[0].stat().st_size == len(big.data)
    assert len(pickle.dumps(fields)) < 1000  # only the name travels
    back = ray_arrays._unpack(pickle.loads(pickle.dumps(fields)))
    assert (back.dtype, back.shape, back.stype, back.data) == (big.dtype, big.shape, big.stype, big.data)
    assert back.object_id == big.object_id
    assert not list(run_dir.iterdir())  # the reader deletes it
    assert ray_arrays.COUNTS == {"sent": 1, "received": 1, "inline": 0}
    with pytest.raises(RuntimeError, match="is gone"):  # a second read is an error, not a silent zero array
        ray_arrays._unpack(fields)


def test_small_arrays_and_an_uninstalled_process_keep_the_pickle(run_dir, monkeypatch):
    small = Array(torch.randn(10))
    assert ray_arrays._pack(small)[3] == small.data and not list(run_dir.iterdir())
    monkeypatch.setenv(ray_arrays.MIN_BYTES_VAR, "0")  # every Array through a file
    assert ray_arrays._pack(small)[3] is None and len(list(run_dir.iterdir())) == 1
    monkeypatch.setattr(ray_arrays, "_dir", None)
    big = Array(torch.randn(300, 100))
    assert ray_arrays._pack(big)[3] == big.data


def test_a_truncated_file_is_an_error(run_dir):
    fields = ray_arrays._pack(Array(torch.randn(300, 100)))
    with open(fields[4], "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(RuntimeError, match="holds 100 bytes"):
        ray_arrays._unpack(fields)


def test_stale_directories_of_dead_runs_are_swept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = tmp_path / f"{ray_arrays.PREFIX}{int(dead.stdout)}-abcd1234"
    mine = tmp_path / f"{ray_arrays.PREFIX}{os.getpid()}-abcd1234"
    parent = tmp_path / f"{ray_arrays.PREFIX}{os.getppid()}-abcd1234"
    other = tmp_path / "fedsparse-arrays-notapid"
    for path in (gone, mine, parent, other):
        path.mkdir()
        (path / "x").write_bytes(b"1")
    assert ray_arrays.sweep_stale(tmp_path) == [gone]
    assert not gone.exists() and mine.exists() and parent.exists() and other.exists()


def test_run_dirs_are_private_and_named_by_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(ray_arrays, "shm_root", lambda: tmp_path)
    path = ray_arrays.make_run_dir()
    assert path.parent == tmp_path and path.name.startswith(f"{ray_arrays.PREFIX}{os.getpid()}-")
    assert path.stat().st_mode & 0o777 == 0o700


def test_the_path_can_be_turned_off(monkeypatch):
    assert ray_arrays.enabled()
    monkeypatch.setenv("FEDSPARSE_RAY_ARRAYS", "off")
    assert not ray_arrays.enabled()


def test_a_full_shared_memory_falls_back_to_rays_path(run_dir, monkeypatch):
    import errno

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ray_arrays.os, "write", full)
    big = Array(torch.randn(300, 100))
    fields = ray_arrays._pack(big)
    assert fields[3] == big.data and fields[4] is None  # in the pickle, as Ray would send it
    assert not list(run_dir.iterdir())  # no partial file left
    assert ray_arrays.COUNTS["inline"] == 1 and ray_arrays.COUNTS["sent"] == 0
    assert ray_arrays._unpack(fields).data == big.data


def test_an_array_for_another_node_goes_through_ray_and_is_counted(run_dir, monkeypatch):
    big = Array(torch.randn(300, 100))
    with ray_arrays.sending_to("node-b"):  # a client actor on another machine
        fields = ray_arrays._pack(big)
    assert fields[3] == big.data and fields[4] is None and not list(run_dir.iterdir())
    assert ray_arrays.CROSS_NODE == {"sent": 1, "received": 0, "put": 0, "by_ref": 0} and ray_arrays.COUNTS["sent"] == 0
    with ray_arrays.sending_to("node-a"):  # one on this node: the file
        assert ray_arrays._pack(big)[4] is not None
    monkeypatch.setattr(ray_arrays, "_peer", None)  # nobody named the receiver's node: Ray's path
    assert ray_arrays._pack(big)[4] is None and ray_arrays.CROSS_NODE["sent"] == 2
    # on node b, the Array that came through Ray is counted as received from another node
    monkeypatch.setattr(ray_arrays, "_node", "node-b")
    assert ray_arrays._unpack(fields).data == big.data
    assert ray_arrays.CROSS_NODE["received"] == 1


def test_a_groups_array_for_other_nodes_is_put_once_and_sent_by_reference(run_dir, monkeypatch):
    """``share``: the slice a group's members get is put in the object store once; every
    message for another node then carries the reference, which the receiver fetches."""
    store = {}

    def put(data):
        store[len(store)] = data
        return len(store) - 1

    monkeypatch.setattr(ray_arrays, "_fetch", lambda ref: store[ref])
    slice_, small = Array(torch.randn(300, 100)), Array(torch.randn(3))
    for _ in range(5):  # five members of a group, all on node b
        ray_arrays.share([slice_, small], put=put)
    assert len(store) == 1 and ray_arrays.CROSS_NODE["put"] == 1  # the small one stays in the pickle
    with ray_arrays.sending_to("node-b"):
        sent = [ray_arrays._pack(slice_) for _ in range(5)]
    assert all(f[3] is None and f[4] is None and len(pickle.dumps(f)) < 1000 for f in sent)
    assert ray_arrays.CROSS_NODE["sent"] == 5 and ray_arrays.CROSS_NODE["by_ref"] == 5
    monkeypatch.setattr(ray_arrays, "_node", "node-b")
    back = ray_arrays._unpack(sent[0])
    assert (back.dtype, back.shape, back.data) == (slice_.dtype, slice_.shape, slice_.data)
    assert ray_arrays.CROSS_NODE["received"] == 1
    other = Array(torch.randn(300, 100))  # not shared: in the pickle, as before
    with ray_arrays.sending_to("node-c"):
        assert ray_arrays._pack(other)[3] == other.data
    store[0] = b"short"  # a reference whose object is not what was sent: a one-line error
    monkeypatch.setattr(ray_arrays, "_node", "node-a")
    with pytest.raises(RuntimeError, match=f"holds 5 bytes, expected {len(slice_.data)}"):
        ray_arrays._unpack(sent[1])
    monkeypatch.setattr(ray_arrays, "SHARED_KEEP", 2)
    for _ in range(3):
        ray_arrays.share([Array(torch.randn(300, 100))], put=put)
    assert len(ray_arrays._shared) == 2  # only the last few rounds' Arrays are kept


def test_a_file_written_on_another_node_is_a_one_line_error(run_dir, monkeypatch):
    fields = ray_arrays._pack(Array(torch.randn(300, 100)))
    monkeypatch.setattr(ray_arrays, "_node", "node-b")
    with pytest.raises(RuntimeError, match="written on Ray node node-a and cannot be read on node node-b"):
        ray_arrays._unpack(fields)


def test_a_receiver_installs_the_path_with_the_senders_node_as_its_peer(run_dir, monkeypatch):
    """An actor's first task registers the serializer there; its replies go back by file only
    when the driver that sent the task is on the actor's node."""
    fields = ray_arrays._pack(Array(torch.randn(300, 100)))
    installed = []
    monkeypatch.setattr(ray_arrays, "_dir", None)
    monkeypatch.setattr(ray_arrays, "install", lambda directory, peer=None: installed.append((directory, peer)))
    ray_arrays._unpack(fields)
    assert installed == [(str(run_dir), "node-a")]
