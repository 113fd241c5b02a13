"""``fedsparse hostile CONFIG``: the attack catalogue against one config, one table.

For every hostile fraction of ``--rates`` and every defence of ``--defences``
(``none``: ``clip-factor = 0``, ``min-cosine = -1``, ``group-rule = mean`` and
``outlier-strikes = 0``; ``clip``: the clipping alone, ``min-cosine = -1`` and
``outlier-strikes = 0``; ``default``: the config as it is),
the command runs

- the reference: the same hostile clients failing (``fault-mode = drop``);
- every attack of ``--attacks`` (``fedsparse.attacks.ATTACKS``) by those clients;

and, once per defence, the run without attackers. Each run goes into its own folder
(``<out>/<defence>/<rate>/<attack>``); a finished run of the same config is reused and an
interrupted one resumed (as ``fedsparse sweep`` does), so the table can be built in parts: runs
already in ``<out>`` from earlier calls (other rates, other defences) join the table.

Outputs in ``<out>``: ``hostile.csv`` (one row per run: defence, rate, attack, final and best
accuracy, the difference to the reference of the same defence and rate, replies refused,
updates clipped, updates dropped, clients banned (``fedsparse.engine.outliers``), bytes per client, server seconds per round) and ``hostile.md`` (the table).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Callable, Sequence

from fedsparse.attacks import ATTACKS, DROP
from fedsparse.config import RunConfig
from fedsparse.engine.metrics import RunMetrics

DEFENCES: dict[str, dict[str, Any]] = {
    "none": {"clip_factor": 0.0, "min_cosine": -1.0, "group_rule": "mean", "outlier_strikes": 0},
    "clip": {"min_cosine": -1.0, "outlier_strikes": 0},  # the clipping alone: no direction check, no record
    "default": {},
}
HONEST = "honest"  # the row without attackers


def parse_defences(names: Sequence[str]) -> list[str]:
    bad = [n for n in names if n not in DEFENCES]
    if bad or not names:
        raise ValueError(f"unknown defence(s) {bad or names!r}; valid: {', '.join(DEFENCES)}")
    return list(names)


def parse_attacks(names: Sequence[str]) -> list[str]:
    if list(names) == ["all"]:
        return list(ATTACKS)
    bad = [n for n in names if n not in ATTACKS]
    if bad:
        raise ValueError(f"unknown attack(s) {', '.join(bad)}; valid: all, {', '.join(ATTACKS)}")
    return list(names)


def parse_rates(names: Sequence[str]) -> list[float]:
    try:
        rates = [float(v) for v in names]
    except ValueError:
        raise ValueError(f"--rates must be comma-separated numbers in (0, 1), got {','.join(names)!r}") from None
    if not rates or any(not 0.0 < r < 1.0 for r in rates):
        raise ValueError(f"--rates must be comma-separated numbers in (0, 1), got {','.join(names)!r}")
    return rates


def run_config(cfg: RunConfig, out: Path, defence: str, rate: float, attack: str) -> RunConfig:
    """The config of one cell: ``attack`` (``honest``, ``drop`` or an attack) at ``rate`` under ``defence``."""
    base = cfg.replace(**DEFENCES[defence])
    if attack == HONEST:
        return base.replace(fault_rate=0.0, fault_mode="raise", out_dir=str(out / defence / HONEST))
    return base.replace(fault_rate=rate, fault_mode=attack, out_dir=str(out / defence / f"{rate:g}" / attack))


def cells(defences: Sequence[str], rates: Sequence[float], attacks: Sequence[str]) -> list[tuple[str, float, str]]:
    """Every (defence, rate, attack) to run: per rate the reference first, then the run without
    attackers (last: calls for other rates on the same folder find it done)."""
    out: list[tuple[str, float, str]] = []
    for d in defences:
        for r in rates:
            out += [(d, r, DROP)] + [(d, r, a) for a in attacks]
        out.append((d, 0.0, HONEST))
    return out


def row_of(defence: str, rate: float, attack: str, m: RunMetrics) -> dict[str, Any]:
    rounds = m.rounds
    clipped = sum(sum(1 for c in r.per_client if c.clip_scale not in (None, 0.0, 1.0)) for r in rounds)
    dropped = sum(sum(1 for c in r.per_client if c.clip_scale == 0.0) for r in rounds)
    return {
        "defence": defence, "rate": rate, "attack": attack,
        "final_accuracy": m.final_accuracy, "best_accuracy": m.best_accuracy, "rounds": len(rounds),
        "refused": sum(sum(r.rejected.values()) for r in rounds), "failed": sum(r.failures for r in rounds),
        "clipped": clipped, "dropped": dropped, "banned": len(m.outliers.get("banned", {})),
        "bytes_down_per_client": sum(r.bytes_down_per_client for r in rounds) / max(1, len(rounds)),
        "bytes_up_per_client": sum(r.bytes_up_per_client for r in rounds) / max(1, len(rounds)),
        "model_bytes": m.model_bytes,
        "round_seconds": sum(r.seconds for r in rounds) / max(1, len(rounds)),
    }


def collect(out: Path) -> list[dict[str, Any]]:
    """A row for every finished run under ``out`` (any defence, rate or attack), with its
    difference to the reference (``drop``) of the same defence and rate."""
    rows = []
    for path in sorted(out.glob("*/**/metrics.json")):
        rel = path.parent.relative_to(out).parts
        if rel[0] not in DEFENCES:
            continue
        try:
            m = RunMetrics.load(path.parent)
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            continue
        if not m.finished:
            continue
        if len(rel) == 2 and rel[1] == HONEST:
            rows.append(row_of(rel[0], 0.0, HONEST, m))
        elif len(rel) == 3:
            rows.append(row_of(rel[0], float(rel[1]), rel[2], m))
    ref = {(r["defence"], r["rate"]): r["final_accuracy"] for r in rows if r["attack"] == DROP}
    for r in rows:
        base = ref.get((r["defence"], r["rate"]))
        r["vs_reference"] = (r["final_accuracy"] - base) if base is not None and r["final_accuracy"] is not None \
            and r["attack"] not in (DROP, HONEST) else None
    order = {a: i for i, a in enumerate((HONEST, DROP) + ATTACKS)}
    rows.sort(key=lambda r: (r["rate"], order.get(r["attack"], 99), list(DEFENCES).index(r["defence"])))
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    if not rows:
        return
    fields = list(rows[0])
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def _pct(v: float | None, sign: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:+.1f}" if sign else f"{100 * v:.1f}"


def markdown(rows: list[dict[str, Any]]) -> str:
    """One table: a row per (rate, attack), per defence the final accuracy (%) and its
    difference to the reference in points."""
    defences = [d for d in DEFENCES if any(r["defence"] == d for r in rows)]
    cell = {(r["rate"], r["attack"], r["defence"]): r for r in rows}
    keys = sorted({(r["rate"], r["attack"]) for r in rows},
                  key=lambda k: (k[0], ((HONEST, DROP) + ATTACKS).index(k[1]) if k[1] in (HONEST, DROP) + ATTACKS else 99))
    head = "| hostile | attack | " + " | ".join(f"{d}: accuracy % | {d}: vs reference | {d}: refused, clipped, dropped, banned"
                                               for d in defences) + " |"
    lines = [head, "|---|---|" + "---|---|---|" * len(defences)]
    for rate, attack in keys:
        label = {HONEST: "none (no attacker)", DROP: "the same clients failing (reference)"}.get(attack, attack)
        cells_ = []
        for d in defences:
            r = cell.get((rate, attack, d))
            if r is None:
                cells_ += ["", "", ""]
            else:
                cells_ += [_pct(r["final_accuracy"]), _pct(r["vs_reference"], sign=True), f"{r['refused']}, {r['clipped']}, {r.get('dropped', 0)}, {r.get('banned', 0)}"]
        lines.append(f"| {'-' if attack == HONEST else f'{100 * rate:g}%'} | {label} | " + " | ".join(cells_) + " |")
    return "\n".join(lines) + "\n"


def hostile(cfg: RunConfig, out: Path, rates: Sequence[float], attacks: Sequence[str], defences: Sequence[str],
            engine: str = "plain", report: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run every cell (reusing finished runs), then write ``hostile.csv`` and ``hostile.md``
    from every finished run under ``out``; returns the rows."""
    from fedsparse.commands.sweep import federated

    todo = cells(defences, rates, attacks)
    for i, (d, r, a) in enumerate(todo, 1):
        c = run_config(cfg, out, d, r, a)
        m = federated(c, engine)
        report(f"[{i}/{len(todo)}] defence {d}, {100 * r:g}% hostile, {a}: final accuracy {m.final_accuracy}")
    rows = collect(out)
    write_csv(rows, out / "hostile.csv")
    (out / "hostile.md").write_text(markdown(rows))
    return rows
