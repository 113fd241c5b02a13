"""``fedsparse sweep``: one run per (mode, ratio, strategy), the paper's table as files."""

from __future__ import annotations

import csv
import warnings

import pytest

from fedsparse.config import RunConfig
from fedsparse.commands.sweep import COLUMNS, sweep


@pytest.fixture
def cfg(tmp_path, make_image_tree):
    root = make_image_tree(tmp_path / "data", {"train": 12, "test": 4}, classes=("a", "b", "c"))
    return RunConfig(dataset="imagefolder", data_dir=str(root), encoder="builtin-random", hidden="32,32",
                     num_clients=4, clients_per_round=2, num_rounds=3, local_steps=4, batch_size=8,
                     cache_dir=str(tmp_path / "cache"))


def quiet_sweep(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return sweep(*args, report=lambda s: None, **kwargs)


def test_centralized_sweep_writes_the_table(cfg, tmp_path):
    out = tmp_path / "sweep"
    rows = quiet_sweep(cfg, out, [0.0, 0.5, 0.9], ["centralized"], ["per-image"])
    assert [r["mask_ratio"] for r in rows] == [0.0, 0.5, 0.9]
    with open(out / "sweep.csv") as fh:
        table = list(csv.DictReader(fh))
    assert tuple(table[0]) == COLUMNS and len(table) == 3
    stored = [r["masked_images_bytes"] for r in rows]
    assert stored[0] == 36 * 32 * 32 * 3 and stored == sorted(stored, reverse=True)
    assert {r["cls_bytes"] for r in rows} == {36 * 192 * 4}  # one CLS vector per image, at any ratio
    for r in rows:
        assert r["rounds"] == 3 and 0.0 <= r["final_accuracy"] <= r["best_accuracy"] <= 1.0
    assert (out / "sweep.png").stat().st_size > 0
    assert "| imagefolder | 0.9 | per-image | centralized |" in (out / "sweep.md").read_text()


def test_a_finished_run_is_reused_and_a_changed_one_is_not(cfg, tmp_path):
    out = tmp_path / "sweep"
    quiet_sweep(cfg, out, [0.5], ["centralized"], ["per-image"])
    metrics = out / "per-image-r0.5-centralized" / "metrics.json"
    stamp = metrics.stat().st_mtime_ns
    quiet_sweep(cfg, out, [0.5], ["centralized"], ["per-image"])
    assert metrics.stat().st_mtime_ns == stamp
    quiet_sweep(cfg.replace(lr=0.01), out, [0.5], ["centralized"], ["per-image"])
    assert metrics.stat().st_mtime_ns != stamp


@pytest.mark.parametrize("kwargs, needle", [
    ({"strategies": ["fedprox"], "modes": ["per-image"]}, "Unknown strategy 'fedprox'"),
    ({"strategies": ["ist"], "modes": ["sometimes"]}, "Unknown mask mode 'sometimes'"),
])
def test_unknown_names_are_errors(cfg, tmp_path, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        quiet_sweep(cfg, tmp_path, [0.5], **kwargs)


def test_a_federated_sweep_on_the_plain_engine_reuses_and_resumes_its_runs(cfg, tmp_path):
    from fedsparse.engine.metrics import RunMetrics

    out = tmp_path / "sweep"
    short = cfg.replace(num_rounds=2)
    rows = quiet_sweep(short, out, [0.5], ["ist", "fedavg"], ["per-image"], engine="plain")
    ist, fedavg = rows
    assert (ist["strategy"], fedavg["strategy"]) == ("ist", "fedavg")
    for r in rows:
        assert r["rounds"] == 2 and 0.0 <= r["final_accuracy"] <= r["best_accuracy"] <= 1.0
        assert r["client_train_seconds"] > 0 and r["client_encoder_gmacs"] > 0
    assert ist["bytes_down_per_client"] < fedavg["bytes_down_per_client"] / 1.5  # IST sends a slice to each of K = 2
    metrics = out / "per-image-r0.5-ist" / "metrics.json"
    assert RunMetrics.load(metrics).finished and RunMetrics.load(metrics).engine == "plain"
    stamp = metrics.stat().st_mtime_ns
    quiet_sweep(short, out, [0.5], ["ist"], ["per-image"], engine="plain")
    assert metrics.stat().st_mtime_ns == stamp  # finished: reused
    rows = quiet_sweep(cfg, out, [0.5], ["ist"], ["per-image"], engine="plain")  # num-rounds 3: resumed after 2
    done = RunMetrics.load(metrics)
    assert rows[0]["rounds"] == 3 and done.finished and done.resumed_at == [2]
    assert [r.round for r in done.rounds] == [1, 2, 3]


def test_an_unknown_engine_is_an_error(cfg, tmp_path):
    with pytest.raises(ValueError, match="Unknown engine 'ray'"):
        quiet_sweep(cfg, tmp_path, [0.5], ["ist"], ["per-image"], engine="ray")
