"""The round engine: one algorithm protocol, three drivers, checkpoints and resume, determinism."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

from fedsparse.algorithms import ALGORITHMS, Algorithm, ClientTask, make_algorithm, register
from fedsparse.algorithms.fedavg import weighted_mean
from fedsparse.config import RunConfig
from fedsparse.engine.checkpoint import BackgroundWriter, Checkpoint, check_resumable, config_differences
from fedsparse.engine.metrics import RunMetrics
from fedsparse.engine.plain import PlainTransport
from fedsparse.engine.rounds import RoundEngine, sample_clients

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cfg(tmp_path, shared_image_tree, shared_feature_cache):
    root = shared_image_tree({"train": 8, "test": 3}, classes=("a", "b", "c"))
    return RunConfig(dataset="imagefolder", data_dir=str(root), encoder="builtin-random", hidden="24,24",
                     num_clients=6, clients_per_round=3, num_rounds=4, local_steps=3, batch_size=4,
                     cache_dir=str(shared_feature_cache), out_dir=str(tmp_path / "run"))


def plain(cfg: RunConfig) -> RoundEngine:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        engine = RoundEngine(cfg, report=lambda s: None)
        engine.run(PlainTransport(cfg))
    return engine


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- a third algorithm, defined here in a few lines -----------------------------------------
@register
class HalfStep(Algorithm):
    """Full head to everyone; the head moves half way to the clients' mean."""

    name = "test-half-step"

    def plan(self, server_round, state, clients):
        return [ClientTask(c, dict(state), group=0) for c in clients]

    def aggregate(self, server_round, state, tasks, updates):
        if not updates:
            return dict(state)
        mean = weighted_mean([u.arrays for u in updates], [1] * len(updates))
        return {k: state[k] + 0.5 * (mean[k] - state[k]) for k in state}


class TestProtocol:
    def test_sampling_depends_on_seed_and_round_only(self):
        a = sample_clients(3, 7, [5, 1, 4, 2, 3], 3)
        assert a == sample_clients(3, 7, [1, 2, 3, 4, 5], 3)  # order of availability does not matter
        assert len(set(a)) == 3 and set(a) <= {1, 2, 3, 4, 5}
        assert len(sample_clients(3, 7, [1, 2], 3)) == 2  # fewer available: all of them
        draws = {tuple(sample_clients(3, r, range(20), 3)) for r in range(1, 30)}
        assert len(draws) > 20  # rounds differ

    def test_unknown_strategy_is_one_line_listing_choices(self, cfg):
        with pytest.raises(ValueError, match=r"^Unknown strategy 'nope'; valid choices: .*\bfedavg\b.*\bist\b"):
            make_algorithm(cfg.replace(strategy="nope"))

    def test_toy_algorithm_is_registered(self):
        assert ALGORITHMS["test-half-step"] is HalfStep


