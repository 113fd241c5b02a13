"""What Flower's Simulation Engine pays per virtual SuperNode before the first round
(docs/benchmarks/scaling.md): it registers every one of the N clients in the in-memory LinkState
and gives each a Context holding its own copy of the run config, read from the app directory
once per node (flwr 1.42: ``vce_api._register_nodes`` and ``_register_node_info_stores``).

    python tools/flower_nodes_cost.py --nodes 1000,10000,100000

Each N in a fresh process: seconds for the two steps, and the RSS they added.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ONE = """
import json, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, {root!r})
from fedsparse.config import RunConfig
from fedsparse.processes import rss
from strategies.simulation import write_app_dir
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
from flwr.superlink.federation import NoOpFederationManager
from flwr.supercore.run import Run

n = int(sys.argv[1])
tmp = tempfile.TemporaryDirectory()
app = write_app_dir(RunConfig(num_clients=max(n, 20)), Path(tmp.name))
factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
run = Run.create_empty(run_id=1)
r0, t0 = rss(), time.perf_counter()
mapping = vce_api._register_nodes(n, factory)
r1, t1 = rss(), time.perf_counter()
stores = vce_api._register_node_info_stores(mapping, run, str(app))
r2, t2 = rss(), time.perf_counter()
print(json.dumps({{"nodes": n, "register_seconds": t1 - t0, "register_rss_bytes": r1 - r0,
                  "contexts_seconds": t2 - t1, "contexts_rss_bytes": r2 - r1}}))
tmp.cleanup()
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", default="1000,10000,100000")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    rows = []
    for n in (int(x) for x in args.nodes.split(",")):
        done = subprocess.run([sys.executable, "-c", ONE.format(root=str(ROOT)), str(n)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise SystemExit(f"{n} nodes: {done.stderr.strip().splitlines()[-1]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{n:>9,} nodes: register {r['register_seconds']:.2f} s, {r['register_rss_bytes'] / 2**20:.0f} MiB; "
              f"contexts {r['contexts_seconds']:.2f} s, {r['contexts_rss_bytes'] / 2**20:.0f} MiB "
              f"({(r['register_rss_bytes'] + r['contexts_rss_bytes']) / n / 1024:.1f} KiB per node)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
