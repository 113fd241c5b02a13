"""``fedsparse sweep``: one run per (mode, ratio, strategy), the paper's table as files."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

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
    assert "| imagefolder | 0.9 | per-image | iid | centralized |" in (out / "sweep.md").read_text()


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


def test_a_heterogeneity_sweep_compares_strategies_per_partitioning(cfg, tmp_path):
    """``partitions``: one run per (partitioning, strategy); the bytes columns and the
    megabytes to 90% of FedAvg come from the runs' own per-round records."""
    from fedsparse.commands.sweep import cumulative_mb
    from fedsparse.engine.metrics import RunMetrics

    out = tmp_path / "het"
    short = cfg.replace(num_rounds=2, clients_per_round=4)
    strategies = ["ist", "ist-authors", "fedavg(local-steps=2)", "fed3r", "fedncm", "centralized"]
    rows = quiet_sweep(short, out, [0.5], strategies, ["per-image"], engine="plain", partitions=["0.3", "iid"])
    assert [(r["partition"], r["strategy"]) for r in rows] == [(p, s) for p in ("dir0.3", "iid") for s in strategies]
    central = [r for r in rows if r["strategy"] == "centralized"]
    assert central[0]["run_dir"] == central[1]["run_dir"]  # all the data whatever the split: run once
    for r in rows:
        run = RunMetrics.load(Path(r["run_dir"]) / "metrics.json")
        if r["strategy"] == "centralized":
            assert r["total_mb"] is None and r["mb_to_90pct_fedavg"] is None
            continue
        assert run.config["partitioner"] == ("iid" if r["partition"] == "iid" else "dirichlet")
        assert r["total_mb"] == pytest.approx(sum(x.bytes_down_total + x.bytes_up_total for x in run.rounds) / 1e6)
        fedavg = next(f for f in rows if f["strategy"] == "fedavg(local-steps=2)" and f["partition"] == r["partition"])
        reached = [mb for mb, acc in cumulative_mb(run) if acc >= 0.9 * fedavg["final_accuracy"]]
        assert r["mb_to_90pct_fedavg"] == (reached[0] if reached else None)
    by = {(r["partition"], r["strategy"]): r for r in rows}
    assert by["iid", "ist-authors"]["bytes_down_per_client"] < by["iid", "fedavg(local-steps=2)"]["bytes_down_per_client"]
    fedavg_run = RunMetrics.load(Path(by["iid", "fedavg(local-steps=2)"]["run_dir"]) / "metrics.json")
    assert (fedavg_run.config["strategy"], fedavg_run.config["local-steps"]) == ("fedavg", 2)  # its own setting
    assert Path(by["iid", "fedavg(local-steps=2)"]["run_dir"]).name == "per-image-r0.5-iid-fedavg-local-steps-2"
    assert by["iid", "fed3r"]["bytes_down_per_client"] < by["iid", "ist"]["bytes_down_per_client"]  # stats go up only
    assert RunMetrics.load(Path(by["iid", "ist-authors"]["run_dir"]) / "metrics.json").config["ist-variant"] == "authors"
    assert (out / "sweep-bytes.png").stat().st_size > 0
    assert "| dir0.3 | fed3r |" in (out / "sweep.md").read_text()


def test_an_unknown_partition_is_an_error(cfg, tmp_path):
    with pytest.raises(ValueError, match="Unknown strategy 'fedprox'"):
        quiet_sweep(cfg, tmp_path, [0.5], ["fedprox(mu=1)"], ["per-image"])
    with pytest.raises(ValueError, match="Unknown config key 'local-stepz'"):
        quiet_sweep(cfg, tmp_path, [0.5], ["fedavg(local-stepz=1)"], ["per-image"], engine="plain")
    with pytest.raises(ValueError, match="Unknown partition 'skewed'"):
        quiet_sweep(cfg, tmp_path, [0.5], ["ist"], ["per-image"], partitions=["skewed"])
    with pytest.raises(ValueError, match="must be finite and > 0"):
        quiet_sweep(cfg, tmp_path, [0.5], ["ist"], ["per-image"], partitions=["-1"])
