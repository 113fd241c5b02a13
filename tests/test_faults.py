"""Fault tolerance: injected client failures (fedsparse/faults.py, clients/mods.py) and a
training run that must still converge with 30% of the clients failing, NaN never reaching
the model. Runs go through the round engine, the Strategy adapter and the real ClientApp in
process; one slow test goes through Ray."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict

import clients.mods as mods
from clients.mods import fault_injection_mod
from fedsparse.config import RunConfig
from fedsparse.engine.rounds import RoundEngine, sample_clients
from fedsparse.faults import FAULT_MODES, HANG_MARGIN_SECONDS, draw_fault, hang_seconds, poison
from fedsparse.model.head import MLPHead
from fedsparse.model.ist import all_finite
from fedsparse.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, NUM_EXAMPLES_KEY
from strategies.adapter import AlgorithmStrategy
from strategies.flower_internals import set_task_identity
from strategies.in_process import LocalGrid


@pytest.fixture(autouse=True)
def task_identity():
    set_task_identity()


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
        for message_type in (MessageType.EVALUATE, MessageType.QUERY):  # the identity query included
            msg = _msg(self.state, message_type=message_type)
            reply = fault_injection_mod(msg, _ctx(_failing_partition("raise"), 0.3, "raise"), _echo)
            assert not reply.has_error(), message_type

    def test_the_client_app_carries_the_mod(self):
        from clients.client_app import app

        assert fault_injection_mod in app._mods


# --- training with faults, in process ------------------------------------------------------
# The round engine + Strategy adapter + the real ClientApp (whose fault_injection_mod fails
# on purpose), on learnable images; a "hang" sleeps on a fake clock, and a client that
# sleeps past the round timeout has no reply, as a late client is for the server.

N_CLIENTS, TIMEOUT = 8, 0.15


def _color_images(root, per_class: int = 100, colors: dict | None = None) -> None:
    """Classes of noisy solid-colour 32x32 PNGs: learnable in a few rounds."""
    import numpy as np
    from PIL import Image

    colors = colors or {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200), "gray": (128, 128, 128)}
    rng = np.random.default_rng(0)
    for name, color in colors.items():
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(color, 90, size=(32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "RGB").save(folder / f"{i:03d}.png")


@pytest.fixture(scope="module")
def colors_cfg(tmp_path_factory) -> RunConfig:
    """Five colour classes (chance 0.2), 160 training images for 8 clients, 40 test images;
    one feature cache for every run of the module."""
    root = tmp_path_factory.mktemp("fault-data")
    _color_images(root, per_class=40, colors={"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200),
                                              "gray": (128, 128, 128), "yellow": (200, 200, 40)})
    return RunConfig(dataset="imagefolder", data_dir=str(root), encoder="builtin-random", hidden="32,32",
                     num_clients=N_CLIENTS, clients_per_round=4, num_rounds=8, local_steps=5, batch_size=16, lr=0.01,
                     round_timeout=TIMEOUT, fault_rate=0.3, seed=0, cache_dir=str(tmp_path_factory.mktemp("fault-cache")))


class FaultyGrid(LocalGrid):
    """``LocalGrid`` (the real ClientApp, mods included) on a fake clock: a reply that took
    longer than the round timeout never arrives; a raising ClientApp answers the error
    reply Flower's runtime would send."""

    def send_and_receive(self, messages, *, timeout=None):
        self.sent, self.replies = list(messages), []
        for msg in self.sent:
            slept = []
            original_sleep = mods.time.sleep
            mods.time.sleep = slept.append  # fake clock for "hang"
            try:
                reply = self.client_app(msg, self.context(msg.metadata.dst_node_id))
            except Exception as err:  # noqa: BLE001 - what Flower's runtime does with a raising client
                reply = Message(Error(code=2, reason=str(err)), reply_to=msg)
            finally:
                mods.time.sleep = original_sleep
            if sum(slept) <= self.cfg.round_timeout:
                self.replies.append(reply)
        return self.replies


