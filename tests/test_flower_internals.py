"""The private Flower APIs fedsparse relies on (``strategies/flower_internals.py``): that they
are all there, the task identity that lets this process build Messages, and the one-pass
message dispatch that replaces Flower's per-node polling in simulation."""

from __future__ import annotations

import threading
import time
from queue import Queue
from types import SimpleNamespace

import pytest

from strategies.flower_internals import check_internals, fast_add_messages_to_queue, patched_vce, set_task_identity


def test_every_flower_internal_fedsparse_uses_is_there():
    problems = check_internals()
    assert problems == [], "Flower changed internals fedsparse relies on:\n" + "\n".join(problems)


def test_check_internals_names_what_is_gone(monkeypatch):
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    from flwr.supercore import task_identity

    assert check_internals() == []  # imports every module it checks, before two names go
    monkeypatch.delattr(task_identity, "TaskIdentity")
    monkeypatch.delattr(InMemoryLinkState, "_check_stored_messages")
    problems = check_internals()
    assert len(problems) == 2, problems
    assert "flwr.supercore.task_identity.TaskIdentity is gone" in problems[0]
    assert "InMemoryLinkState._check_stored_messages is gone" in problems[1]


def test_task_identity_lets_this_process_build_messages(monkeypatch):
    from flwr.app import Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):  # as in a fresh process (restored afterwards)
        monkeypatch.setattr(TaskIdentity, attr, None)
    with pytest.raises(RuntimeError, match="TaskIdentity"):
        Message(RecordDict(), dst_node_id=5, message_type=MessageType.QUERY)
    set_task_identity()
    msg = Message(RecordDict(), dst_node_id=5, message_type=MessageType.QUERY)
    assert msg.metadata.dst_node_id == 5
    set_task_identity(run_id=99)  # an identity already set (a real run's) is kept
    assert TaskIdentity.run_id == 1


class FakeState:
    """The parts of Flower's InMemoryLinkState the dispatch touches."""

    def __init__(self, messages: dict[str, int], expired: set[str] = frozenset()):
        self.lock = threading.RLock()
        self.message_ins_store = {
            mid: SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node, delivered_at="")) for mid, node in messages.items()
        }
        self.expired = set(expired)
        self.checked: list[set[str]] = []

    def _check_stored_messages(self, ids: set[str]) -> None:
        self.checked.append(set(ids))
        for mid in ids & self.expired:
            del self.message_ins_store[mid]


def run_once(state: FakeState, nodes: set[int], expect: int) -> list:
    queue: Queue = Queue()
    stop = threading.Event()
    t = threading.Thread(target=fast_add_messages_to_queue, args=(state, queue, dict.fromkeys(nodes), stop))
    t.start()
    deadline = time.monotonic() + 10
    while queue.qsize() < expect and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.35)  # three more passes: nothing may be queued twice
    stop.set()
    t.join()
    return [queue.get() for _ in range(queue.qsize())]


def test_each_message_for_a_simulated_node_is_queued_once_and_marked_delivered():
    state = FakeState({"a": 1, "b": 2, "c": 3, "x": 99})
    out = run_once(state, {1, 2, 3}, expect=3)
    assert sorted(m.metadata.dst_node_id for m in out) == [1, 2, 3]
    assert all(m.metadata.delivered_at for m in out)
    assert state.message_ins_store["x"].metadata.delivered_at == ""  # not a simulated node: left alone
    assert state.checked == [{"a", "b", "c"}]  # validated once, in one call, then nothing pending


def test_messages_flowers_check_rejects_are_not_delivered():
    state = FakeState({"a": 1, "b": 2}, expired={"b"})
    out = run_once(state, {1, 2}, expect=1)
    assert [m.metadata.dst_node_id for m in out] == [1]
    assert "b" not in state.message_ins_store


def test_a_stored_message_wakes_the_dispatch_at_once(monkeypatch):
    """With a poll of 60 s, only the wake-up of a store can deliver a message within seconds."""
    import strategies.flower_internals as fi

    monkeypatch.setattr(fi, "DISPATCH_SECONDS", 60.0)
    state = FakeState({})
    store = fi._signalling(lambda m: state.message_ins_store.__setitem__("late", m), fi.MESSAGE_STORED)
    queue, stop = Queue(), threading.Event()
    t = threading.Thread(target=fast_add_messages_to_queue, args=(state, queue, {1: 0}, stop))
    t.start()
    try:
        time.sleep(0.2)  # the first pass found nothing; the loop now waits
        t0 = time.monotonic()
        store(SimpleNamespace(metadata=SimpleNamespace(dst_node_id=1, delivered_at="")))
        msg = queue.get(timeout=10)
        assert msg.metadata.dst_node_id == 1 and time.monotonic() - t0 < 10
    finally:
        stop.set()
        fi.MESSAGE_STORED.set()
        t.join()


def test_patch_installs_and_restores_flowers_function(monkeypatch):
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.add_messages_to_queue
    with patched_vce() as installed:
        assert installed and vce_api.add_messages_to_queue is not original
    assert vce_api.add_messages_to_queue is original
    monkeypatch.setenv("FEDSPARSE_FLOWER_POLLING", "flower")
    with patched_vce() as installed:
        assert not installed and vce_api.add_messages_to_queue is original


@pytest.mark.slow
@pytest.mark.xdist_group("ray")  # starts Ray: one at a time (tests/conftest.py)
def test_a_simulation_without_the_patches_trains_the_plain_engines_model(tmp_path, make_image_tree, monkeypatch):
    """With every speed-up that leans on Flower's or Ray's internals off (Flower's own
    per-node message polling instead of ``patched_vce``, Ray's own pickling of Arrays instead
    of ``strategies.ray_arrays``), as after a Flower upgrade that a patch no longer fits, a
    simulated run still finishes and trains the plain engine's model bit for bit: an upgrade
    costs speed, not correctness."""
    import warnings

    import torch

    from fedsparse.config import RunConfig
    from fedsparse.engine.plain import PlainTransport
    from fedsparse.engine.rounds import RoundEngine
    from strategies.simulation import simulate

    monkeypatch.setenv("FEDSPARSE_FLOWER_POLLING", "flower")
    monkeypatch.setenv("FEDSPARSE_RAY_ARRAYS", "off")
    root = make_image_tree(tmp_path / "data", {"train": 8, "test": 3}, classes=("a", "b", "c"))
    cfg = RunConfig(dataset="imagefolder", data_dir=str(root), encoder="builtin-random", hidden="24,24",
                    num_clients=6, clients_per_round=3, num_rounds=3, local_steps=3, batch_size=4,
                    cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / "plain"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        plain = RoundEngine(cfg, report=lambda s: None)
        plain.run(PlainTransport(cfg))
    sim = cfg.replace(out_dir=str(tmp_path / "simulation"))
    metrics = simulate(sim)
    assert metrics.extra["fast_message_dispatch"] is False and metrics.extra["shared_memory_arrays"] is False
    assert metrics.finished and [r.clients for r in metrics.rounds] == [3, 3, 3]
    model = torch.load(tmp_path / "simulation" / "model.pt")
    assert model.keys() == plain.state.keys() and all(torch.equal(model[k], plain.state[k]) for k in model)
    assert not all(torch.equal(model[k], v) for k, v in plain.initial_head_state().items())  # it trained
