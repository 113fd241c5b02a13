"""Fault tolerance: injected client failures (fedsparse/faults.py, clients/mods.py) and a
training run that must still converge with 30% of the clients failing, NaN never reaching
the model. Strategy-level runs use an in-process Grid; one slow test goes through Ray."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import clients.mods as mods
from clients.mods import fault_injection_mod
from fedsparse.faults import FAULT_MODES, HANG_MARGIN_SECONDS, draw_fault, hang_seconds, poison
from fedsparse.model.head import MLPHead, batch_order, evaluate, train_steps
from fedsparse.model.ist import all_finite
from fedsparse.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, NUM_EXAMPLES_KEY, TRAIN_LOSS_KEY
from strategies.fedavg import FedAvgBaseline
from strategies.ist import IST


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


class TestDraw:
    def test_draws_are_deterministic_and_near_the_rate(self):
        picks = [draw_fault(0, r, p, 0.3, "raise") for r in range(1, 51) for p in range(40)]
        assert picks == [draw_fault(0, r, p, 0.3, "raise") for r in range(1, 51) for p in range(40)]
        share = sum(x is not None for x in picks) / len(picks)
        assert 0.27 < share < 0.33, share
        assert {x for x in picks if x} == {"raise"}

    def test_draws_depend_on_seed_round_and_partition(self):
        base = [draw_fault(0, 1, p, 0.5, "nan") for p in range(64)]
        assert base != [draw_fault(1, 1, p, 0.5, "nan") for p in range(64)]
        assert base != [draw_fault(0, 2, p, 0.5, "nan") for p in range(64)]

    def test_rate_zero_never_fails_and_mix_uses_every_mode(self):
        assert all(draw_fault(0, r, p, 0.0, "hang") is None for r in range(5) for p in range(50))
        mixed = {draw_fault(0, r, p, 0.5, "mix") for r in range(10) for p in range(50)}
        assert mixed == {None, "raise", "nan", "hang"}

    def test_unknown_mode_raises(self):
        with pytest.raises(ValueError, match="fault-mode"):
            draw_fault(0, 1, 1, 0.5, "explode")

    def test_hang_is_bounded_past_the_deadline(self):
        assert hang_seconds(10.0) == 10.0 + HANG_MARGIN_SECONDS

    def test_poison_puts_nan_and_inf_in_every_tensor(self):
        state = MLPHead(4, (3,), 2).state_dict()
        bad = poison(state)
        assert all(torch.isnan(v).any() for v in bad.values())
        assert all(torch.isfinite(v).all() for v in state.values())  # the input is untouched


# --- the mod -------------------------------------------------------------------------------

def _ctx(partition_id: int, rate: float, mode: str, timeout: float = 0.05) -> Context:
    return Context(run_id=1, node_id=100 + partition_id,
                   node_config={"partition-id": partition_id, "num-partitions": 64}, state=RecordDict(),
                   run_config={"fault-rate": rate, "fault-mode": mode, "seed": 0, "round-timeout": timeout})


def _msg(state: dict, server_round: int = 1, message_type: str = MessageType.TRAIN) -> Message:
    content = RecordDict({ARRAYS_KEY: ArrayRecord(state), CONFIG_KEY: ConfigRecord({"server-round": server_round})})
    return Message(content=content, dst_node_id=100, message_type=message_type)


def _echo(msg: Message, context: Context) -> Message:
    state = msg.content[ARRAYS_KEY].to_torch_state_dict()
    content = RecordDict({ARRAYS_KEY: ArrayRecord(state), METRICS_KEY: MetricRecord({NUM_EXAMPLES_KEY: 1})})
    return Message(content=content, reply_to=msg)


def _failing_partition(mode: str, rate: float = 0.3, server_round: int = 1) -> int:
    return next(p for p in range(100) if draw_fault(0, server_round, p, rate, mode) is not None)


def _healthy_partition(mode: str, rate: float = 0.3, server_round: int = 1) -> int:
    return next(p for p in range(100) if draw_fault(0, server_round, p, rate, mode) is None)


class TestMod:
    state = MLPHead(4, (3,), 2).state_dict()

    def test_healthy_client_and_rate_zero_pass_through(self):
        for ctx in (_ctx(_healthy_partition("raise"), 0.3, "raise"), _ctx(_failing_partition("raise"), 0.0, "raise")):
            reply = fault_injection_mod(_msg(self.state), ctx, _echo)
            assert not reply.has_error() and all_finite(reply.content[ARRAYS_KEY].to_torch_state_dict())

    def test_raise_answers_the_error_a_raising_client_app_gets(self):
        reply = fault_injection_mod(_msg(self.state), _ctx(_failing_partition("raise"), 0.3, "raise"), _echo)
        assert reply.has_error() and reply.error.code == 2  # ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        assert "InjectedFault" in reply.error.reason and "round 1" in reply.error.reason

    def test_nan_trains_then_poisons(self):
        reply = fault_injection_mod(_msg(self.state), _ctx(_failing_partition("nan"), 0.3, "nan"), _echo)
        got = reply.content[ARRAYS_KEY].to_torch_state_dict()
        assert not reply.has_error() and all(torch.isnan(v).any() for v in got.values())
        assert reply.content[METRICS_KEY][NUM_EXAMPLES_KEY] == 1  # the rest of the reply is intact

    def test_hang_sleeps_past_the_round_timeout_then_errs(self, monkeypatch):
        slept = []
        monkeypatch.setattr(mods.time, "sleep", slept.append)
        reply = fault_injection_mod(_msg(self.state), _ctx(_failing_partition("hang"), 0.3, "hang", timeout=7.0), _echo)
        assert slept == [7.0 + HANG_MARGIN_SECONDS] and reply.has_error()

    def test_only_train_messages_are_touched(self):
        msg = _msg(self.state, message_type=MessageType.EVALUATE)
        reply = fault_injection_mod(msg, _ctx(_failing_partition("raise"), 0.3, "raise"), _echo)
        assert not reply.has_error()

    def test_the_client_app_carries_the_mod(self):
        from clients.client_app import app

        assert fault_injection_mod in app._mods


# --- training with faults, strategy level -------------------------------------------------

IN_DIM, CLASSES, HIDDEN = 16, 4, (32, 32)
N_CLIENTS, PER_CLIENT, TIMEOUT = 8, 64, 0.15


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(CLASSES, IN_DIM, generator=torch.Generator().manual_seed(123)) * 0.5
    y = torch.randint(0, CLASSES, (n,), generator=gen)
    return centers[y] + torch.randn(n, IN_DIM, generator=gen), y


class InProcessGrid:
    """Runs each pushed message through ``fault_injection_mod`` and a local training
    function at once; a "hang" (a sleep on a fake clock) longer than the round timeout
    means no reply, as a late client is for the server."""

    def __init__(self, mode: str, rate: float = 0.3) -> None:
        self.mode, self.rate = mode, rate
        self.data = {p: _blobs(PER_CLIENT, seed=p) for p in range(N_CLIENTS)}
        self.ready: list[Message] = []
        self.count = 0

    def get_node_ids(self):
        return [1000 + p for p in range(N_CLIENTS)]

    def _train(self, msg: Message, context: Context) -> Message:
        pid = context.node_config["partition-id"]
        x, y = self.data[pid]
        model = MLPHead.from_state_dict(msg.content[ARRAYS_KEY].to_torch_state_dict())
        server_round = msg.content[CONFIG_KEY]["server-round"]
        gen = torch.Generator().manual_seed(server_round * 100 + pid)
        loss = train_steps(model, x, y, batch_order(len(y), 5, 16, gen), lr=0.01)
        metrics = MetricRecord({NUM_EXAMPLES_KEY: len(y), TRAIN_LOSS_KEY: loss})
        return Message(RecordDict({ARRAYS_KEY: ArrayRecord(model.state_dict()), METRICS_KEY: metrics}), reply_to=msg)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            self.count += 1
            msg.metadata.__dict__["_message_id"] = f"msg-{self.count}"
            ids.append(msg.metadata.message_id)
            pid = msg.metadata.dst_node_id - 1000
            ctx = Context(run_id=1, node_id=msg.metadata.dst_node_id,
                          node_config={"partition-id": pid, "num-partitions": N_CLIENTS}, state=RecordDict(),
                          run_config={"fault-rate": self.rate, "fault-mode": self.mode, "seed": 0,
                                      "round-timeout": TIMEOUT})
            slept = []
            original_sleep = mods.time.sleep
            mods.time.sleep = slept.append  # fake clock for "hang"
            try:
                reply = fault_injection_mod(msg, ctx, self._train)
            except Exception as err:  # noqa: BLE001 - what Flower's runtime does with a raising client
                reply = Message(Error(code=2, reason=str(err)), reply_to=msg)
            finally:
                mods.time.sleep = original_sleep
            if sum(slept) <= TIMEOUT:
                self.ready.append(reply)
        return ids

    def pull_messages(self, message_ids):
        wanted = set(message_ids)
        out = [r for r in self.ready if r.metadata.reply_to_message_id in wanted]
        self.ready = [r for r in self.ready if r not in out]
        return out


def train_with_faults(strategy, mode: str, rounds: int = 8):
    test_x, test_y = _blobs(400, seed=999)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        head = MLPHead(IN_DIM, HIDDEN, CLASSES)
    accuracy: list[float] = []

    def evaluate_fn(server_round, arrays):
        state = arrays.to_torch_state_dict()
        assert all_finite(state), f"round {server_round}: a non-finite value reached the model"
        acc, loss = evaluate(MLPHead.from_state_dict(state), test_x, test_y)
        accuracy.append(acc)
        return MetricRecord({"accuracy": acc})

    grid = InProcessGrid(mode)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(head.state_dict()), num_rounds=rounds,
                            timeout=TIMEOUT, evaluate_fn=evaluate_fn)
    return accuracy, strategy.history, result


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread (and do not fight other processes for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("mode", FAULT_MODES)
@pytest.mark.parametrize("make", [
    lambda: IST(clients_per_round=4, seed=0),
    lambda: IST(clients_per_round=4, seed=0, subnets_per_round=2),
    lambda: FedAvgBaseline(clients_per_round=4, seed=0),
], ids=["ist", "ist-g2", "fedavg"])
def test_training_converges_with_30_percent_failing_clients(make, mode, one_thread):
    strategy = make()
    accuracy, history, result = train_with_faults(strategy, mode)
    sampled = sum(s.sent for s in history)
    failed = sum(s.failures for s in history)
    assert 0.15 * sampled <= failed <= 0.45 * sampled, (failed, sampled)  # about 30% failed ...
    kind = {"raise": "errors", "nan": "invalid", "hang": "lost"}
    if mode in kind:  # ... each the way its mode fails
        assert sum(getattr(s, kind[mode]) for s in history) == failed
    assert all(s.replies + s.failures == s.sent for s in history)
    assert all_finite(result.arrays.to_torch_state_dict())
    assert accuracy[0] < 0.4 and max(accuracy[-3:]) > accuracy[0] + 0.35, accuracy  # ... and it still learns


# --- end to end, through Ray ------------------------------------------------------------------

def _color_images(root, per_class: int = 100) -> None:
    """Four classes of noisy solid-colour 32x32 PNGs: learnable in a few rounds."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, color in {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200),
                        "gray": (128, 128, 128)}.items():
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(color, 90, size=(32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "RGB").save(folder / f"{i:03d}.png")


@pytest.mark.slow
def test_simulation_with_30_percent_nan_clients_converges(tmp_path):
    from fedsparse.config import resolve
    from strategies.simulation import simulate

    _color_images(tmp_path / "data")
    cfg = resolve(overrides={
        "dataset": "imagefolder", "data-dir": str(tmp_path / "data"), "cache-dir": str(tmp_path / "cache"),
        "out-dir": str(tmp_path / "out"), "num-clients": 8, "clients-per-round": 4, "num-rounds": 6,
        "hidden": "32,32", "local-steps": 20, "batch-size": 16, "lr": 0.003,
        "fault-rate": 0.3, "fault-mode": "nan",
    })
    t0 = time.perf_counter()
    metrics = simulate(cfg)
    wall = time.perf_counter() - t0
    rounds = metrics["rounds"]
    acc = [r["accuracy"] for r in rounds]
    print(f"fault e2e: {wall:.0f}s, accuracy {metrics['initial']['accuracy']:.3f} -> {acc}, "
          f"failures {[r['failures'] for r in rounds]}")
    expected = [sum(draw_fault(cfg.seed, r, p, 0.3, "nan") is not None for p in range(8)) for r in range(1, 7)]
    assert sum(r["failures"] for r in rounds) > 0 and any(expected)
    for r in rounds:
        assert r["failures"] == r["failed_invalid"] and r["clients"] + r["failures"] == r["sampled"] == 4
        assert math.isfinite(r["loss"]) and r["elapsed"] > 0
    model = torch.load(tmp_path / "out" / "model.pt")
    assert all_finite(model)
    assert max(acc[-3:]) > metrics["initial"]["accuracy"] + 0.3, acc
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["config"]["fault-rate"] == 0.3