def train_with_faults(cfg: RunConfig):
    """Run ``cfg`` in process; returns (accuracy per round, round 0 first; the run's metrics;
    the engine). Every round's head is checked for NaN/Inf as soon as the round ends."""
    engine = None

    def check_round(line: str) -> None:
        if engine is not None and engine.metrics is not None and engine.metrics.rounds:
            assert all_finite(engine.state), f"round {engine.done}: a non-finite value reached the model"

    engine = RoundEngine(cfg, report=check_round)
    metrics = engine.run(AlgorithmStrategy(engine, FaultyGrid(cfg), "in-process", clients_are_partitions=True))
    accuracy = [metrics.initial["accuracy"]] + [r.accuracy for r in metrics.rounds]
    return accuracy, metrics, engine


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread (and do not fight other processes for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.filterwarnings("ignore:encoder 'builtin-random' has random weights:UserWarning")
@pytest.mark.parametrize("mode", FAULT_MODES)
@pytest.mark.parametrize("strategy, subnets", [("ist", 0), ("ist", 2), ("fedavg", 0)], ids=["ist", "ist-g2", "fedavg"])
def test_training_converges_with_30_percent_failing_clients(colors_cfg, tmp_path, strategy, subnets, mode, one_thread):
    cfg = colors_cfg.replace(strategy=strategy, subnets_per_round=subnets, fault_mode=mode, out_dir=str(tmp_path / "run"))
    accuracy, metrics, engine = train_with_faults(cfg)
    rounds = metrics.rounds
    assert len(rounds) == cfg.num_rounds and metrics.finished
    sampled = sum(r.sampled for r in rounds)
    failed = sum(r.failures for r in rounds)
    assert 0.15 * sampled <= failed <= 0.45 * sampled, (failed, sampled)  # about 30% failed ...
    kind = {"raise": "failed_error", "nan": "failed_invalid", "hang": "failed_lost"}
    if mode in kind:  # ... each the way its mode fails
        assert sum(getattr(r, kind[mode]) for r in rounds) == failed
    # ... exactly the clients the seeded draw picked: faults follow the partition, not the node
    for r in rounds:
        picked = sample_clients(cfg.seed, r.round, range(cfg.num_clients), cfg.clients_per_round)
        assert r.failures == sum(draw_fault(cfg.seed, r.round, c, cfg.fault_rate, mode) is not None for c in picked)
    assert all(r.clients + r.failures == r.sampled for r in rounds)
    assert all_finite(engine.state)
    assert all_finite(torch.load(tmp_path / "run" / "model.pt", weights_only=True))
    assert accuracy[0] < 0.4 and max(accuracy[-3:]) > accuracy[0] + 0.35, accuracy  # ... and it still learns


# --- end to end, through Ray ------------------------------------------------------------------

@pytest.mark.xdist_group("ray")  # starts Ray: one at a time (tests/conftest.py)
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
    rounds = metrics.rounds
    acc = [r.accuracy for r in rounds]
    print(f"fault e2e: {wall:.0f}s, accuracy {metrics.initial['accuracy']:.3f} -> {acc}, "
          f"failures {[r.failures for r in rounds]}")
    expected = [sum(draw_fault(cfg.seed, r, p, 0.3, "nan") is not None for p in range(8)) for r in range(1, 7)]
    assert sum(r.failures for r in rounds) > 0 and any(expected)
    for r in rounds:
        assert r.failures == r.failed_invalid and r.clients + r.failures == r.sampled == 4
        assert math.isfinite(r.loss) and r.elapsed > 0
        picked = sample_clients(cfg.seed, r.round, range(8), 4)  # nodes are paired with clients by partition id
        assert r.failures == sum(draw_fault(cfg.seed, r.round, c, 0.3, "nan") is not None for c in picked)
    model = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    assert all_finite(model)
    assert max(acc[-3:]) > metrics.initial["accuracy"] + 0.3, acc
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["config"]["fault-rate"] == 0.3
