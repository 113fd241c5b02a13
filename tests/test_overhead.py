"""``fedsparse overhead``: the same rounds through several drivers, timed per round."""

from __future__ import annotations

import json
import warnings

import pytest

from fedsparse.commands.overhead import overhead, round_walls
from fedsparse.config import RunConfig
from fedsparse.engine.metrics import RunMetrics


@pytest.fixture
def cfg(tmp_path, shared_image_tree, shared_feature_cache):
    root = shared_image_tree({"train": 8, "test": 3}, classes=("a", "b", "c"))
    return RunConfig(dataset="imagefolder", data_dir=str(root), encoder="builtin-random", hidden="24,24",
                     num_clients=3, clients_per_round=2, local_steps=2, batch_size=8,
                     cache_dir=str(shared_feature_cache))


def test_plain_and_in_process_rounds_are_timed_and_give_the_same_model(cfg, tmp_path):
    out = tmp_path / "overhead"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        rows = overhead(cfg, out, [2, 4], rounds=2, engines=("plain", "in-process"), report=lambda s: None)
    assert [(r["clients_per_round"], r["num_clients"], r["rounds"]) for r in rows] == [(2, 3, 2), (4, 4, 2)]
    for r in rows:
        for engine in ("plain", "in-process"):
            assert r[f"{engine}_first_round_seconds"] > 0 and r[f"{engine}_later_round_seconds"] > 0
        # one repeat: the ratio of the two drivers' later-round times, as measured
        assert r["in-process_vs_plain"] == pytest.approx(r["in-process_later_round_seconds"] / r["plain_later_round_seconds"])
        assert r["plain_final_accuracy"] == r["in-process_final_accuracy"]
    saved = json.loads((out / "overhead.json").read_text())
    assert saved["rows"] == rows and saved["config"] == cfg.to_run_config()
    md = (out / "overhead.md").read_text()
    assert "in-process / plain" in md and md.count("\n") == 4  # header, rule, one line per K
    plain, flower = RunMetrics.load(out / "plain-k2"), RunMetrics.load(out / "in-process-k2")
    assert (plain.engine, flower.engine) == ("plain", "in-process") and plain.finished and flower.finished
    # a round's time is wall time from one round's end to the next (what the engine does between
    # rounds included), the first round's its own seconds
    walls = round_walls(plain.rounds)
    assert walls == [rows[0]["plain_first_round_seconds"], rows[0]["plain_later_round_seconds"]]
    assert walls[1] == plain.rounds[1].elapsed - plain.rounds[0].elapsed >= plain.rounds[1].seconds


def test_repeats_alternate_the_drivers_and_report_medians(cfg, tmp_path):
    said: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        (row,) = overhead(cfg, tmp_path / "o", [2], rounds=2, engines=("plain", "in-process"), report=said.append,
                          repeats=3)
    order = [s.split(": ", 1)[1].split(" (")[0] for s in said if "(repeat" in s]
    assert order == ["plain", "in-process", "in-process", "plain", "plain", "in-process"]
    for engine in ("plain", "in-process"):
        runs = row[f"{engine}_later_round_seconds_runs"]
        assert len(runs) == 3 and row[f"{engine}_later_round_seconds"] == sorted(runs)[1]
    ratios = sorted(a / b for a, b in zip(row["in-process_later_round_seconds_runs"], row["plain_later_round_seconds_runs"]))
    assert row["repeats"] == 3 and row["in-process_vs_plain"] == ratios[1]
    with pytest.raises(ValueError, match="--repeats must be >= 1"):
        overhead(cfg, tmp_path / "o", [2], rounds=2, engines=("plain",), report=said.append, repeats=0)


@pytest.mark.parametrize("change, kwargs, needle", [
    ({}, {"rounds": 1}, "num-rounds must be >= 2"),
    ({}, {"engines": ("plain", "ray")}, "Unknown engine 'ray'"),
    ({"mask_mode": "random"}, {}, "cacheable features"),
])
def test_bad_arguments_are_errors(cfg, tmp_path, change, kwargs, needle):
    args = {"rounds": 2, "engines": ("plain",), **kwargs}
    with pytest.raises(ValueError, match=needle):
        overhead(cfg.replace(**change), tmp_path, [2], report=lambda s: None, **args)


def test_the_bare_pytorch_reference_trains_the_engines_model_in_parallel_processes(cfg, tmp_path):
    authors = cfg.replace(ist_variant="authors", partitioner="full", num_clients=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        (row,) = overhead(authors, tmp_path / "o", [2], rounds=3, engines=("plain", "reference"), report=lambda s: None)
    assert row["reference_workers"] == 2 and row["reference_later_round_seconds"] > 0
    # the round split into its slowest client's training and the rest, in each driver
    for engine in ("plain", "reference"):
        train, rest = row[f"{engine}_later_train_seconds"], row[f"{engine}_later_rest_seconds"]
        assert 0 < train < row[f"{engine}_later_round_seconds"] and rest > 0
        assert row[f"{engine}_later_train_seconds_runs"] == [train]
        runs = zip(row[f"{engine}_later_round_seconds_runs"], [train])
        assert all(abs(total - t - rest) < 1e-12 for total, t in runs)  # one repeat: round = train + rest
    assert row["reference_same_model"] is True  # the same work, so the times compare
    assert row["reference_final_accuracy"] == row["plain_final_accuracy"]
    assert "plain / reference" in (tmp_path / "o" / "overhead.md").read_text()


def test_the_reference_is_left_out_where_it_does_not_apply(cfg, tmp_path):
    said = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        (row,) = overhead(cfg, tmp_path / "o", [2], rounds=2, engines=("plain", "reference"), report=said.append)
    assert "reference_later_round_seconds" not in row and any("leaving it out" in s for s in said)
