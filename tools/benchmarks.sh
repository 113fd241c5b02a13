#!/usr/bin/env bash
# Every measurement in BENCHMARKS.md, in the order it was run (offline; about 80 minutes on
# 2 cores). Results go to runs/benchmarks/<step>/. Run from the repository root.
set -euo pipefail
FS=${FS:-.venv/bin/fedsparse}
OUT=${OUT:-runs/benchmarks}
mkdir -p "$OUT"
step() { echo; echo "=== $1 ($(date +%T))"; }

step "probe: built-in encoder vs random init vs raw pixels (issue 3 quality bar)"
$FS probe --run-config "mask-ratio=0.0" --steps 3000 --out "$OUT/probe.json"

step "bench: built-in encoder, 32x32, bundled sample"
$FS bench configs/quickstart.toml --mask-ratios 0,0.5,0.75,0.9 --images 512 --speed-images 256 --out "$OUT/bench-builtin"

step "bench: ViT-B/16 (random weights) at 224x224 on RSSCN7"
$FS bench configs/bench-vitb.toml --mask-ratios 0,0.5,0.75,0.9 --images 256 --speed-images 32 --out "$OUT/bench-vitb"

step "sweep: the paper's table on the offline CIFAR-10 config, 10 ratios, IST and the centralized head"
$FS sweep configs/cifar10-offline.toml --strategies ist,centralized --out "$OUT/sweep-offline"

step "baselines at r = 0.5: FedAvg next to IST and the centralized head"
$FS sweep configs/cifar10-offline.toml --mask-ratios 0.5 --strategies ist,fedavg,centralized --out "$OUT/sweep-offline"

step "ablation: fixed masks vs masks drawn anew every round (quickstart)"
$FS sweep configs/quickstart.toml --mask-ratios 0.5,0.75 --mask-modes per-image,random --out "$OUT/ablation"

step "scale: 1,000 clients, 100 per round"
$FS run configs/scale.toml --out "$OUT/scale"

step "overhead: plain loop vs in-process Flower vs Simulation Engine"
$FS overhead configs/scale.toml --clients-per-round 10,100,1000 --rounds 3 --out "$OUT/overhead"
