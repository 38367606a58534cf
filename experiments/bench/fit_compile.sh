#!/usr/bin/env bash
# Compile time of the ling-lite-1.5 SFT and RL train steps (ring-jax-fit: 64 fake CPU devices, fsdp:8,expert:8,
# abstract arrays, --beta=0) at 2 and 28 layers, scanned and unrolled (--noscan_layers: the same stacked
# parameters, one copy of the layer per depth in the program).  One line per compile: the seconds to lower and
# compile as ring-jax-fit reports them (Report.compile_s), and the command's wall time.
#   bash experiments/bench/fit_compile.sh                       # LAYERS="2 28" MODES="scan noscan" PROGRAMS="sft rl"
#   ROOT=/path/to/old/checkout MODES=old bash experiments/bench/fit_compile.sh
# MODES=old runs an older checkout (ROOT, on PYTHONPATH) that has no compile_s: its compile time is then the wall
# time minus that of the same command with no program (start-up, imports, abstract set-up), printed as "startup".
set -euo pipefail
PY=${PYTHON:-python}
LAYERS=${LAYERS:-"2 28"}
MODES=${MODES:-"scan noscan"}
PROGRAMS=${PROGRAMS:-"sft rl"}
# python -m puts the working directory first on sys.path: run from ROOT so that its ring_jax is the one imported
fit() { (cd "${ROOT:-.}" && PYTHONPATH=${ROOT:-${PYTHONPATH:-}} $PY -m ring_jax.cli.fit --beta=0 "$@" 2>/dev/null); }
wall() { local t0 t1; t0=$(date +%s.%N); fit "$@" > /tmp/fit_compile.$$; t1=$(date +%s.%N); echo "$t1 - $t0" | bc; }
printf "%-4s %6s %-7s %12s %8s\n" prog layers mode compile_s wall_s
for M in $MODES; do
  FLAG=--scan_layers; [ "$M" = noscan ] && FLAG=--noscan_layers; [ "$M" = old ] && FLAG=
  if [ "$M" = old ]; then
    for L in $LAYERS; do
      S=$(wall --num_layers="$L" --programs=)
      printf "%-4s %6s %-7s %12s %8.1f\n" - "$L" startup - "$S"
    done
  fi
  for P in $PROGRAMS; do for L in $LAYERS; do
    W=$(wall --num_layers="$L" --programs="$P" $FLAG)
    C=$(awk '/compile \(lower \+ compile\)/ {print $(NF-1)}' /tmp/fit_compile.$$ | head -1)
    if [ "$M" = old ]; then C=$(printf "%.1f" "$(echo "$W - $(wall --num_layers="$L" --programs=)" | bc)"); fi
    printf "%-4s %6s %-7s %12s %8.1f\n" "$P" "$L" "$M" "${C:-?}" "$W"
  done; done
done
rm -f /tmp/fit_compile.$$
