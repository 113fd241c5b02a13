"""Every TOML the project writes goes through ``fedsparse.config``'s tomli-w helpers, and
what they write is read back as written: by ``tomllib`` and by Flower's own parsers."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from flwr.common.config import get_project_config, parse_config_args

from fedsparse.config import RunConfig, run_config_arg, toml_text, toml_value

AWKWARD = {"data-dir": "/a b/it's\\here", "seed": 3, "lr": 1e-05, "label-aware": False, "hidden": "64,64",
           "classes": "", "note": "tab\there, ünïcode"}


def test_run_config_arg_reads_back_through_flowers_parser() -> None:
    text = run_config_arg(AWKWARD)
    assert parse_config_args([text]) == AWKWARD, text


def test_a_double_quote_is_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match="note=.*double quote"):
        run_config_arg({"note": 'say "hi"'})


def test_toml_text_and_value() -> None:
    doc = {"superlink": {"fedsparse-test": {"address": "127.0.0.1:9093", "insecure": True}}, "x": {"y z": 1.5}}
    assert tomllib.loads(toml_text(doc)) == doc
    assert [toml_value(v) for v in (0.5, True, 3, "a'b")] == ["0.5", "true", "3", '"a\'b"']


def test_the_simulations_app_dir_holds_the_runs_config(tmp_path: Path) -> None:
    from strategies.simulation import write_app_dir

    cfg = RunConfig(hidden="64,64", data_dir="/a b/it's", lr=0.003)
    write_app_dir(cfg, tmp_path)
    project = get_project_config(tmp_path)  # Flower's own reading and validation
    assert project["tool"]["flwr"]["app"]["config"] == cfg.to_run_config()
    assert project["tool"]["flwr"]["app"]["components"]["serverapp"] == "strategies.server_app:app"
    assert tomllib.loads((tmp_path / "pyproject.toml").read_text())["project"]["name"] == "fedsparse-run"
