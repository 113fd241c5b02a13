"""What reading processes through psutil (``fedsparse.processes``) costs against the ``/proc``
parsers it replaced (docs/benchmarks/processes.md).

    python tools/processes_bench.py --rev 3a7c4c5 --split-rev f179529 --workers 16 --repeats 200 --out runs/processes

The old code is read from git, not copied here: the memory sampler's and the timeline's at
``--rev`` (the commit before ``fedsparse.processes``), ``fedsparse devices``' token scan at
``--split-rev`` (the commit that moved it, unchanged, into ``fedsparse/processes.py``). A tree like a simulation's is started first: one child with ``--workers`` Python
grandchildren (Ray's workers), all carrying a token in their environment. Then, interleaved
``--repeats`` times, each operation old and new:

- ``tree RSS``: a sample of the tree's summed RSS (``ProcessTreeMonitor``'s sampler, every
  second in a simulation; ``MemorySampler`` of ``fedsparse devices``, every 0.2 s per device);
- ``tree RSS + PSS``: the same with the page-table walk (at most 2% of the sampler's time);
- ``token scan``: a run's processes by tree and token (``fedsparse devices`` stopping, the tests);
- ``start time``: a process's start on the wall clock (every ClientApp, once).

Prints and writes (``processes.json``, ``processes.md``) the median of each, and new / old.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedsparse import processes  # noqa: E402
from fedsparse.accounting.memory import tree_sample  # noqa: E402

TOKEN_VAR = "FEDSPARSE_PROCESSES_BENCH_TOKEN"


def old_module(rev: str, path: str, name: str, folder: Path):
    """Module ``path`` as it was at ``rev`` (read with ``git show``), imported under ``name``."""
    source = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    file = folder / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def start_tree(workers: int, token: str) -> subprocess.Popen:
    """One child with ``workers`` sleeping Python grandchildren, all carrying ``token``."""
    script = ("import subprocess, sys, time\n"
              f"ps = [subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']) for _ in range({workers})]\n"
              "print('ok', flush=True)\n"
              "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, TOKEN_VAR: token})
    assert proc.stdout.readline().startswith("ok")
    return proc


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", default="3a7c4c5", help="the commit with the old /proc parsers")
    parser.add_argument("--split-rev", default="f179529", help="the commit with live_pids in fedsparse/processes.py")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", default="runs/processes")
    args = parser.parse_args()

    token = uuid.uuid4().hex
    with tempfile.TemporaryDirectory() as tmp:
        memory = old_module(args.rev, "fedsparse/accounting/memory.py", "old_memory", Path(tmp))
        devices = old_module(args.split_rev, "fedsparse/processes.py", "old_processes", Path(tmp))
        timeline = old_module(args.rev, "fedsparse/accounting/timeline.py", "old_timeline", Path(tmp))
    tree = start_tree(args.workers, token)
    try:
        root = tree.pid
        checks = {"tree RSS": (lambda: memory.tree_sample(root, 0.0, pss=False).processes,
                               lambda: tree_sample(root, 0.0, pss=False).processes),
                  "token scan": (lambda: len(devices.live_pids([root], token, TOKEN_VAR)),
                                 lambda: len(processes.run_processes([root], TOKEN_VAR, token)))}
        for name, (old, new) in checks.items():  # both find the same processes
            assert old() == new() == args.workers + 1, (name, old(), new())
        assert abs(timeline.process_start_time(root) - processes.start_time(root)) < 0.011
        ops = {
            "tree RSS": (lambda: memory.tree_sample(root, 0.0, pss=False), lambda: tree_sample(root, 0.0, pss=False)),
            "tree RSS + PSS": (lambda: memory.tree_sample(root, 0.0), lambda: tree_sample(root, 0.0)),
            "token scan": (lambda: devices.live_pids([root], token, TOKEN_VAR),
                           lambda: processes.run_processes([root], TOKEN_VAR, token)),
            "start time": (lambda: timeline.process_start_time(root), lambda: processes.start_time(root)),
        }
        times = {name: ([], []) for name in ops}
        for _ in range(args.repeats):
            for name, (old, new) in ops.items():
                times[name][0].append(timed(old))
                times[name][1].append(timed(new))
    finally:
        processes.stop(processes.tree(tree.pid)[::-1], grace=5)
        tree.wait()
    machine = len(psutil.pids())
    rows = []
    for name, (old, new) in times.items():
        o, n = statistics.median(old), statistics.median(new)
        rows.append({"operation": name, "old_ms": o * 1e3, "new_ms": n * 1e3, "new_over_old": n / o})
    result = {"rev": args.rev, "split_rev": args.split_rev, "workers": args.workers, "repeats": args.repeats, "processes_on_machine": machine,
              "rows": rows}
    lines = [f"{args.workers + 1} processes in the tree, {machine} on the machine; medians of {args.repeats}, "
             "interleaved", "", "| operation | /proc parsers (ms) | psutil (ms) | psutil / parsers |", "|---|---:|---:|---:|"]
    lines += [f"| {r['operation']} | {r['old_ms']:.3f} | {r['new_ms']:.3f} | {r['new_over_old']:.2f} |" for r in rows]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "processes.json").write_text(json.dumps(result, indent=2))
    (out / "processes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
