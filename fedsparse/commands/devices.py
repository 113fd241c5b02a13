"""``fedsparse devices``: emulated devices on one machine, on Flower's Deployment Engine.

It starts a SuperLink and one SuperNode per device on 127.0.0.1 (plaintext, free ports, a
private ``FLWR_HOME`` each), every SuperNode under an operating-system limit that matches its
profile (``fedsparse.profiles``), with its own image folder, runs ``flwr run`` for a few
rounds, and reports per device: the measured peak memory against its budget, seconds spent
extracting features and training, bytes down and up, and whether it failed. It stops every
process it started, also on Ctrl-C or an error, and checks that none is left.

Limits (``fedsparse.limits``): a memory and CPU cgroup per device where this process may create
them, else ``RLIMIT_AS`` and CPU affinity on its SuperNode; every SuperNode gets
``OMP_NUM_THREADS = threads``. What was enforced is written into the report (``limits``). The
processes are started and stopped by ``fedsparse.local_deployment.Processes``.

Every process gets ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL = SUPEREXEC_POLL_SECONDS`` (unless the
environment sets it): the SuperExec then starts a ClientApp within 0.1 s of the message's arrival
instead of within Flower's default 1 s (docs/deployment.md, "What a round costs").

Data: ``--data-dir`` in the layout of ``partitioner = "folders"`` (one sub-folder per device,
``<device>/<class>/<image>``, and ``test/`` for the server), or, without it, a seeded split of
the bundled CIFAR-10 sample into one folder per device (``--images-per-device`` each, every class) and a
test folder. Each SuperNode names its folder in its node config (``data-dir``), with
``client-id`` = its index and ``profile`` = its profile.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fedsparse.accounting.memory import MemorySampler
from fedsparse.config import RunConfig, run_config_arg, toml_text
from fedsparse.data.partition import split_sample
from fedsparse.errors import one_line
from fedsparse.limits import Limits
from fedsparse.local_deployment import HOST, Processes, free_ports
from fedsparse.local_deployment import executable as _exe

# The bin folder of another Python environment for the SuperNodes (e.g. a lean one: CPU-only torch,
# no timm; docs/deployment.md): they then run its flower-supernode, flower-superexec and
# flwr-clientapp. With a hub encoder (timm), every device's features are extracted here ahead of
# the run (such an install cannot extract them); the built-in encoder and checkpoint files need
# no timm.
NODE_BIN_VAR = "FEDSPARSE_DEVICES_NODE_BIN"
CONNECTION = "fedsparse-devices"
SUPEREXEC_POLL_VAR = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # Flower 1.42's SuperExec: seconds between task polls
SUPEREXEC_POLL_SECONDS = 0.1  # Flower's default is 1.0
REPO = Path(__file__).resolve().parents[2]


# --- devices -------------------------------------------------------------------------------------------


@dataclass
class Device:
    index: int
    profile: Any  # fedsparse.profiles.Profile
    data_dir: Path
    images: int = 0
    limit_mib: int = 0
    cgroups: list[Path] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    name: str = ""
    sampled_peak_bytes: int = 0  # summed RSS of the SuperNode's process tree, sampled
    samples: list[tuple[float, int]] = field(default_factory=list)  # (wall clock, summed RSS), every sample
    refused: str = ""  # why the server did not use it (its identity query failed), from the server's log
    features: str = "on device"  # or "prepared ahead": extracted here before the run (prepare_features)

    @property
    def label(self) -> str:
        return f"device-{self.index}"


def parse_profiles(text: str) -> list[Any]:
    """``"tiny,small,large"`` -> their ``Profile``s (one device each); one line on a bad name."""
    from fedsparse.profiles import PROFILES

    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError("--profiles is empty; name one profile per device, e.g. tiny,small,large")
    unknown = [n for n in names if n not in PROFILES]
    if unknown:
        raise ValueError(f"--profiles: unknown profile {unknown[0]!r}; valid: {', '.join(PROFILES)}")
    return [PROFILES[n] for n in names]


# --- the command ----------------------------------------------------------------------------------


def parse_limits(text: str, n: int) -> list[int]:
    """``--memory-limit-mib "300,0"``: one number per device, 0 = from its profile."""
    if not text.strip():
        return [0] * n
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--memory-limit-mib must be comma-separated integers (MiB, 0 = the profile's), got {text!r}") from None
    if len(values) != n or min(values) < 0:
        raise ValueError(f"--memory-limit-mib needs {n} integers >= 0 (one per device), got {text!r}")
    return values


def devices_run(cfg: RunConfig, profiles: list[Any], out: Path, data_dir: str = "", images: int = 100,
                test_images: int = 200, run_timeout: float = 1200.0, limits: str = "auto",
                report: Callable[[str], None] = print, memory_limits: list[int] | None = None,
                client_worker: bool = False) -> dict[str, Any]:
    """Run ``cfg`` (its rounds, head, encoder) on one emulated SuperNode per profile; write
    ``out/devices.json`` and ``out/devices.md``; returns the report. ``memory_limits``: per
    device, an operating-system memory limit in MiB that replaces budget + overhead (0: keep it),
    to emulate a device with less memory than its profile says. ``client_worker``: every
    SuperNode's node config says ``client-worker = true`` (``clients.worker``).

    The report has each device's peaks in the first round (features extracted) and in the
    rounds after it (features cached), and the rounds' timeline (``timeline``: the median round,
    the slowest client's work, the overhead, and each part from the push to the reply's arrival;
    ``fedsparse.accounting.timeline``)."""
    from fedsparse.data.datasets import client_folders

    if not (REPO / "pyproject.toml").is_file():
        raise ValueError(f"fedsparse devices runs `flwr run` on the app folder, but {REPO} has no pyproject.toml "
                         "(use a source checkout: pip install -e .)")
    out = out.resolve()
    if data_dir:
        names, root = client_folders(str(Path(data_dir).expanduser().resolve()), cfg.cache_dir)
        if len(names) != len(profiles):
            raise ValueError(f"--data-dir {root} holds {len(names)} device folders ({', '.join(names)}) "
                             f"for {len(profiles)} profiles; give one folder per device")
        folders = [root / n for n in names]
    else:
        report(f"splitting the bundled sample: {len(profiles)} devices x {images} images, {test_images} test images")
        root = split_sample(out / "data", len(profiles), images, test_images, cfg.seed, cfg.cache_dir)
        folders = [root / f"device-{i}" for i in range(len(profiles))]
        if not cfg.classes:  # the sample's ten classes, even where a small split misses one
            from fedsparse.data.datasets import load_splits

            cfg = cfg.replace(classes=",".join(load_splits("cifar10-sample", "", cfg.cache_dir)[1].classes))
    run_cfg = cfg.replace(
        dataset="imagefolder", data_dir=str(root), partitioner="folders", num_clients=len(profiles),
        clients_per_round=len(profiles), subnets_per_round=0, out_dir=str(out / "run"),
        cache_dir=cfg.cache_dir or str(out / "cache"),
    )
    from fedsparse.task import client_images, preflight

    preflight(run_cfg, partitions=False)
    node_bin = os.environ.get(NODE_BIN_VAR, "")
    if node_bin and not (Path(node_bin) / "flower-supernode").is_file():
        raise ValueError(f"${NODE_BIN_VAR} = {node_bin}: no flower-supernode there; name the bin folder of an "
                         "environment with flwr installed")
    from fedsparse.inputs.encoder import builds_with_timm

    lean = bool(node_bin) and builds_with_timm(run_cfg.encoder)  # the devices' install cannot build the encoder
    devices = []
    for i, (profile, folder) in enumerate(zip(profiles, folders)):
        d = Device(i, profile, folder, len(client_images(run_cfg, 0, 1, str(folder))))
        d.limit_mib = (memory_limits or [0] * len(profiles))[i] or profile.memory_mib
        if prepare_features(run_cfg, d, always=lean):
            report(f"{d.label}: features extracted here ahead of the run ({'its install has no timm' if lean else f'its {d.profile.name} profile cannot extract them within its memory'}; "
                   "a lean device's setup step, docs/deployment.md)")
        devices.append(d)

    lim = Limits(f"fedsparse-devices-{os.getpid()}", limits)
    procs = Processes(out)
    sampler = MemorySampler(devices)
    report(f"limits: {lim.describe()}")
    started = time.monotonic()
    run_log = ""
    poll = {SUPEREXEC_POLL_VAR: os.environ.get(SUPEREXEC_POLL_VAR, str(SUPEREXEC_POLL_SECONDS))}
    if client_worker and len(str(out / "workers")) <= 56:  # the workers' sockets and logs with the run's
        poll["FEDSPARSE_CLIENT_WORKER_DIR"] = str(out / "workers")  # (a socket's path has at most 107 bytes)
    try:
        link_port, *node_ports = free_ports(1 + len(devices))
        procs.spawn("superlink", [_exe("flower-superlink"), "--insecure", "--host", HOST, "--port", str(link_port),
                                  "--disable-runtime-dependency-installation"], out / "flwr-home" / "superlink", poll)
        procs.wait_listening("superlink", link_port)
        for d, port in zip(devices, node_ports):
            lim.prepare(d)
            d.name = f"supernode-{d.index}-{d.profile.name}"
            node_config = run_config_arg({"data-dir": str(d.data_dir), "client-id": d.index, "profile": d.profile.name,
                                          **({"client-worker": True} if client_worker else {})})
            threads = str(d.profile.threads)
            node_env = {"PATH": f"{node_bin}{os.pathsep}{os.environ.get('PATH', '')}"} if node_bin else {}
            d.proc = procs.spawn(
                d.name, [str(Path(node_bin) / "flower-supernode") if node_bin else _exe("flower-supernode"),
                         "--insecure", "--superlink", f"{HOST}:{link_port}", "--host", HOST,
                         "--port", str(port), "--node-config", node_config],
                out / "flwr-home" / d.name, {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, **poll, **node_env},
                preexec=lim.preexec(d))
            how = "the profile's memory" if d.limit_mib == d.profile.memory_mib else "--memory-limit-mib"
            report(f"{d.label}: profile {d.profile.name}, {d.images} images in {d.data_dir}, "
                   f"memory limit {d.limit_mib} MiB ({how}), {d.profile.threads} threads")
        cli_home = out / "flwr-home" / "cli"
        cli_home.mkdir(parents=True, exist_ok=True)
        (cli_home / "config.toml").write_text(
            toml_text({"superlink": {CONNECTION: {"address": f"{HOST}:{link_port}", "insecure": True}}}))
        sampler.start()
        values = {k: v for k, v in run_cfg.to_run_config().items() if v != RunConfig().to_run_config()[k]}
        flwr = procs.spawn("flwr-run", [_exe("flwr"), "run", str(REPO), CONNECTION, "--stream", "--run-config",
                                        run_config_arg(values)], cli_home)
        report(f"flwr run: {run_cfg.num_rounds} rounds on {len(devices)} SuperNodes (log: {procs.logs / 'flwr-run.log'})")
        try:
            flwr.wait(timeout=run_timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"flwr run still running after {run_timeout:.0f}s; see {procs.logs}") from None
        run_log = procs.log("flwr-run")
    finally:
        sampler.done.set()
        left = procs.stop()
        peaks = {d.index: lim.peak_bytes(d) for d in devices}
        ooms = {d.index: lim.oom_kills(d) for d in devices}
        cgroups_left = lim.release(devices)
    if left:
        raise RuntimeError(f"processes still alive after SIGKILL: {left}")
    if cgroups_left:
        report(f"warning: cgroups not removed: {cgroups_left}")
    metrics_path = out / "run" / "metrics.json"
    if not metrics_path.is_file():
        tail = " ".join(run_log.split()[-40:])
        raise RuntimeError(f"the run wrote no {metrics_path}; flwr run said: {tail}")
    # a node whose identity query failed (e.g. its ClientApp was killed at its memory limit) is
    # never sampled: metrics.json names it with the reason (refused_nodes; the server's log says
    # "node <id> is not used: <reason>" too)
    metrics = json.loads(metrics_path.read_text())
    refused = {**dict(re.findall(r"node (\d+) is not used: (.*)", run_log)), **metrics.get("refused_nodes", {})}
    for d in devices:
        m = re.search(r"SuperNode ID: (\d+)", procs.log(d.name))
        d.refused = one_line(refused.get(m.group(1), "")) if m else ""
    result = summarize(metrics, devices, peaks, ooms, lim, time.monotonic() - started, client_worker)
    (out / "devices.json").write_text(json.dumps(result, indent=2))
    (out / "devices.md").write_text(markdown(result))
    report(markdown(result))
    return result


def prepare_features(cfg: RunConfig, device: Device, always: bool = False) -> bool:
    """Fill ``device``'s feature cache here, before the run, when its profile predicts that
    extracting them on the device would not fit its memory (``fit_profile``: the encoder on
    top of the ClientApp); a device that can, extracts in its first round. Returns whether it
    did (``device.features`` says so in the report). ``always``: whatever the prediction (the
    devices run an install without timm, and the encoder is a hub model)."""
    from fedsparse.accounting.budget import MemoryBudgetError
    from fedsparse.inputs.features import encoder_batch, encoder_ref
    from fedsparse.profiles import fit_profile
    from fedsparse.task import client_features, run_classes

    profile = device.profile
    run = cfg.replace(mask_ratio=profile.mask_ratio, encoder_dtype=profile.encoder_dtype)
    if client_features(run, 0, 1, 1, data_dir=str(device.data_dir), cache_only=True) is not None:
        return False
    dims = (encoder_ref(cfg.encoder, cfg.image_size).dim,
            *[max(1, round(h * profile.width)) for h in cfg.hidden_sizes], len(run_classes(cfg)))
    try:
        fit_profile(cfg, profile, dims, profile.batch_size, cached=False)
        if not always:
            return False
    except MemoryBudgetError:
        pass
    with encoder_batch(profile.encoder_batch):
        client_features(run, 0, 1, 1, data_dir=str(device.data_dir))
    device.features = "prepared ahead"
    return True


def summarize(metrics: dict[str, Any], devices: list[Device], peaks: dict[int, int | None],
              ooms: dict[int, int | None], lim: Limits, seconds: float, client_worker: bool = False) -> dict[str, Any]:
    """Per device, over the run's rounds: what its replies reported and what was measured here
    (peaks overall, in the first round and in the rounds after it); and the rounds' timeline."""
    from fedsparse.accounting.timeline import summarize_rounds

    rounds = metrics.get("rounds", [])
    # the first round ends when the second is pushed: samples before it are the first round's
    split = rounds[1].get("pushed_at") if len(rounds) > 1 else None
    rows = []
    for d in devices:
        recs = [c for r in rounds for c in r.get("per_client", []) if c.get("client") == d.index]
        ok = [c for c in recs if c.get("status") == "ok"]
        failed = [c for c in recs if c.get("status") != "ok"]
        client_peak = max((c["peak_rss_bytes"] for c in recs if c.get("peak_rss_bytes")), default=None)
        first = [c for c in (rounds[0].get("per_client", []) if rounds else []) if c.get("client") == d.index]
        later = [c for r in rounds[1:] for c in r.get("per_client", []) if c.get("client") == d.index]

        def peak_mib(cs: list[dict[str, Any]]) -> float | None:
            top = max((c["peak_rss_bytes"] for c in cs if c.get("peak_rss_bytes")), default=None)
            return top / 2**20 if top else None

        def node_mib(before: bool) -> float | None:
            if split is None:
                return None
            top = max((b for t, b in d.samples if (t < split) == before), default=0)
            return top / 2**20 if top else None
        rows.append({
            "device": d.label, "profile": d.profile.name, "images": d.images, "features": d.features,
            "budget_mib": d.profile.memory_mib, "limit_mib": d.limit_mib, "threads": d.profile.threads,
            "client_peak_rss_mib": client_peak / 2**20 if client_peak else None,
            "node_peak_rss_mib": d.sampled_peak_bytes / 2**20 if d.sampled_peak_bytes else None,
            "client_peak_rss_first_mib": peak_mib(first), "client_peak_rss_cached_mib": peak_mib(later),
            "node_peak_rss_first_mib": node_mib(True), "node_peak_rss_cached_mib": node_mib(False),
            "cgroup_peak_mib": peaks[d.index] / 2**20 if peaks.get(d.index) else None,
            "oom_kills": ooms.get(d.index),
            "extract_seconds": sum(c.get("extract_seconds", 0.0) for c in ok),
            "train_seconds": sum(c.get("train_seconds", 0.0) for c in ok),
            "bytes_down": int(sum(c.get("bytes_down") or 0 for c in recs)),
            "bytes_up": int(sum(c.get("bytes_sent", 0) for c in ok)),
            "rounds_ok": len(ok), "rounds_failed": len(failed),
            "status": "ok" if recs and not failed else
                      (("refused" if d.refused else "no round") if not recs else
                       f"failed {len(failed)}/{len(recs)}: {failed[-1].get('status')}"),
            "reasons": sorted({c.get("reason", "") for c in failed} | ({f"identity query: {d.refused}"} if d.refused else set())),
        })
    finals = [r["accuracy"] for r in rounds if r.get("accuracy") is not None]
    return {"limits": lim.kind, "limits_detail": lim.describe(), "rounds": len(rounds), "client_worker": client_worker,
            "finished": metrics.get("finished"), "final_accuracy": finals[-1] if finals else None,
            "seconds": seconds, "devices": rows, "timeline": summarize_rounds(rounds),
            "round_seconds": [{"round": r["round"], "seconds": r["seconds"], "work_seconds": r.get("work_seconds"),
                               "overhead_seconds": r.get("overhead_seconds")} for r in rounds]}


