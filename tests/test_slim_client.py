"""A slim client: the ClientApp needs neither Ray nor matplotlib, and the Simulation Engine
without Ray (a client-only install, ``pip install fedsparse`` without the ``simulation``
extra) fails with one line that says how to get it.

Each check runs in a fresh interpreter, so that modules this test session has already
imported (pytest plugins, other tests) cannot hide or fake an import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("ray", "matplotlib")  # simulation-only (Ray) and server-only (accuracy.png)

# A real training round through the ClientApp, in this process: what a SuperNode's
# flwr-clientapp process does with a train message (argv: run config as JSON).
TRAIN_ONE_ROUND = r"""
import json, sys
WATCHED = set(sys.argv[2].split(",")) | {"torch"}  # torch: present, so the check can see a module
import clients.client_app as client_app_module
imported = sorted({m.split(".")[0] for m in sys.modules} & WATCHED)

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from fedsparse.config import RunConfig
from fedsparse.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, NUM_EXAMPLES_KEY, PEAK_RSS_KEY
from fedsparse.task import initial_head
from strategies.flower_internals import set_task_identity

set_task_identity()
cfg = RunConfig.from_run_config(json.loads(sys.argv[1]))
state = initial_head(cfg, 192, 2).state_dict()
conf = ConfigRecord({"server-round": 1, "local-steps": 3, "lr": 1e-3, "batch-size": 4})
msg = Message(content=RecordDict({ARRAYS_KEY: ArrayRecord(state), CONFIG_KEY: conf}), dst_node_id=7,
              message_type=MessageType.TRAIN)
ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(),
              run_config=cfg.to_run_config())