class TestCheckpoint:
    def test_every_round_leaves_checkpoint_model_and_metrics(self, cfg):
        engine = plain(cfg)
        out = Path(cfg.out_dir)
        ckpt = Checkpoint.load(out)
        assert ckpt.round == cfg.num_rounds
        assert same_state(ckpt.state, engine.state)
        assert same_state(torch.load(out / "model.pt"), engine.state)
        metrics = RunMetrics.load(out)
        assert [r.round for r in metrics.rounds] == [1, 2, 3, 4] and metrics.finished
        assert metrics.engine == "plain"

    @pytest.mark.parametrize("settings", [
        {"strategy": "ist"},
        {"strategy": "ist", "ist_variant": "skew", "ist_overlap": 2.0, "subnets_per_round": 2, "ist_scaling": "width"},
        {"strategy": "ist", "server_opt": "adam", "server_lr": 0.1},
        {"strategy": "fedavg"},
        {"strategy": "fedopt", "server_opt": "sgd", "server_lr": 1.0, "server_momentum": 0.9},
        {"strategy": "fed3r"},
        {"strategy": "fedncm"},
        {"strategy": "test-half-step"},
    ], ids=lambda d: "-".join(str(v) for v in d.values()))
    def test_no_algorithm_changes_a_head_in_place(self, cfg, settings):
        # the background write reads the round's head without copying it (RoundEngine._write):
        # every round must leave the heads of earlier rounds as they were
        seen: list[tuple[dict, dict]] = []

        class Recording(RoundEngine):
            def _write(self, checkpoint=True):
                seen.append((dict(self.state), {k: v.clone() for k, v in self.state.items()}))
                super()._write(checkpoint)

        engine = Recording(cfg.replace(save_seconds=0.0, **settings), report=lambda s: None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            engine.run(PlainTransport(engine.cfg))
        assert len(seen) == cfg.num_rounds + 2  # the initial head, every round, the run's end
        assert all(same_state(held, copy) for held, copy in seen)
        assert len({id(next(iter(held.values()))) for held, _ in seen[:-1]}) > 1  # heads did change
        assert same_state(Checkpoint.load(cfg.out_dir).state, engine.state)

    @pytest.mark.parametrize("save_seconds,written", [(0.0, [0, 1, 2, 3, 4]), (3600.0, [0, 1, 4])])
    def test_files_are_written_every_save_seconds_and_always_for_the_first_and_last_round(
            self, cfg, save_seconds, written):
        rounds: list[int] = []

        class Recording(RoundEngine):
            def _write(self, checkpoint=True):
                if checkpoint:
                    rounds.append(self.done)
                super()._write(checkpoint)

        engine = Recording(cfg.replace(save_seconds=save_seconds), report=lambda s: None)
        engine.run(PlainTransport(engine.cfg))
        assert rounds == written
        assert Checkpoint.load(cfg.out_dir).round == 4 and same_state(torch.load(Path(cfg.out_dir) / "model.pt"), engine.state)
        engine.done = 2  # between the first and the last round: the clock decides
        engine._saved_at = time.monotonic() - 3599.0
        assert engine.save_due() is (save_seconds == 0)
        engine._saved_at = time.monotonic() - 3600.0
        assert engine.save_due()

    def test_a_run_stopped_between_two_writes_writes_its_last_round(self, cfg):
        stop = threading.Event()

        def report(line: str) -> None:
            if line.startswith("round 3/"):
                stop.set()  # as Ctrl-C does

        engine = RoundEngine(cfg.replace(save_seconds=3600.0), report=report, stop=stop)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            metrics = engine.run(PlainTransport(engine.cfg))
        assert engine.done == 3 and not metrics.finished
        assert Checkpoint.load(cfg.out_dir).round == 3  # round 3 was not due; the stop wrote it
        assert same_state(torch.load(Path(cfg.out_dir) / "model.pt"), engine.state)
        assert [r.round for r in RunMetrics.load(cfg.out_dir).rounds] == [1, 2, 3]
        resumed = plain(cfg.replace(resume=True, save_seconds=0.0))  # save-seconds may change on resume
        assert same_state(resumed.state, plain(cfg.replace(out_dir=str(Path(cfg.out_dir) / "whole"))).state)

    def test_metrics_text_is_the_metrics_and_made_once_per_round(self, cfg):
        engine = plain(cfg)
        metrics = RunMetrics.load(cfg.out_dir)
        assert json.loads((Path(cfg.out_dir) / "metrics.json").read_text()) == engine.metrics.to_dict()
        assert json.loads(metrics.json_text()) == metrics.to_dict()
        assert json.loads(RunMetrics(**{**vars(metrics), "rounds": []}).json_text())["rounds"] == []
        first = metrics.rounds[0].__dict__["_json"]  # kept on the entry by the first json_text
        metrics.json_text()
        assert metrics.rounds[0].__dict__["_json"] is first
        ckpt = Checkpoint.load(cfg.out_dir)  # saved with the metrics' text, loaded as the dict
        assert isinstance(ckpt.metrics, dict) and ckpt.metrics["rounds"] == engine.metrics.to_dict()["rounds"]
        torch.save({**torch.load(Path(cfg.out_dir) / "checkpoint.pt"), "metrics": "{not json"}, Path(cfg.out_dir) / "checkpoint.pt")
        with pytest.raises(ValueError, match="its metrics are not JSON"):
            Checkpoint.load(cfg.out_dir)

    def test_config_differences_name_the_keys_and_ignore_operational_ones(self, cfg):
        saved = cfg.to_run_config()
        now = {**saved, "lr": 0.5, "seed": 3, "out-dir": "/elsewhere", "round-timeout": 1.0, "num-rounds": 9}
        diff = config_differences(saved, now)
        assert [d.split(" ")[0] for d in diff] == ["lr", "seed"]

    def test_resume_refuses_a_changed_config_in_one_line(self, cfg):
        plain(cfg.replace(num_rounds=2))
        ckpt = Checkpoint.load(cfg.out_dir)
        with pytest.raises(ValueError, match=r"^cannot resume: the config differs from the checkpoint's in lr \(0\.001 -> 0\.01\)$"):
            check_resumable(ckpt, cfg.replace(lr=0.01, resume=True).to_run_config())
        with pytest.raises(ValueError, match="num-rounds 1 is below the 2 rounds already done"):
            check_resumable(ckpt, cfg.replace(num_rounds=1).to_run_config())

    def test_resume_continues_bit_for_bit_and_may_extend_a_run(self, cfg):
        full = plain(cfg)
        other = cfg.replace(out_dir=str(Path(cfg.out_dir).parent / "split"))
        plain(other.replace(num_rounds=2))
        resumed = plain(other.replace(resume=True))  # num-rounds 2 -> 4
        assert same_state(full.state, resumed.state)
        m = RunMetrics.load(other.out_dir)
        assert [r.round for r in m.rounds] == [1, 2, 3, 4] and m.resumed_at == [2] and m.finished
        assert [r.accuracy for r in m.rounds] == [r.accuracy for r in RunMetrics.load(cfg.out_dir).rounds]


def test_background_writer_writes_the_newest_and_reraises_a_failed_write():
    writer, order, first = BackgroundWriter(), [], threading.Event()
    started = time.perf_counter()
    writer.submit(lambda: (first.set(), time.sleep(0.2), order.append(1)))
    assert first.wait(5)
    writer.submit(lambda: order.append(2))  # waits behind the first ...
    writer.submit(lambda: order.append(3))  # ... and is dropped for this newer one
    assert time.perf_counter() - started < 0.15  # submit never waits for a write
    writer.wait()
    assert order == [1, 3] and writer.skipped == 1
    writer.submit(lambda: order.append(4))  # after a pause, a new thread takes it
    writer.wait()
    assert order == [1, 3, 4] and writer.skipped == 1
    writer.submit(lambda: open("/nonexistent-dir/metrics.json", "w"))
    with pytest.raises(FileNotFoundError):
        writer.wait()
    writer.wait()  # the error is raised once
    writer.submit(lambda: open("/nonexistent-dir/metrics.json", "w"))
    time.sleep(0.1)
    with pytest.raises(FileNotFoundError):  # or at the next submit: the run stops at the next round
        writer.submit(lambda: order.append(5))
    writer.wait()
    assert order == [1, 3, 4]


# --- SIGKILL after round k, then resume -----------------------------------------------------
KILLER = textwrap.dedent("""
    import os, signal, sys, warnings
    warnings.simplefilter("ignore")
    from fedsparse.config import RunConfig
    from fedsparse.engine.rounds import RoundEngine
    cfg = RunConfig.from_run_config(__import__("json").loads(sys.argv[1]))
    kill_after, engine_name = int(sys.argv[2]), sys.argv[3]
    def report(line):
        if line.startswith(f"round {kill_after}/"):
            engine._writer.wait()   # round k's files are written in the background: let them land
            os.kill(os.getpid(), signal.SIGKILL)
    engine = RoundEngine(cfg, report=report)
    if engine_name == "plain":
        from fedsparse.engine.plain import PlainTransport
        engine.run(PlainTransport(cfg))
    else:
        from strategies.in_process import in_process_run
        in_process_run(cfg, engine)
""")


@pytest.mark.parametrize("engine_name", ["plain", "in-process"])
def test_sigkill_after_round_k_then_resume_equals_an_uninterrupted_run(cfg, engine_name):
    reference = plain(cfg)
    out = Path(cfg.out_dir).parent / f"killed-{engine_name}"
    killed = cfg.replace(out_dir=str(out), save_seconds=0.0)  # round k's files are written
    proc = subprocess.run([sys.executable, "-c", KILLER, json.dumps(killed.to_run_config()), "2", engine_name],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert Checkpoint.load(out).round == 2
    assert len(RunMetrics.load(out).rounds) == 2
    cli = subprocess.run([sys.executable, "-m", "fedsparse.commands.cli", "run", "--resume", str(out),
                          "--engine", engine_name], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert "resuming after round 2/4" in cli.stderr
    final = torch.load(out / "model.pt")
    assert same_state(final, reference.state)  # bit for bit
    m = RunMetrics.load(out)
    assert [r.round for r in m.rounds] == [1, 2, 3, 4] and m.resumed_at == [2]
    assert [r.accuracy for r in m.rounds] == [r.accuracy for r in RunMetrics.load(cfg.out_dir).rounds]

    if engine_name != "plain":
        return  # what follows does not depend on the engine
    again = subprocess.run([sys.executable, "-m", "fedsparse.commands.cli", "run", "--resume", str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "already finished its 4 rounds" in again.stdout
    changed = subprocess.run([sys.executable, "-m", "fedsparse.commands.cli", "run", "--resume", str(out),
                              "--run-config", "lr=0.01 num-rounds=5"], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
    assert changed.returncode == 2
    assert changed.stderr.strip() == "fedsparse: error: cannot resume: the config differs from the checkpoint's in lr (0.001 -> 0.01)"


# --- the same algorithm objects through all three drivers ------------------------------------
@pytest.mark.xdist_group("ray")  # starts Ray: one at a time (tests/conftest.py)
def test_toy_algorithm_runs_through_plain_in_process_and_simulation(cfg):
    from strategies.in_process import in_process_run
    from strategies.simulation import simulate

    toy = cfg.replace(strategy="test-half-step", num_rounds=2)
    a = plain(toy.replace(out_dir=str(Path(cfg.out_dir) / "plain")))
    b = RoundEngine(toy.replace(out_dir=str(Path(cfg.out_dir) / "in-process")), report=lambda s: None)
    in_process_run(b.cfg, b)
    sim = toy.replace(out_dir=str(Path(cfg.out_dir) / "simulation"))
    metrics = simulate(sim)
    assert metrics.engine == "simulation" and [r.round for r in metrics.rounds] == [1, 2]
    assert metrics.rounds[-1].clients == 3 and metrics.algorithm == "test-half-step"
    for state in (b.state, torch.load(Path(sim.out_dir) / "model.pt")):
        assert same_state(a.state, state)
    initial = a.initial_head_state()
    assert not same_state(initial, a.state)


@pytest.mark.xdist_group("ray")  # starts Ray: one at a time (tests/conftest.py)
@pytest.mark.slow
def test_simulation_is_deterministic_and_resumes_after_sigkill(cfg):
    """The CLI's simulated run, SIGKILLed after round 2 and resumed, trains the plain engine's
    model bit for bit with the same accuracies every round (Flower's node ids and the replies'
    order differ between the runs), every round once, the killed run losing at most the rounds
    whose files were still being written. Both processes send every Array both ways through
    shared-memory files (strategies.ray_arrays; counted by the resumed one): the same model.
    (tests/test_flower_internals.py: the simulation with that path off, the same model too.)"""
    from strategies import ray_arrays
    from strategies.simulation import APP_PREFIX

    # an idle machine runs a round of this config in ~0.04 s and writes its files every 0.3 s, so
    # metrics.json first shows 2 rounds near round 8: 60 rounds leave ~2 s to kill it mid-run (12
    # rounds once ran out, in CI). The killed run resumes from the last round written, whichever.
    # the MLP's IST (every round a slice both ways), whose arrays the counts below follow; the
    # closed-form start's resume is tested in tests/test_residual.py
    long = cfg.replace(num_rounds=60, save_seconds=0.3, ist_start="random")
    reference = plain(long.replace(out_dir=str(Path(cfg.out_dir) / "plain")))
    env = {**os.environ, ray_arrays.MIN_BYTES_VAR: "0"}  # every Array through a file, however small

    out = Path(cfg.out_dir) / "killed"
    args = [sys.executable, "-m", "fedsparse.commands.cli", "run", "--run-config",
            " ".join(f"{k}={json.dumps(v)}" for k, v in long.to_run_config().items() if k != "out-dir"),
            "--out", str(out)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                if len(json.loads((out / "metrics.json").read_text())["rounds"]) >= 2:
                    break
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                pass
            time.sleep(0.02)
        else:
            pytest.fail("the run did not finish 2 rounds in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = Checkpoint.load(out).round  # written before metrics.json: at least the rounds it showed
    assert 2 <= done < long.num_rounds
    assert list(ray_arrays.shm_root().glob(f"{ray_arrays.PREFIX}{proc.pid}-*"))  # a killed run leaves its directories
    assert list(Path(tempfile.gettempdir()).glob(f"{APP_PREFIX}{proc.pid}-*"))
    resumed = subprocess.run([sys.executable, "-m", "fedsparse.commands.cli", "run", "--resume", str(out)],
                             cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = RunMetrics.load(reference.cfg.out_dir), RunMetrics.load(out)
    assert [r.round for r in b.rounds] == list(range(1, long.num_rounds + 1)) and b.resumed_at == [done] and b.finished
    assert [r.accuracy for r in a.rounds] == [r.accuracy for r in b.rounds]
    assert same_state(reference.state, torch.load(out / "model.pt"))
    # the resumed process's Arrays, rounds done+1..60: down, 3 layers' weights and biases; up,
    # those and the class counts of label-aware training (the default IST variant): the
    # replies too, so the actors took the path as well
    tasks = (long.num_rounds - done) * long.clients_per_round
    assert b.extra["shared_memory_arrays"] == {"sent": tasks * 6, "received": tasks * 7, "inline": 0}
    # the killed run's shared-memory and app directories were removed by the run that resumed it
    assert not list(ray_arrays.shm_root().glob(f"{ray_arrays.PREFIX}{proc.pid}-*"))
    assert not list(Path(tempfile.gettempdir()).glob(f"{APP_PREFIX}{proc.pid}-*"))
