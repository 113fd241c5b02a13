"""The ``fedsparse`` command line: one convention for every command, and no import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _import_graph() -> dict[str, set[str]]:
    """Every import (module level or inside a function) between the project's modules;
    a module's import of its own package (a registry's ``register``) is left out."""
    files = [*ROOT.glob("fedsparse/**/*.py"), *ROOT.glob("strategies/*.py"), *ROOT.glob("clients/*.py")]
    mods = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in files}
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    deps.add(full if full in mods else node.module)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[name] = {d for d in deps if d in mods and d != name and not name.startswith(d + ".")}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep] if dep in path else [node, dep]
            if dep not in state:
                found = visit(dep, path + [dep])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_the_project_modules() -> None:
    graph = _import_graph()
    assert {"fedsparse.commands.cli", "fedsparse.commands.sweep", "fedsparse.commands.drivers"} <= set(graph)
    assert "fedsparse.commands.drivers" in graph["fedsparse.commands.sweep"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_one_table_of_drivers() -> None:
    from fedsparse.commands import cli, drivers, overhead

    run_choices = {a.dest: a.choices for a in _subparser(cli.build_parser(), "run")._actions}
    assert tuple(run_choices["engine"]) == drivers.DRIVERS
    assert set(overhead.ENGINES) == {*drivers.DRIVERS, "reference"}


def _subparser(parser, name: str):
    return parser._subparsers._group_actions[0].choices[name]


# --- the convention ------------------------------------------------------------------------------


def _commands():
    from fedsparse.commands.cli import build_parser

    return _subparser_choices(build_parser())


def _subparser_choices(parser) -> dict:
    return dict(parser._subparsers._group_actions[0].choices)


def test_a_flag_named_as_a_run_config_key_sets_that_key() -> None:
    """``--data-dir`` on a command must set ``data-dir``; a flag for something else is named
    otherwise (``devices --device-data-dir``)."""
    from fedsparse.commands.cli import KeyFlag
    from fedsparse.config import config_keys

    keys = set(config_keys()) - {"resume"}  # run/check --resume DIR sets resume = true and out-dir = DIR
    checked = 0
    for name, sub in _commands().items():
        for action in sub._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag[2:] in keys and action.help != "==SUPPRESS==":
                    assert isinstance(action, KeyFlag) and action.key == flag[2:], f"fedsparse {name} {flag}"
                    checked += 1
    assert checked >= 2  # overhead's and devices' --num-rounds


def test_every_command_takes_run_config_and_help_shows_the_defaults() -> None:
    import argparse

    for name, sub in _commands().items():
        if name != "keys":
            assert "--run-config" in sub._option_string_actions, name
        text = sub.format_help()
        for action in sub._actions:
            if action.help in (None, argparse.SUPPRESS) or not action.option_strings:
                continue
            if action.default not in (None, "", False, [], argparse.SUPPRESS):
                flag = action.option_strings[-1]
                block = text[text.index(flag):]
                assert "(default:" in block.split("\n  -")[0], f"fedsparse {name} {flag}: no default in --help"


def test_run_config_is_repeatable_merged_in_order_with_toml_files_and_key_flags(tmp_path: Path) -> None:
    from fedsparse.commands.cli import build_parser, overrides_of, run_config_for

    toml = tmp_path / "over.toml"
    toml.write_text('seed = 7\nhidden = "32,32"\n')
    args = build_parser().parse_args(["run", "--run-config", "seed=1 num-rounds=2", "--run-config", str(toml),
                                      "--run-config", "seed=3", "--out", str(tmp_path / "o")])
    cfg = run_config_for(args)
    assert (cfg.seed, cfg.num_rounds, cfg.hidden) == (3, 2, "32,32")
    args = build_parser().parse_args(["devices", "--run-config", "num-rounds=5", "--num-rounds", "7"])
    assert overrides_of(args.run_config) == {"num-rounds": 7}
    args = build_parser().parse_args(["devices", "--num-rounds", "7", "--run-config", "num-rounds=5"])
    assert overrides_of(args.run_config) == {"num-rounds": 5}


def test_renamed_flags_warn_and_map_to_the_new_ones(capsys) -> None:
    from fedsparse.commands.cli import RENAMED, build_parser, pretrain_settings

    parser = build_parser()
    commands = _subparser_choices(parser)
    for command, renames in RENAMED.items():
        text = commands[command].format_help()
        for old, new in renames.items():
            assert f"{old} " not in text and f"{old}\n" not in text, f"{command} {old} shows in --help"
            assert new.split()[0] in text, f"{command}: {new} missing from --help"
    old = parser.parse_args(["devices", "--rounds", "2", "--images", "10", "--timeout", "30", "--data-dir", "d"])
    new = parser.parse_args(["devices", "--num-rounds", "2", "--images-per-device", "10", "--run-timeout", "30",
                             "--device-data-dir", "d"])
    assert vars(old) == vars(new)
    assert capsys.readouterr().err.count("is deprecated") == 4
    old = parser.parse_args(["overhead", "--clients-per-round", "2,3", "--rounds", "4"])
    assert (old.clients_per_round_list, old.run_config) == ("2,3", [{"num-rounds": 4}])
    old = parser.parse_args(["bench", "--images", "5", "--dtypes", "fp32"])
    assert (old.extraction_images, old.encoder_dtypes) == (5, "fp32")
    old = parser.parse_args(["pretrain", "d", "--out", "o", "--epochs", "3", "--device", "cpu", "--run-config", "lr=0.01"])
    assert pretrain_settings(old.run_config) == pretrain_settings(["epochs=3 device=cpu lr=0.01"])
    assert "--epochs is deprecated; use --run-config \"epochs=...\"" in capsys.readouterr().err


def test_pretrain_settings_from_run_config() -> None:
    import pytest

    from fedsparse.commands.cli import PRETRAIN_KEYS, pretrain_settings

    defaults = pretrain_settings([])
    assert defaults == {k: d for k, (_, d, _) in PRETRAIN_KEYS.items()}
    got = pretrain_settings(["epochs=2 batch-size=8", "epochs=4 dtype='bf16' device='cuda:1'"])
    assert (got["epochs"], got["batch-size"], got["dtype"], got["device"]) == (4, 8, "bf16", "cuda:1")
    for text, fragment in (("epochs=0", "epochs must be >= 1"), ("lr=nan", "lr must be"), ("dtype=fp16", "dtype must"),
                           ("epochs='x'", "'epochs' must be int"), ("mask-ratio=1.0", "mask-ratio must be in [0, 1)")):
        with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            pretrain_settings([text])


def test_version_is_the_packages() -> None:
    import subprocess
    import sys
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    proc = subprocess.run([sys.executable, "-m", "fedsparse.commands.cli", "--version"], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith(f"fedsparse {version} (flwr "), proc.stdout + proc.stderr


def test_one_line_is_written_once() -> None:
    from fedsparse.errors import one_line

    assert one_line("a\n  b\tc ") == "a b c"
    assert one_line(KeyError()) == "KeyError" and one_line(ValueError("x\ny")) == "x y"
    assert one_line("word " * 100, 20) == "word word word wo..." and len(one_line("w" * 500, 300)) == 300
    copies = [p.relative_to(ROOT).as_posix() for p in [*ROOT.glob("fedsparse/**/*.py"), *ROOT.glob("strategies/*.py"),
                                                       *ROOT.glob("clients/*.py")]
              if ".split())" in p.read_text() and '" ".join(' in p.read_text()]
    assert copies == ["fedsparse/errors.py"], copies


def test_the_cli_page_lists_every_renamed_flag() -> None:
    from fedsparse.commands.cli import RENAMED

    rows = [line for line in (ROOT / "docs" / "cli.md").read_text().splitlines() if line.startswith("| `")]
    for command, renames in RENAMED.items():
        for old, new in renames.items():
            assert any(row.startswith(f"| `{command}` |") and f"`{old}" in row and new.split()[0] in row
                       for row in rows), f"docs/cli.md: no row for {command} {old} -> {new}"
