#!/usr/bin/env bash
# `sovra demo --bench` on a machine of many cores, where each worker of the demo federation
# gets cores of its own (as on machines of their own), with a random-weight model of
# SmolLM2-135M's shape (the real model need not be fetchable there).
#
#   scripts/bench_cores.sh OUTDIR
#
# Env: SOVRA_BIN (default target/release/sovra), SYNTH_BIN (target/release/examples/synth,
# built by `cargo build --release -p sovra-model --example synth`), RUNS (default
# "q8_0:2 q8_0:2:shared f32:2 f32:2:shared": weight mode, compute threads of each process
# and, with ":shared", all workers on the same cores (`demo --share-cores`) as on a small
# machine; one `demo --bench` each), BUDGET_S (no new run starts after this many seconds;
# default 400).
set -euo pipefail
out=${1:?usage: scripts/bench_cores.sh OUTDIR}
sovra=${SOVRA_BIN:-target/release/sovra}
synth=${SYNTH_BIN:-target/release/examples/synth}
runs=${RUNS:-q8_0:2 q8_0:2:shared f32:2 f32:2:shared}
budget=${BUDGET_S:-400}
mkdir -p "$out"
{
    echo "cores: $(nproc)"
    grep -m1 'model name' /proc/cpuinfo || true
    echo "thp: $(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null || echo n/a)"
    "$sovra" --version
} | tee "$out/machine.txt"
model="${TMPDIR:-/tmp}/sovra-synth-smollm2.gguf"
"$synth" "$model" >/dev/null
i=0
for run in $runs; do
    if ((SECONDS > budget)); then
        echo "budget of ${budget}s spent: skipping $run and the rest"
        break
    fi
    i=$((i + 1))
    IFS=: read -r dtype threads shared <<<"$run"
    name="$i-$dtype-t$threads${shared:+-shared}"
    start=$SECONDS
    if timeout 300 "$sovra" --threads "$threads" demo --bench -m "$model" --dtype "$dtype" \
        --worker-threads "$threads" ${shared:+--share-cores} >"$out/$name.md" 2>>"$out/demo.log"; then
        echo "== $name ($((SECONDS - start)) s)"
        grep -E '^###|^\| (generate|job on)|^Per-hop|^\| (1|4|16) \|' "$out/$name.md"
    else
        echo "== $name FAILED (exit $?, $((SECONDS - start)) s); log tail:"
        tail -5 "$out/demo.log"
    fi
done