query = client_app_module.app(Message(content=RecordDict(), dst_node_id=7, message_type=MessageType.QUERY), ctx)
assert not query.has_error(), query.error
after_query = sorted({m.split(".")[0] for m in sys.modules} & WATCHED)
reply = client_app_module.app(msg, ctx)
assert not reply.has_error(), reply.error
metrics = reply.content[METRICS_KEY]
print(json.dumps({
    "at_import": imported,
    "after_query": after_query,
    "after_round": sorted({m.split(".")[0] for m in sys.modules} & WATCHED),
    "examples": metrics[NUM_EXAMPLES_KEY],
    "peak_rss": metrics[PEAK_RSS_KEY],
}))
"""


def _python(code: str, *args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_client_app_imports_neither_ray_nor_matplotlib() -> None:
    code = ("import json, sys\nimport clients.client_app\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in sys.argv[1].split(','))))")
    proc = _python(code, ",".join(HEAVY))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [], "imported by clients.client_app"


def test_client_app_trains_a_round_without_ray_or_matplotlib(tmp_path, make_image_tree) -> None:
    """A training round, Ray and matplotlib made unimportable: the ClientApp still answers,
    and neither was imported along the way."""
    data = make_image_tree(tmp_path / "data", {"train": 4, "test": 1})
    run_config = {"dataset": "imagefolder", "data-dir": str(data), "cache-dir": str(tmp_path / "cache"),
                  "hidden": "16,16", "num-clients": 2, "clients-per-round": 2}
    blocker = "import sys\nfor m in sys.argv[2].split(','):\n    sys.modules[m] = None  # import m raises\n"
    # blocked: a hidden import would fail the round; not blocked: one would show in sys.modules
    for code in (blocker + TRAIN_ONE_ROUND, TRAIN_ONE_ROUND):
        proc = _python(code, json.dumps(run_config), ",".join(HEAVY))
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        assert report["examples"] == 4, report  # 2 classes x 4 images, half of them
        if code == TRAIN_ONE_ROUND:
            assert report["at_import"] == ["torch"] and report["after_round"] == ["torch"], report
            assert report["peak_rss"] > 0


LEAN = ("timm", "torchvision", "sympy")  # the encoder's stack, and what torch._dynamo imports


def test_cached_round_and_identity_query_import_neither_timm_nor_torchvision(tmp_path, make_image_tree) -> None:
    """A client with the built-in encoder imports neither timm nor torchvision nor
    torch._dynamo (whose sympy torch.optim's Adam pulls in): not in its first round, which
    extracts the features with fedsparse's own ViT, nor, once they are cached, in an identity
    query and a training round (the encoder is named from its checkpoint, not built). With
    them made unimportable every round still trains, and without that none shows in
    ``sys.modules``, where torch does (the check is not vacuous)."""
    data = make_image_tree(tmp_path / "data", {"train": 4, "test": 1})
    run_config = {"dataset": "imagefolder", "data-dir": str(data), "cache-dir": str(tmp_path / "cache"),
                  "hidden": "16,16", "num-clients": 2, "clients-per-round": 2}
    blocker = "import sys\nfor m in sys.argv[2].split(','):\n    sys.modules[m] = None  # import m raises\n"
    first = _python(blocker + TRAIN_ONE_ROUND, json.dumps(run_config), ",".join(LEAN))  # extracts: cold cache
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert json.loads(first.stdout.strip().splitlines()[-1])["examples"] == 4
    assert list((tmp_path / "cache").rglob("*.pt")), "the first round wrote no feature-cache entry"
    for code in (blocker + TRAIN_ONE_ROUND, TRAIN_ONE_ROUND):
        proc = _python(code, json.dumps(run_config), ",".join(LEAN))
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        assert report["examples"] == 4, report
        if code == TRAIN_ONE_ROUND:
            assert report["at_import"] == report["after_query"] == report["after_round"] == ["torch"], report


def test_simulation_without_ray_says_to_install_the_extra(tmp_path, make_image_tree) -> None:
    """``fedsparse run`` on the Simulation Engine where Ray cannot be imported: exit status 2
    and one line naming ``fedsparse[simulation]``, no traceback, nothing written."""
    data = make_image_tree(tmp_path / "data", {"train": 4, "test": 1})
    overrides = (f"dataset='imagefolder' data-dir='{data}' cache-dir='{tmp_path / 'cache'}' hidden='8,8' "
                 "num-clients=2 clients-per-round=2 num-rounds=1")
    code = ("import sys\nsys.modules['ray'] = None  # as if Ray were not installed\n"
            "from fedsparse.commands.cli import main\nsys.exit(main(sys.argv[1:]))")
    out = tmp_path / "out"
    proc = _python(code, "run", "--run-config", overrides, "--out", str(out))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("fedsparse: error: ") and "fedsparse[simulation]" in errors[0], errors
    assert not (out / "metrics.json").exists()


def _install_closure(requirements: list[str], extras: tuple[str, ...] = ()) -> set[str]:
    """The distributions ``pip install`` of ``requirements`` brings in, walked through the
    metadata of the installed distributions (offline; an uninstalled one ends its branch)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found: set[str] = set()
    stack = [(Requirement(r), extras) for r in requirements]
    while stack:
        req, parent_extras = stack.pop()
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in ("", *parent_extras)):
            continue
        name = canonicalize_name(req.name)
        key = f"{name}[{','.join(sorted(req.extras))}]"
        if key in found:
            continue
        found.add(key)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        stack.extend((Requirement(r), tuple(req.extras)) for r in requires)
    return {k.split("[")[0] for k in found}


def test_core_install_has_no_ray_and_the_simulation_extra_does() -> None:
    """``pip install fedsparse`` (a client, a Deployment Engine SuperLink) brings no Ray;
    ``fedsparse[simulation]`` does, through ``flwr[simulation]`` pinned to the same flwr minor."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core, simulation = project["dependencies"], project["optional-dependencies"]["simulation"]
    flwr_pins = [r for r in core + simulation if r.startswith("flwr")]
    assert flwr_pins == ["flwr>=1.42,<1.43", "flwr[simulation]>=1.42,<1.43"], flwr_pins
    assert "ray" not in _install_closure(core)
    assert "ray" in _install_closure(core + simulation)
