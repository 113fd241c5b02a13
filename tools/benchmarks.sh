#!/usr/bin/env bash
# Every measurement in BENCHMARKS.md (offline). Results go to runs/benchmarks/<step>/.
# Run from the repository root, on an otherwise idle machine for the timings.
set -euo pipefail
FS=${FS:-.venv/bin/fedsparse}
OUT=${OUT:-runs/benchmarks}
mkdir -p "$OUT"
step() { echo; echo "=== $1 ($(date +%T))"; }

step "probe: built-in encoder vs random init vs raw pixels (issue 3 quality bar)"
$FS probe --run-config "mask-ratio=0.0" --steps 3000 --out "$OUT/probe.json"

step "bench: built-in encoder, 32x32, bundled sample"
$FS bench configs/quickstart.toml --mask-ratios 0,0.5,0.75,0.9 --extraction-images 512 --speed-images 256 --out "$OUT/bench-builtin"

step "bench: ViT-B/16 (random weights) at 224x224 on RSSCN7"
$FS bench configs/bench-vitb.toml --mask-ratios 0,0.5,0.75,0.9 --extraction-images 256 --speed-images 32 --out "$OUT/bench-vitb"

step "scale: 1,000 clients, 100 per round"
$FS run configs/scale.toml --out "$OUT/scale"

step "overhead: plain loop vs in-process Flower vs Simulation Engine"
$FS overhead configs/scale.toml --clients-per-round-list 10,100,1000 --num-rounds 3 --out "$OUT/overhead"

step "baselines at r = 0.5 on the paper's IST setup: IST, FedAvg and the centralized head"
$FS sweep configs/cifar10-offline.toml --mask-ratios 0.5 --strategies ist,fedavg,centralized --out "$OUT/sweep-offline"

step "sweep: accuracy and storage at the 10 mask ratios, IST and the centralized head (reuses r = 0.5)"
$FS sweep configs/cifar10-offline.toml --strategies ist,centralized --out "$OUT/sweep-offline"

step "IST with and without width scaling at r = 0.5 (plain driver)"
.venv/bin/python tools/ist_scaling.py configs/cifar10-offline.toml "mask-ratio=0.5 out-dir=$OUT/ist-scaling"

step "ablation: fixed masks vs masks drawn anew every round"
$FS sweep configs/quickstart.toml --mask-ratios 0.5 --mask-modes per-image,random --run-config "num-rounds=15" --out "$OUT/ablation"
