"""Tests for fedsparse/config.py: one definition of the run-config keys, checked on every layer."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedsparse.config import RunConfig, config_keys, load_toml, parse_overrides, resolve

ROOT = Path(__file__).resolve().parents[1]
REQUIRED_KEYS = [
    "dataset", "data-dir", "encoder", "image-size", "mask-ratio", "mask-seed", "mask-mode",
    "num-clients", "clients-per-round", "num-rounds", "local-steps", "batch-size", "lr",
    "hidden", "strategy", "partitioner", "seed",
]


def pyproject_config() -> dict:
    with (ROOT / "pyproject.toml").open("rb") as fh:
        return tomllib.load(fh)["tool"]["flwr"]["app"]["config"]


class TestSingleSourceOfTruth:
    def test_pyproject_defaults_equal_runconfig_defaults(self) -> None:
        table, defaults = pyproject_config(), RunConfig().to_run_config()
        assert sorted(table) == sorted(defaults), "keys differ between pyproject.toml and RunConfig"
        for key, value in defaults.items():
            assert table[key] == value, key
            assert type(table[key]) is type(value), f"{key}: {type(table[key]).__name__} vs {type(value).__name__}"

    def test_pyproject_table_parses_to_the_default_config(self) -> None:
        assert RunConfig.from_run_config(pyproject_config()) == RunConfig()

    def test_required_keys_exist(self) -> None:
        keys = config_keys()
        missing = [k for k in REQUIRED_KEYS if k not in keys]
        assert not missing
        assert set(RunConfig().to_run_config()) == set(keys)

    def test_keys_are_kebab_case(self) -> None:
        assert all(k == k.lower() and "_" not in k for k in config_keys())

    @pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
    def test_every_config_file_resolves(self, path: Path) -> None:
        cfg = resolve(path)
        for key, value in load_toml(path).items():  # each file only overrides real keys
            assert cfg.to_run_config()[key] == value

    def test_there_is_at_least_one_config_file(self) -> None:
        assert list((ROOT / "configs").glob("*.toml"))


class TestValidation:
    def test_unknown_key_raises_naming_it(self) -> None:
        with pytest.raises(ValueError, match="mask-ration"):
            RunConfig.from_run_config({"mask-ration": 0.5})

    @pytest.mark.parametrize(
        "key, value",
        [("num-rounds", "three"), ("num-rounds", 2.5), ("num-rounds", True), ("mask-ratio", "0.5"),
         ("lr", [0.1]), ("dataset", True), ("seed", None)],
    )
    def test_wrong_type_raises(self, key: str, value) -> None:
        with pytest.raises(ValueError, match=key):
            RunConfig.from_run_config({key: value})

    def test_compatible_types_are_coerced(self) -> None:
        cfg = RunConfig.from_run_config({"lr": 1, "num-rounds": 3.0, "hidden": 512})
        assert (cfg.lr, cfg.num_rounds, cfg.hidden) == (1.0, 3, "512")
        assert isinstance(cfg.lr, float) and isinstance(cfg.num_rounds, int)

    @pytest.mark.parametrize("ratio", [1.0, 1.5, -0.25, float("nan")])
    def test_mask_ratio_outside_unit_interval_raises(self, ratio: float) -> None:
        with pytest.raises(ValueError, match="mask-ratio"):
            RunConfig.from_run_config({"mask-ratio": ratio})

    @pytest.mark.parametrize(
        "key, value, choices",
        [
            ("dataset", "imagenet", ["cifar10-sample", "cifar10", "imagefolder"]),
            ("partitioner", "pathological", ["iid", "dirichlet", "shards"]),
            ("mask-mode", "sometimes", ["per-image", "shared", "random"]),
            ("preprocessing", "zscore", ["paper", "imagenet"]),
            ("encoder-dtype", "fp16", ["fp32", "bf16"]),
            ("ist-scaling", "dropout", ["none", "width"]),
        ],
    )
    def test_unknown_choice_raises_listing_valid_choices(self, key, value, choices) -> None:
        with pytest.raises(ValueError) as err:
            RunConfig.from_run_config({key: value})
        msg = str(err.value)
        assert repr(value) in msg
        assert all(c in msg for c in choices), msg

    def test_unknown_strategy_raises_listing_the_registered_algorithms(self) -> None:
        # The registry is checked where the algorithm is made (server side, and preflight):
        # clients only train what they are sent, whatever algorithm sent it.
        from fedsparse.algorithms import make_algorithm

        with pytest.raises(ValueError) as err:
            make_algorithm(RunConfig.from_run_config({"strategy": "fedprox"}))
        msg = str(err.value)
        assert "'fedprox'" in msg and "ist" in msg and "fedavg" in msg, msg

    @pytest.mark.parametrize(
        "overrides, fragment",
        [
            ({"num-clients": 0}, "num-clients"),
            ({"batch-size": -1}, "batch-size"),
            ({"lr": 0.0}, "lr"),
            ({"dirichlet-alpha": -1.0}, "dirichlet-alpha"),
            ({"num-clients": 3, "clients-per-round": 4}, "clients-per-round"),
            ({"hidden": "1024,0"}, "hidden"),
            ({"hidden": "wide"}, "hidden"),
            ({"encoder": ""}, "encoder"),
        ],
    )
    def test_out_of_range_values_raise(self, overrides, fragment) -> None:
        with pytest.raises(ValueError, match=fragment):
            RunConfig.from_run_config(overrides)

    def test_missing_keys_keep_defaults(self) -> None:
        cfg = RunConfig.from_run_config({"num-rounds": 3})
        assert cfg == RunConfig().replace(num_rounds=3)

    def test_hidden_sizes_parses_hidden(self) -> None:
        assert RunConfig.from_run_config({"hidden": "512, 256"}).hidden_sizes == (512, 256)


class TestOverridesAndFiles:
    def test_parse_overrides_reads_toml_values_and_bare_words(self) -> None:
        out = parse_overrides("mask-ratio=0.75 strategy=fedavg hidden='512,512'")
        assert out == {"mask-ratio": 0.75, "strategy": "fedavg", "hidden": "512,512"}
        cfg = resolve(overrides=out)
        assert (cfg.mask_ratio, cfg.strategy, cfg.hidden_sizes) == (0.75, "fedavg", (512, 512))

    def test_parse_overrides_types(self) -> None:
        out = parse_overrides('num-rounds=3 lr=1e-2 encoder="vit_base_patch16_224.mae" data-dir=/tmp/x')
        assert out == {"num-rounds": 3, "lr": 0.01, "encoder": "vit_base_patch16_224.mae", "data-dir": "/tmp/x"}
        assert type(out["num-rounds"]) is int

    def test_parse_overrides_rejects_items_without_equals(self) -> None:
        with pytest.raises(ValueError, match="num-rounds"):
            parse_overrides("num-rounds")

    def test_overrides_win_over_file(self, tmp_path: Path) -> None:
        path = tmp_path / "run.toml"
        path.write_text('num-rounds = 2\nstrategy = "fedavg"\n')
        cfg = resolve(path, {"num-rounds": 5})
        assert (cfg.num_rounds, cfg.strategy) == (5, "fedavg")
        assert cfg.mask_ratio == RunConfig().mask_ratio

    def test_unknown_key_in_file_raises(self, tmp_path: Path) -> None:
        path = tmp_path / "run.toml"
        path.write_text("num-round = 2\n")
        with pytest.raises(ValueError, match="num-round"):
            resolve(path)

    def test_snake_case_spelling_is_not_an_alias(self, tmp_path: Path) -> None:
        # keys are kebab-case; `flwr run` rejects `num_rounds` (flwr's fuse_dicts checks keys),
        # so an accepted alias would make `fedsparse run` and `flwr run` disagree on one file
        path = tmp_path / "run.toml"
        path.write_text("num_rounds = 2\n")
        with pytest.raises(ValueError, match="num_rounds"):
            resolve(path)

    def test_nested_table_in_file_raises(self, tmp_path: Path) -> None:
        path = tmp_path / "run.toml"
        path.write_text("[tool]\nx = 1\n")
        with pytest.raises(ValueError, match="flat"):
            load_toml(path)

    def test_invalid_toml_raises_value_error(self, tmp_path: Path) -> None:
        path = tmp_path / "run.toml"
        path.write_text("num-rounds = = 2\n")
        with pytest.raises(ValueError, match="not valid TOML"):
            load_toml(path)

    def test_missing_file_raises_file_not_found(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError):
            resolve(tmp_path / "absent.toml")

    def test_runconfig_round_trips_through_run_config_dict(self) -> None:
        cfg = RunConfig().replace(mask_ratio=0.9, strategy="fedavg", hidden="64")
        assert RunConfig.from_run_config(cfg.to_run_config()) == cfg


class TestSubnetsAndFaults:
    def test_defaults(self) -> None:
        cfg = RunConfig()
        assert (cfg.subnets_per_round, cfg.fault_rate, cfg.fault_mode) == (0, 0.0, "raise")
        assert cfg.num_subnets == cfg.clients_per_round  # 0 = one subnet per client

    def test_num_subnets(self) -> None:
        assert RunConfig.from_run_config({"clients-per-round": 8, "subnets-per-round": 2}).num_subnets == 2
        assert RunConfig.from_run_config({"strategy": "fedavg", "subnets-per-round": 2}).num_subnets == 1

    @pytest.mark.parametrize(
        "overrides, fragment",
        [
            ({"subnets-per-round": -1}, "subnets-per-round"),
            ({"clients-per-round": 4, "subnets-per-round": 5}, "subnets-per-round"),
            ({"fault-rate": 1.0}, "fault-rate"),
            ({"fault-rate": -0.1}, "fault-rate"),
            ({"fault-mode": "explode"}, "fault-mode"),
        ],
    )
    def test_out_of_range_values_raise(self, overrides, fragment) -> None:
        with pytest.raises(ValueError, match=fragment):
            RunConfig.from_run_config(overrides)

    @pytest.mark.parametrize("mode", ["raise", "nan", "hang", "mix"])
    def test_fault_modes(self, mode: str) -> None:
        assert RunConfig.from_run_config({"fault-rate": 0.3, "fault-mode": mode}).fault_mode == mode


class TestShippedConfigs:
    @pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml")),
                             ids=lambda p: p.name)
    def test_configs_hold_only_what_differs_from_the_defaults_with_a_comment(self, path) -> None:
        defaults = RunConfig().to_run_config()
        values = load_toml(path)
        RunConfig.from_run_config(values)  # every shipped config is valid
        same = [k for k, v in values.items() if defaults[k] == v]
        assert not same, f"{path.name} repeats defaults: {same}"
        lines = path.read_text().splitlines()
        assert lines and lines[0].startswith("#"), f"{path.name} starts without saying what it is for"
