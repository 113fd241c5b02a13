"""The bad-input catalogue: every bad setting, argument, data folder, checkpoint, cache or
node config ends ``fedsparse`` with one line on stderr, ``fedsparse: error: ...``, naming the
problem, and exit status 2, before anything heavy (Ray, a round) starts.

The cases run in-process through ``fedsparse.commands.cli.main`` with the drivers replaced by
a tripwire (a case that got past the checks fails the test instead of starting a run); a few
run as real ``fedsparse`` processes, to prove the installed command keeps the promise too.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fedsparse.commands import cli

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    argv: tuple[str, ...]  # "{tmp}" is the catalogue's folder, "{unwritable}" a folder nobody here may create
    fragment: str  # what the one line must say
    process: bool = False  # run as a real `fedsparse` process as well


def run(*args: str, fragment: str, process: bool = False) -> Case:
    return Case(tuple(args), fragment, process)


DATA = "dataset=imagefolder data-dir='{tmp}/data' strategy=fedavg num-clients=4 clients-per-round=2"  # usable
OUT = ("--out", "{tmp}/out")

CASES = {
    # --- config values: every range of RunConfig -------------------------------------------
    "seed-negative": run("run", "--run-config", "seed=-1", *OUT, fragment="seed must be >= 0", process=True),
    "mask-seed-negative": run("run", "--run-config", "mask-seed=-3", *OUT, fragment="mask-seed must be >= 0"),
    "lr-inf": run("run", "--run-config", "lr=inf", *OUT, fragment="lr must be a finite number"),
    "lr-nan": run("run", "--run-config", "lr=nan", *OUT, fragment="lr must be a finite number"),
    "lr-zero": run("run", "--run-config", "lr=0.0", *OUT, fragment="lr must be > 0"),
    "round-timeout-inf": run("run", "--run-config", "round-timeout=inf", *OUT,
                             fragment="round-timeout must be a finite number"),
    "round-timeout-negative": run("run", "--run-config", "round-timeout=-5", *OUT, fragment="round-timeout must be > 0"),
    "dirichlet-alpha-zero": run("run", "--run-config", "partitioner=dirichlet dirichlet-alpha=0.0", *OUT,
                                fragment="dirichlet-alpha must be > 0"),
    "dirichlet-alpha-inf": run("run", "--run-config", "dirichlet-alpha=inf", *OUT,
                               fragment="dirichlet-alpha must be a finite number"),
    "client-cpus-zero": run("run", "--run-config", "client-cpus=0", *OUT, fragment="client-cpus must be > 0"),
    "client-cpus-over-cores": run("run", "--run-config", "client-cpus=100000", *OUT,
                                  fragment="client-cpus (100000) exceeds the"),
    "mask-ratio-one": run("run", "--run-config", "mask-ratio=1.0", *OUT, fragment="mask-ratio must be in [0, 1)"),
    "mask-ratio-negative": run("run", "--run-config", "mask-ratio=-0.1", *OUT, fragment="mask-ratio must be in [0, 1)"),
    "fault-rate-one": run("run", "--run-config", "fault-rate=1.0", *OUT, fragment="fault-rate must be in [0, 1)"),
    "num-clients-zero": run("run", "--run-config", "num-clients=0", *OUT, fragment="num-clients must be >= 1"),
    "clients-per-round-over": run("run", "--run-config", "num-clients=3 clients-per-round=4", *OUT,
                                  fragment="clients-per-round (4) exceeds num-clients (3)"),
    "subnets-over": run("run", "--run-config", "clients-per-round=2 subnets-per-round=3", *OUT,
                        fragment="subnets-per-round (3) exceeds clients-per-round (2)"),
    "num-rounds-zero": run("run", "--run-config", "num-rounds=0", *OUT, fragment="num-rounds must be >= 1"),
    "local-steps-zero": run("run", "--run-config", "local-steps=0", *OUT, fragment="local-steps must be >= 1"),
    "batch-size-negative": run("run", "--run-config", "batch-size=-1", *OUT, fragment="batch-size must be >= 1"),
    "eval-every-zero": run("run", "--run-config", "eval-every=0", *OUT, fragment="eval-every must be >= 1"),
    "save-seconds-negative": run("run", "--run-config", "save-seconds=-1.0", *OUT,
                                 fragment="save-seconds must be a finite number >= 0 (0 = every round), got -1.0"),
    "image-size-huge": run("run", "--run-config", "image-size=100000", *OUT, fragment="image-size must be at most"),
    "hidden-zero-width": run("run", "--run-config", "hidden='1024,0'", *OUT, fragment="hidden must list"),
    "hidden-words": run("run", "--run-config", "hidden=wide", *OUT, fragment="hidden must be comma-separated"),
    "encoder-blank": run("run", "--run-config", "encoder=' '", *OUT, fragment="encoder must not be empty"),
    "out-dir-empty": run("run", "--run-config", "out-dir=''", fragment="out-dir must not be empty"),
    "dataset-unknown": run("run", "--run-config", "dataset=imagenet", *OUT, fragment="Unknown dataset 'imagenet'"),
    "partitioner-unknown": run("run", "--run-config", "partitioner=random", *OUT, fragment="Unknown partitioner"),
    "preprocessing-unknown": run("run", "--run-config", "preprocessing=zscore", *OUT, fragment="Unknown preprocessing"),
    "encoder-dtype-unknown": run("run", "--run-config", "encoder-dtype=fp16", *OUT, fragment="Unknown encoder-dtype"),
    "mask-mode-unknown": run("run", "--run-config", "mask-mode=blocky", *OUT, fragment="Unknown mask-mode"),
    "fault-mode-unknown": run("run", "--run-config", "fault-mode=explode", *OUT, fragment="Unknown fault-mode"),
    "ist-scaling-unknown": run("run", "--run-config", "ist-scaling=depth", *OUT, fragment="Unknown ist-scaling"),
    "strategy-unknown": run("run", "--run-config", "strategy=fedprox", *OUT, fragment="'fedprox'"),
    "key-unknown": run("run", "--run-config", "bogus-key=3", *OUT, fragment="Unknown config key 'bogus-key'"),
    "key-unknown-checked-as-flwr-run-gets-it": run("check", "--run-config", "bogus-key=3", *OUT,
                                                    fragment="Unknown config key 'bogus-key'; valid keys:"),
    "type-int-as-word": run("run", "--run-config", "num-rounds='many'", *OUT, fragment="'num-rounds' must be int"),
    "type-int-as-fraction": run("run", "--run-config", "num-rounds=2.5", *OUT, fragment="'num-rounds' must be int"),
    "type-bool-as-word": run("run", "--run-config", "resume='yes'", *OUT, fragment="'resume' must be bool"),
    "int-over-64-bits": run("run", "--run-config", "seed=99999999999999999999", *OUT,
                            fragment="seed must fit in 64 bits"),
    "hidden-too-narrow": run("run", "--run-config", f"{DATA.replace('fedavg', 'ist')} hidden='1,1'",
                             *OUT, fragment="too narrow to split into 2 subnets"),
    "num-clients-over-images": run("run", "--run-config", f"{DATA} num-clients=500 clients-per-round=2", *OUT,
                                   fragment="num-clients (500) exceeds the"),
    "shards-too-few-examples": run("run", "--run-config", f"{DATA} partitioner=shards num-clients=10 clients-per-round=2",
                                   *OUT, fragment="partitioner shards needs 2 examples per partition"),
    # --- command-line arguments and config files --------------------------------------------
    "config-file-missing": run("run", "{tmp}/nope.toml", *OUT, fragment="config file not found"),
    "config-file-not-toml": run("run", "{tmp}/broken.toml", *OUT, fragment="is not valid TOML"),
    "config-file-table": run("run", "{tmp}/table.toml", *OUT, fragment="must hold flat key = value pairs"),
    "run-config-file-unknown-key": run("run", "--run-config", "{tmp}/unknown.toml", *OUT,
                                       fragment="Unknown config key 'no-such-key'"),
    "run-config-not-pair": run("run", "--run-config", "seed", *OUT, fragment="'seed' is not key=value"),
    "run-config-open-quote": run("run", "--run-config", "hidden='64", *OUT, fragment="no closing quotation"),
    "engine-unknown": run("run", "--engine", "warp", *OUT, fragment="argument --engine: invalid choice: 'warp'"),
    "command-unknown": run("fly", fragment="invalid choice: 'fly'"),
    "argument-unknown": run("keys", "--verbose", fragment="unrecognized arguments: --verbose"),
    "resume-nothing": run("run", "--resume", "{tmp}/data", fragment="nothing to resume"),
    "resume-garbage-checkpoint": run("run", "--resume", "{tmp}/garbage-run", fragment="cannot read"),
    "resume-changed-config": run("run", "--resume", "{tmp}/done-run", "--run-config", "seed=5",
                                 fragment="config differs from the checkpoint's in"),
    "pretrain-epochs-zero": run("pretrain", "{tmp}/data", "--out", "{tmp}/pre", "--run-config", "epochs=0",
                                fragment="pretrain epochs must be >= 1"),
    "pretrain-lr-nan": run("pretrain", "{tmp}/data", "--out", "{tmp}/pre", "--run-config", "lr=nan",
                           fragment="pretrain lr must be"),
    "pretrain-key-unknown": run("pretrain", "{tmp}/data", "--out", "{tmp}/pre", "--run-config", "epoch=3",
                                fragment="Unknown pretrain key 'epoch'"),
    "bench-mask-ratio": run("bench", "--mask-ratios", "0,1.5", "--out", "{tmp}/bench", fragment="mask-ratio"),
    "overhead-k-zero": run("overhead", "--clients-per-round-list", "0", "--out", "{tmp}/ovh",
                           fragment="--clients-per-round-list must list integers >= 1"),
    "sweep-out-is-file": run("sweep", "--out", "{tmp}/a-file", fragment="--out {tmp}/a-file is a file"),
    # --- data folders ---------------------------------------------------------------------------
    "data-dir-missing": run("run", "--run-config", "dataset=imagefolder data-dir='{tmp}/absent'", *OUT,
                            fragment="data-dir not found"),
    "data-dir-unset": run("run", "--run-config", "dataset=imagefolder", *OUT, fragment="needs data-dir"),
    "data-empty-folder": run("run", "--run-config", "dataset=imagefolder data-dir='{tmp}/empty'", *OUT,
                             fragment="no images found"),
    "data-one-class": run("run", "--run-config", "dataset=imagefolder data-dir='{tmp}/one-class'", *OUT,
                          fragment="fewer than 2 classes", process=True),
    "data-one-class-split": run("run", "--run-config", "dataset=imagefolder data-dir='{tmp}/one-class-split'", *OUT,
                                fragment="fewer than 2 classes"),
    "data-no-class-folders": run("run", "--run-config", "dataset=imagefolder data-dir='{tmp}/loose'", *OUT,
                                 fragment="lie in no class folder"),
    "data-classes-differ": run("run", "--run-config", "dataset=imagefolder data-dir='{tmp}/differ'", *OUT,
                               fragment="train and test class folders differ"),
    "data-cifar10-flat": run("run", "--run-config", "dataset=cifar10 data-dir='{tmp}/data'", *OUT,
                             fragment="must hold train/ and test/"),
    "data-not-an-archive": run("run", "--run-config", "dataset=imagefolder data-dir='{tmp}/junk.tar.gz'", *OUT,
                               fragment="cannot read archive"),
    "data-undecodable": run("run", "--run-config", "dataset=imagefolder data-dir='{tmp}/undecodable'", *OUT,
                            fragment="can be decoded as an image"),
    # --- encoder checkpoints ------------------------------------------------------------------
    "checkpoint-random-bytes": run("run", "--run-config", DATA + " encoder='{tmp}/random.pth'", *OUT,
                                   fragment="not a checkpoint of plain tensors", process=True),
    "checkpoint-empty": run("run", "--run-config", DATA + " encoder='{tmp}/empty.pth'", *OUT,
                            fragment="empty or truncated"),
    "checkpoint-nan-weights": run("run", "--run-config", DATA + " encoder='{tmp}/nan.pth'", *OUT,
                                  fragment="nan.pth holds NaN or Inf weights"),
    "checkpoint-inf-features": run("run", "--run-config", DATA + " encoder='{tmp}/overflow.pth'", *OUT,
                                   fragment="gives NaN or Inf features"),
    "checkpoint-not-a-vit": run("run", "--run-config", DATA + " encoder='{tmp}/not-vit.pth'", *OUT,
                                fragment="checkpoint has no ViT encoder key"),
    "checkpoint-safetensors-garbage": run("run", "--run-config", DATA + " encoder='{tmp}/random.safetensors'", *OUT,
                                          fragment="not a readable safetensors file"),
    "checkpoint-missing": run("run", "--run-config", DATA + " encoder='{tmp}/absent.pth'", *OUT,
                              fragment="encoder checkpoint not found"),
    "checkpoint-is-folder": run("run", "--run-config", DATA + " encoder='{tmp}/empty'", *OUT,
                                fragment="is a folder; give a checkpoint file"),
    "encoder-unknown-name": run("run", "--run-config", DATA + " encoder=no_such_vit", *OUT,
                                fragment="Unknown encoder 'no_such_vit'"),
    "encoder-builtin-wrong-size": run("run", "--run-config", DATA + " image-size=64", *OUT,
                                      fragment="pretrained at 32x32"),
    # --- where files go: out-dir and the cache ------------------------------------------------
    "out-dir-is-file": run("run", "--out", "{tmp}/a-file", fragment="out-dir {tmp}/a-file is a file", process=True),
    "out-dir-under-file": run("run", "--out", "{tmp}/a-file/run", fragment="which is a file, not a folder"),
    "out-dir-unwritable": run("run", "--out", "{unwritable}/run", fragment="is not writable"),
    "cache-dir-is-file": run("run", "--run-config", "cache-dir='{tmp}/a-file'", *OUT, fragment="cache-dir {tmp}/a-file is a file"),
    "cache-dir-unwritable": run("run", "--run-config", "cache-dir='{unwritable}/cache'", *OUT,
                                fragment="cache-dir {unwritable}/cache is not writable"),
    # --- a SuperNode's node config (fedsparse check --node-config, what the ClientApp checks) ------
    "node-config-no-partition-id": run("check", "--run-config", DATA, *OUT, "--node-config", "num-partitions=2",
                                       fragment="lacks partition-id"),
    "node-config-id-out-of-range": run("check", "--run-config", DATA, *OUT, "--node-config",
                                       "partition-id=2 num-partitions=2", fragment="partition-id 2 is out of range"),
    "node-config-id-negative": run("check", "--run-config", DATA, *OUT, "--node-config",
                                   "partition-id=-1 num-partitions=2", fragment="partition-id -1 is out of range"),
    "node-config-id-not-integer": run("check", "--run-config", DATA, *OUT, "--node-config",
                                      "partition-id=first num-partitions=2", fragment="partition-id must be an integer"),
    "node-config-zero-partitions": run("check", "--run-config", DATA, *OUT, "--node-config",
                                       "partition-id=0 num-partitions=0", fragment="num-partitions must be >= 1"),
    "node-config-more-partitions-than-images": run("check", "--run-config", DATA, *OUT, "--node-config",
                                                   "partition-id=0 num-partitions=5000",
                                                   fragment="cannot split 16 examples into 5000 partitions"),
}


# --- the catalogue's files --------------------------------------------------------------------


def _image(path: Path, seed: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path)


def _tree(root: Path, layout: dict[str, int]) -> Path:
    """``{"train/cat": 3, "dog": 2}``: that many images in each folder."""
    seed = 0
    for folder, n in layout.items():
        for i in range(n):
            _image(root / folder / f"{i}.png", seed)
            seed += 1
    root.mkdir(parents=True, exist_ok=True)
    return root


def _unwritable(base: Path) -> Path | None:
    """A folder under which nothing can be created here, or None."""
    if os.geteuid() != 0:
        ro = base / "read-only"
        ro.mkdir()
        ro.chmod(0o500)
        return ro
    probe = Path("/sys/fedsparse-bad-input-probe")  # root: /sys refuses new entries
    try:
        probe.mkdir()
    except OSError:
        return Path("/sys")
    probe.rmdir()
    return None


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    import torch

    from fedsparse.config import RunConfig
    from fedsparse.engine.checkpoint import Checkpoint
    from fedsparse.inputs.encoder import build_builtin, save_checkpoint

    tmp = tmp_path_factory.mktemp("bad-input")
    _tree(tmp / "data", {"cat": 10, "dog": 10})  # 16 training images after the 80/20 split
    _tree(tmp / "one-class", {"cat": 4})
    _tree(tmp / "one-class-split", {"train/cat": 3, "test/cat": 1})
    _tree(tmp / "loose", {"": 4})
    _tree(tmp / "differ", {"train/a": 2, "train/b": 2, "test/a": 1, "test/c": 1})
    (tmp / "empty").mkdir()
    for name in ("a", "b"):
        (tmp / "undecodable" / name).mkdir(parents=True)
        for i in range(3):
            (tmp / "undecodable" / name / f"{i}.jpg").write_bytes(os.urandom(300))
    (tmp / "junk.tar.gz").write_bytes(os.urandom(300))
    (tmp / "a-file").write_text("not a folder\n")
    (tmp / "broken.toml").write_text("num-rounds = = 3\n")
    (tmp / "table.toml").write_text("[tool]\nnum-rounds = 3\n")
    (tmp / "unknown.toml").write_text("no-such-key = 1\n")

    (tmp / "random.pth").write_bytes(np.random.default_rng(1).bytes(1000))
    (tmp / "random.safetensors").write_bytes(np.random.default_rng(2).bytes(1000))
    (tmp / "empty.pth").write_bytes(b"")
    model = build_builtin(32)
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight[0, 0] = float("nan")
    save_checkpoint(model, tmp / "nan.pth")
    model = build_builtin(32)
    with torch.no_grad():
        model.norm.weight.fill_(3e38)  # finite weights, infinite features
    save_checkpoint(model, tmp / "overflow.pth")
    torch.save({"weight": torch.zeros(3, 3)}, tmp / "not-vit.pth")

    (tmp / "garbage-run").mkdir()
    (tmp / "garbage-run" / "checkpoint.pt").write_bytes(np.random.default_rng(3).bytes(500))
    cfg = RunConfig(out_dir=str(tmp / "done-run"), num_rounds=3)
    Checkpoint(1, {}, {}, {}, cfg.to_run_config()).save(tmp / "done-run")

    unwritable = _unwritable(tmp)
    return {"tmp": str(tmp), "unwritable": str(unwritable) if unwritable else ""}


def _expand(case: Case, where: dict[str, str]) -> tuple[list[str], str]:
    if "{unwritable}" in " ".join(case.argv) and not where["unwritable"]:
        pytest.skip("no folder here refuses writes (root without a read-only /sys)")
    return [a.format(**where) for a in case.argv], case.fragment.format(**where)


def _assert_one_line(err: str, fragment: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err[-3000:]}"
    assert lines[0].startswith("fedsparse: error: "), lines[0]
    assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert "weights_only" not in lines[0] and "Traceback" not in lines[0], lines[0]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_ends_with_one_line_and_exit_2(name: str, catalogue, capsys, monkeypatch) -> None:
    case = CASES[name]
    argv, fragment = _expand(case, catalogue)

    def tripwire(cfg, engine):
        raise AssertionError(f"{name}: the checks let {argv} through to the {engine} driver")

    monkeypatch.setattr(cli, "run_with_engine", tripwire)
    monkeypatch.setattr(logging.getLogger("fedsparse"), "handlers", [logging.NullHandler()])
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse's own exit
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, f"exit {code}; stderr:\n{err[-3000:]}"
    _assert_one_line(err, fragment)

    if case.process:  # the installed command, in its own process, says the same
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "fedsparse.commands.cli", *argv], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=180)
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        _assert_one_line(proc.stderr, fragment)
        assert "Ray instance" not in proc.stdout + proc.stderr
        assert time.monotonic() - started < 60, "the error came late: something heavy ran first"


def test_catalogue_is_large_and_covers_every_kind() -> None:
    kinds = {"config": "--run-config", "file": ".toml", "data": "data-dir", "checkpoint": ".pth",
             "cache": "cache-dir", "node": "--node-config", "out": "--out"}
    text = {name: " ".join(case.argv) for name, case in CASES.items()}
    assert len(CASES) >= 30
    for kind, marker in kinds.items():
        assert any(marker in t for t in text.values()), kind
    assert sum(case.process for case in CASES.values()) >= 3


def test_client_app_node_partition_is_one_line(monkeypatch) -> None:
    """The ClientApp's own reading of the node config: a missing key is one line."""
    from types import SimpleNamespace

    from clients.client_app import node_partition
    from fedsparse.data.partition import check_partition_id

    with pytest.raises(ValueError, match="partition-id") as err:
        node_partition(SimpleNamespace(node_config={"num-partitions": 2}))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="out of range for num-partitions 2") as err:
        check_partition_id(*node_partition(SimpleNamespace(node_config={"partition-id": 7, "num-partitions": 2})))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"lr": "0.1"}, "'lr' must be float"),
        ({"num_rounds": 2.0}, "'num-rounds' must be int"),
        ({"resume": 1}, "'resume' must be bool"),
        ({"seed": 2**63}, "seed must fit in 64 bits"),
        ({"client_cpus": float("inf")}, "client-cpus must be a finite number"),
        ({"fault_rate": float("nan")}, "fault-rate must be a finite number"),
        ({"data_dir": "a\x00b"}, "data-dir must not contain a NUL character"),
    ],
)
def test_run_config_built_in_python_is_checked_too(changes, fragment) -> None:
    """Callers that build a RunConfig directly (tests, tools) get the same checks."""
    from fedsparse.config import RunConfig

    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        RunConfig(**changes)


@pytest.mark.parametrize(
    "run_config, fragment",
    [({"seed": -1}, "seed must be >= 0"), ({"out-dir": "{tmp}/a-file"}, "out-dir {tmp}/a-file is a file")],
)
def test_server_app_refuses_a_bad_run_with_one_line(run_config, fragment, catalogue) -> None:
    """Under `flwr run` the ServerApp checks the run before its first round. It raises an
    exception (Flower then records the run as finished:failed, with this line as its
    details), not SystemExit, which Flower's simulation thread would swallow as a success."""
    from types import SimpleNamespace

    from strategies.server_app import main

    run_config = {k: v.format(**catalogue) for k, v in run_config.items()} if "out-dir" in run_config else run_config
    with pytest.raises(ValueError) as err:
        main(SimpleNamespace(), SimpleNamespace(run_config=run_config))
    line = str(err.value)
    assert "\n" not in line and line.startswith("fedsparse: error: ")
    assert fragment.format(**catalogue) in line
