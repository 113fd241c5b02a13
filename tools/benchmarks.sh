#!/usr/bin/env bash
# The measurements of BENCHMARKS.md, by section: each section_NAME below runs exactly the
# commands that BENCHMARKS.md's section of that name shows. Offline.
#
#   tools/benchmarks.sh bench paper    the sections named, in the order given
#   tools/benchmarks.sh [all]          every section, in BENCHMARKS.md's order
#
# Results go to runs/benchmarks/ (OUT=dir to change). For timings, run on an otherwise idle
# machine. The sections on configs/scale.toml read CIFAR-10 from $CIFAR10 (class folders or
# the archives; default ../shared/data/cifar10) and, when set, cache features in $CACHE_DIR.
set -euo pipefail
SECTIONS=(bench paper skew robustness devices profiles overhead scaling)

section_bench() {
    fedsparse bench configs/bench-vitb.toml --mask-ratios 0,0.5,0.75,0.9 --extraction-images 128 --speed-images 32 --out "$OUT/bench-vitb"
    fedsparse bench configs/quickstart.toml --mask-ratios 0,0.5,0.75,0.9 --extraction-images 512 --speed-images 256 --out "$OUT/bench-builtin"
}

section_paper() {
    fedsparse sweep configs/cifar10-offline.toml --strategies ist,centralized --engine plain --out "$OUT/paper"
}

section_skew() {
    fedsparse sweep configs/scale.toml --mask-ratios 0.5 --partitions 0.1,0.5,1,iid --engine plain \
        --strategies "ist,ist-authors,fedavg,fedavg(local-steps=5),fed3r,fedncm,ceiling-ridge,ceiling-residual,ceiling-mlp" \
        --run-config "$RC" --out "$OUT/heterogeneity"
    fedsparse sweep configs/cifar10-offline.toml --mask-ratios 0.5 --strategies ist,fedavg,centralized --out "$OUT/baselines"
}

section_robustness() {
    # sized down: 6 rounds of 20 clients, the closed form on the features alone and the residual MLP
    # at lr (with the default random features nearly every client of these rounds only sends statistics)
    fedsparse hostile configs/scale.toml --rates 0.1,0.2 --defences none,default --run-config "$RC" \
        --run-config "clients-per-round=20 num-rounds=6 eval-every=6 save-seconds=600.0 ridge-features=0 residual-lr=0.001" --out "$OUT/robustness"
    fedsparse hostile configs/scale.toml --rates 0.3 --defences none,clip,default --run-config "$RC" \
        --run-config "clients-per-round=20 num-rounds=6 eval-every=6 save-seconds=600.0 ridge-features=0 residual-lr=0.001" --out "$OUT/robustness"
    fedsparse hostile configs/scale.toml --rates 0.2 --defences default,none --run-config "$RC" \
        --run-config "eval-every=50 save-seconds=600.0" --out "$OUT/robustness-full"
    python tools/hostile_table.py > "$OUT/hostile.md"
}

section_devices() {
    # the closed form on the features alone, as measured (BENCHMARKS.md section 5)
    fedsparse devices --profiles tiny,small --num-rounds 10 --run-config "ridge-features=0 residual-lr=0.001" --out "$OUT/devices"
    fedsparse devices --profiles tiny,small --num-rounds 10 --client-worker --run-config "ridge-features=0 residual-lr=0.001" --out "$OUT/devices-worker"
}

section_profiles() {
    python tools/bench_profiles.py --out "$OUT/profiles" --seeds 0 1 2 3 4 --scaling width
}

section_overhead() {
    fedsparse overhead configs/cifar10-offline.toml --clients-per-round-list 2 --num-rounds 60 --engines plain,in-process,simulation,reference --repeats 4 --run-config "eval-every=1000" --out "$OUT/overhead"
}

section_scaling() {
    # the closed form on the features alone: with the default random features rounds 2 and 3
    # would be mostly statistics tasks, and this section measures rounds that train
    python tools/scaling_bench.py configs/scale.toml --ks 10,100,1000 --num-clients 10x --rounds 3 \
        --run-config "$RC" --run-config "ridge-features=0 residual-lr=0.001" --out "$OUT/scaling"
    python tools/flower_nodes_cost.py --nodes 1000,10000,100000
}

wanted=()
for arg in "${@:-all}"; do
    if [[ $arg == all ]]; then
        wanted+=("${SECTIONS[@]}")
    elif [[ " ${SECTIONS[*]} " == *" $arg "* ]]; then
        wanted+=("$arg")
    else
        echo "tools/benchmarks.sh: unknown section '$arg'; valid: ${SECTIONS[*]} (or all)" >&2
        exit 2
    fi
done

cd "$(dirname "$0")/.."
[[ -d .venv/bin ]] && export PATH="$PWD/.venv/bin:$PATH"
OUT=${OUT:-runs/benchmarks}
CIFAR10=${CIFAR10:-../shared/data/cifar10}
RC="data-dir='$CIFAR10'${CACHE_DIR:+ cache-dir='$CACHE_DIR'}"
mkdir -p "$OUT"
for name in "${wanted[@]}"; do
    echo "=== $name: commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u '+%Y-%m-%d %H:%M UTC')"
    "section_$name"
done
