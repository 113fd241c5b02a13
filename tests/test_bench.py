"""``fedsparse bench`` on a tiny image folder: every figure present, consistent and measured."""

from __future__ import annotations

import json
import warnings

import pytest

from fedsparse.commands.bench import bench, encoder_rows
from fedsparse.config import RunConfig


@pytest.fixture
def cfg(tmp_path, make_image_tree):
    root = make_image_tree(tmp_path / "data", {"train": 24, "test": 4}, classes=("a", "b", "c"))
    return RunConfig(dataset="imagefolder", data_dir=str(root), encoder="builtin-random", hidden="64,64",
                     num_clients=6, clients_per_round=3, local_steps=2, batch_size=8, cache_dir=str(tmp_path / "cache"))


def test_encoder_rows_measure_speed_and_bf16_agreement(cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        rows = encoder_rows(cfg, [0.0, 0.75], ["fp32", "bf16"], n_images=16, repeats=1, report=lambda s: None)
    assert [(r["mask_ratio"], r["dtype"]) for r in rows] == [(0.0, "fp32"), (0.0, "bf16"), (0.75, "fp32"), (0.75, "bf16")]
    assert all(r["macs_analytic"] == r["macs_counted"] for r in rows)
    base = rows[0]["images_per_second"]  # r = 0 in fp32: the reference of every speed-up
    assert [r["speedup_vs_r0_fp32"] for r in rows] == [pytest.approx(r["images_per_second"] / base) for r in rows]
    assert all(r["images_per_second"] > 0 for r in rows)
    assert rows[0]["cosine_vs_fp32"] is None and rows[1]["cosine_vs_fp32"] > 0.99
    assert rows[2]["tokens"] == 1 + 16  # 64 patches at 32px / patch 4, a quarter visible


def test_bench_writes_its_files_with_fresh_process_memory_and_wire_bytes(cfg, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = bench(cfg, tmp_path / "out", [0.9], ["fp32"], images=24, speed_images=8, report=lambda s: None)
    for name in ("bench.json", "bench.md", "bench.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert json.loads((tmp_path / "out" / "bench.json").read_text())["memory"] == result["memory"]
    mem = result["memory"]
    assert [m["mask_ratio"] for m in mem] == [0.0, 0.9]  # r = 0 added as the reference
    for m in mem:
        assert m["extract_peak_rss"] >= m["rss_after_encoder"] >= m["rss_after_imports"] > 50 * 2**20
        assert m["extract_peak_anon"] >= m["anon_after_encoder"] >= m["anon_after_imports"] > 0
        assert m["cls_cache_file_bytes"] > m["cls_tensor_bytes_analytic"] == 24 * 192 * 4
    stored = [m["masked_images_bytes_analytic"] for m in mem]
    assert stored == sorted(stored, reverse=True) and stored[0] == 24 * 32 * 32 * 3
    ist, fedavg = result["strategies"]
    assert (ist["strategy"], fedavg["strategy"]) == ("ist", "fedavg")
    d_in, h1, h2, d_out = ist["client_model_dims"]
    assert (d_in, d_out) == (192, 3) and h1 in (21, 22) and h2 in (21, 22)  # 64 neurons among K = 3
    assert fedavg["client_model_dims"] == [192, 64, 64, 3]
    for way in ("down", "up"):
        assert ist[f"bytes_{way}_vs_fedavg"] == pytest.approx(ist[f"bytes_{way}_per_client"] / fedavg[f"bytes_{way}_per_client"])
    assert ist["bytes_down_vs_fedavg"] <= 1 / 3 + 0.01  # at most FedAvg's divided by K
    assert ist["bytes_up_per_client"] < fedavg["bytes_up_per_client"] / 2
    assert ist["train_peak_rss"] > 50 * 2**20 and ist["train_peak_anon"] > 0
    assert "| ist |" in (tmp_path / "out" / "bench.md").read_text()


def test_unknown_dtype_is_an_error(cfg, tmp_path):
    with pytest.raises(ValueError, match="Unknown dtype 'fp8'"):
        bench(cfg, tmp_path, [0.5], ["fp8"], images=4, speed_images=4)
