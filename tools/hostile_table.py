"""The hostile-reply table of BENCHMARKS.md: each reply of tests/test_hostile.py, the accuracy it
leaves now (run here) beside what it left before the reply checks (docs/benchmarks/hostile-before.json,
measured on commit f10a5ea with the same data, clients and rounds).

    .venv/bin/python tools/hostile_table.py > runs/hostile.md
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import test_hostile as h  # noqa: E402  (the catalogue and its harness)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="fedsparse-hostile-") as tmp:  # its runs are not kept
        table(Path(tmp))


def table(tmp: Path) -> None:
    before = json.loads((ROOT / "docs" / "benchmarks" / "hostile-before.json").read_text())
    data = tmp / "data"
    h._color_images(data, per_class=24, colors={"red": (200, 40, 40), "green": (40, 200, 40),
                                               "blue": (40, 40, 200), "gray": (128, 128, 128)})
    base = h.RunConfig(dataset="imagefolder", data_dir=str(data), encoder="builtin-random", hidden="32,32",
                       num_clients=4, clients_per_round=4, num_rounds=5, local_steps=5, batch_size=16, lr=0.01,
                       cache_dir=str(tmp / "cache"))
    algos = list(h.ALGORITHMS)
    after: dict[str, dict[str, float]] = {a: {} for a in algos}
    for a in algos:
        cfg = base.replace(**h.ALGORITHMS[a])
        ref, _ = h.run(cfg.replace(out_dir=str(tmp / a / "failed")), h.FAILED)
        after[a]["reference"] = ref.final_accuracy
        for i, (case, fn) in enumerate(h.HOSTILE_REPLIES.items()):
            m, _ = h.run(cfg.replace(out_dir=str(tmp / a / str(i))), fn)
            after[a][case] = m.final_accuracy
    print("| hostile reply | " + " | ".join(f"{a} before | {a} now" for a in algos) + " |")
    print("|---|" + "---|---|" * len(algos))
    for case in ["reference"] + list(h.HOSTILE_REPLIES):
        cells = []
        for a in algos:
            b = before[a].get(case, {})
            acc = b.get("accuracy") if isinstance(b, dict) else b
            cells += ["-" if acc is None else f"{acc:.3f}", f"{after[a][case]:.3f}"]
        label = "a failed client (reference)" if case == "reference" else case
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
