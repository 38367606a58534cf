#!/usr/bin/env bash
# Compile time of the ling-lite-1.5 SFT and RL train steps (ring-jax-fit: 64 fake CPU devices, fsdp:8,expert:8,
# abstract arrays) at 2 and 28 layers, scanned and unrolled (--noscan_layers: the same stacked parameters, one
# copy of the layer per depth in the program).  Prints one line per compile: program, layers, mode, seconds to lower
# and compile (ring_jax.rl.fit.Report.compile_s) and the command's wall time.
#   bash experiments/bench/fit_compile.sh [LAYERS="2 28"] [MODES="scan noscan"] [PROGRAMS="sft rl"]
set -euo pipefail
PY=${PYTHON:-python}
LAYERS=${LAYERS:-"2 28"}
MODES=${MODES:-"scan noscan"}
PROGRAMS=${PROGRAMS:-"sft rl"}
printf "%-4s %6s %-7s %12s %8s\n" prog layers mode compile_s wall_s
for P in $PROGRAMS; do for M in $MODES; do for L in $LAYERS; do
  FLAG=--scan_layers; [ "$M" = noscan ] && FLAG=--noscan_layers
  t0=$(date +%s.%N)
  OUT=$($PY -m ring_jax.cli.fit --num_layers="$L" --programs="$P" --beta=0 "$FLAG" 2>/dev/null)
  t1=$(date +%s.%N)
  C=$(echo "$OUT" | awk '/compile \(lower \+ compile\)/ {print $(NF-1)}' | head -1)
  printf "%-4s %6s %-7s %12s %8.1f\n" "$P" "$L" "$M" "${C:-?}" "$(echo "$t1 - $t0" | bc)"
done; done; done