def markdown(result: dict[str, Any]) -> str:
    def mib(v: float | None) -> str:
        return "-" if v is None else f"{v:,.0f}"

    lines = [
        f"{result['rounds']} rounds, final accuracy "
        f"{'-' if result['final_accuracy'] is None else format(result['final_accuracy'], '.4f')}, "
        f"{result['seconds']:.0f} s; limits: {result['limits_detail']}"
        f"{'; client worker on' if result.get('client_worker') else ''}",
        "",
        "| device | profile | images | budget MiB | limit MiB | client peak MiB | SuperNode peak MiB | cgroup peak MiB "
        "| extract s | train s | bytes down | bytes up | status |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["devices"]:
        lines.append(
            f"| {r['device']} | {r['profile']} | {r['images']} | {r['budget_mib']:,} | {r['limit_mib']:,} | "
            f"{mib(r['client_peak_rss_mib'])} | {mib(r['node_peak_rss_mib'])} | {mib(r['cgroup_peak_mib'])} | "
            f"{r['extract_seconds']:.1f} | {r['train_seconds']:.2f} | {r['bytes_down']:,} | {r['bytes_up']:,} | "
            f"{r['status']}{' (OOM-killed ' + str(r['oom_kills']) + 'x)' if r.get('oom_kills') else ''} |")
    lines += ["", "Memory, first round (features extracted) / rounds after it (features cached), MiB:", "",
              "| device | profile | features | limit | ClientApp first | ClientApp cached | SuperNode first | SuperNode cached |",
              "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in result["devices"]:
        lines.append(f"| {r['device']} | {r['profile']} | {r.get('features', '-')} | {r['limit_mib']:,} | "
                     f"{mib(r.get('client_peak_rss_first_mib'))} | "
                     f"{mib(r.get('client_peak_rss_cached_mib'))} | {mib(r.get('node_peak_rss_first_mib'))} | "
                     f"{mib(r.get('node_peak_rss_cached_mib'))} |")
    lines += timeline_lines(result.get("timeline", {}))
    for r in result["devices"]:
        for reason in r["reasons"]:
            lines.append(f"\n{r['device']}: {reason}")
    return "\n".join(lines) + "\n"


def timeline_lines(timeline: dict[str, Any]) -> list[str]:
    """The timeline table of the report: medians over all rounds and over the rounds after the first."""
    from fedsparse.accounting.timeline import PARTS

    if not timeline:
        return []

    def sec(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    cols = [("all", "all rounds"), ("after_first", "rounds after the first")]
    lines = ["", "Round timeline, medians in seconds (overhead = round - slowest client's work; parts: from the "
             "push to each reply's arrival, over every client):", "",
             "| | " + " | ".join(name for _, name in cols) + " |", "|---|" + "---:|" * len(cols)]
    rows = [("rounds", lambda t: str(t["rounds"])), ("round", lambda t: sec(t["round_seconds_median"])),
            ("slowest client's work", lambda t: sec(t["work_seconds_median"])),
            ("**overhead**", lambda t: sec(t["overhead_seconds_median"]))]
    rows += [(f"{part} ({a} -> {b})", lambda t, part=part: sec(t["parts_median"].get(part)))
             for part, (a, b) in PARTS.items()]
    for label, get in rows:
        lines.append(f"| {label} | " + " | ".join(get(timeline[k]) for k, _ in cols) + " |")
    return lines
