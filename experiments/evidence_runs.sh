#!/usr/bin/env bash
# Issue 16's experiments beyond the main job, each from the main job's own SFT checkpoints, with the main job's RL
# flags and rollout budget (PROMPTS prompts x 8 samples, 45 steps), evaluated on the run's held-out file:
#
#   aggregation  C3PO against sample-level GRPO (seq_mean) and token-mean on the same rollouts per step
#   sftmore      more SFT from the same checkpoint for as many tokens as C3PO trained on (the sum of Phi)
#   picked       RL from the SFT checkpoint ring-jax-sft-entropy picks, against RL from the last one
#   truncated    the whole main job on the ablation corpus (30% of the worked solutions cut before the answer)
#   levers       the RL learning rate and the KL / entropy terms: LEVERS="lr=2e-4 lr=2e-4,beta=0,alpha_ent=0" (each
#                entry: comma-separated ring-jax-rl flags that replace the main job's), same checkpoint and budget
#
# usage: experiments/evidence_runs.sh OUT RUN0 [RUN1 ...]
#   RUNi: folders of `ring-jax-pipeline --seed=i` (finished); OUT: where the experiment runs go.
#   WHAT="aggregation sftmore picked truncated" (default: all) picks the experiments, AGGS="seq_mean token_mean"
#   the baselines, SEEDS="0 1 2" the seeds of the RUNs (default: 0, 1, ... in order); a run whose final
#   checkpoint exists is skipped, so the script continues where it stopped (two instances with different WHAT or
#   AGGS can share a 2-core box: decode runs mostly on one core).  PROMPTS: RL prompts per step (default 64, the
#   main job's since 2026-12-06; the results recorded in experiments/results/issue16/evidence.md ran at PROMPTS=16,
#   the main job's before).
# Then: python experiments/evidence_report.py OUT RUN0 [RUN1 ...] writes the tables and plots.
set -euo pipefail
OUT=$(realpath -m "$1"); shift
WHAT=${WHAT:-"aggregation sftmore picked truncated"}  # levers: only when asked
LEVERS=${LEVERS:-"lr=2e-4 lr=2e-4,beta=0,alpha_ent=0"}
AGGS=${AGGS:-"seq_mean token_mean"}
read -r -a SEEDS <<< "${SEEDS:-$(seq -s ' ' 0 $(($# - 1)))}"
[ ${#SEEDS[@]} = $# ] || { echo "error: SEEDS has ${#SEEDS[@]} seeds for $# runs" >&2; exit 2; }
PY=${PYTHON:-python}
STEPS=45
PROMPTS=${PROMPTS:-64}
SLOTS=$((PROMPTS * 8 < 256 ? PROMPTS * 8 : 256))  # the pipeline's decode batch: every response, up to 256 rows
mkdir -p "$OUT"

rl_flags() {  # $1 run folder, $2 seed: the pipeline's RL stage flags (ring_jax/cli/pipeline.py), no eval before
  echo --tokenizer="$1/tokenizer" --prompts_jsonl="$1/data/rl_prompts.jsonl" --eval_jsonl="$1/data/eval.jsonl" \
       --eval_n=8 --eval_seed=99000 --eval_slots=256 --num_slots=$SLOTS --steps=$STEPS --lr=5e-05 --warmup_steps=3 \
       --updates_per_rollout=1 --prompts_per_step=$PROMPTS --samples_per_prompt=8 --budget=2048 \
       --selection_order=informative_first --max_new_tokens=64 --seed="$2" \
       --ckpt_every=$STEPS --progress_bar=false
}

done_at() { [ -d "$1/ckpt/$2" ]; }

for i in $(seq 1 $#); do
  RUN=$(realpath "${!i}")
  SEED=${SEEDS[$((i - 1))]}
  [ -d "$RUN/sft/ckpt" ] || { echo "error: $RUN has no sft/ckpt (a finished ring-jax-pipeline run?)" >&2; exit 2; }
  echo "== seed $SEED: $RUN"

  if [[ " $WHAT " == *" aggregation "* ]]; then
    for AGG in $AGGS; do
      D="$OUT/agg_$AGG/s$SEED"
      done_at "$D" $STEPS && { echo "-- $D done"; continue; }
      echo "-- $AGG (seed $SEED) -> $D"
      $PY -m ring_jax.cli.rl --init_ckpt="$RUN/sft/ckpt" $(rl_flags "$RUN" $SEED) --aggregation=$AGG \
          --eval_before=false --out_dir="$D"
    done
  fi

  if [[ " $WHAT " == *" sftmore "* ]]; then
    D="$OUT/sftmore/s$SEED"
    # as many SFT loss tokens as the main job's C3PO trained on: sum of kept tokens / mean loss tokens per SFT step
    N=$($PY - "$RUN" <<'EOF'
import json, sys
run = sys.argv[1]
rl = [json.loads(x) for x in open(f"{run}/rl/metrics.jsonl") if x.strip()]
sft = [json.loads(x) for x in open(f"{run}/sft/metrics.jsonl") if x.strip()][-200:]
per_step = sum(r["ce_tokens"] for r in sft) / len(sft)
print(round(sum(r["kept_tokens"] for r in rl) / per_step))
EOF
)
    if ! done_at "$D" "$N"; then
      echo "-- more SFT: $N steps (seed $SEED) -> $D"
      $PY -m ring_jax.cli.sft --init_ckpt="$RUN/sft/ckpt" --preset=small --train_jsonl="$RUN/data/sft.jsonl" \
          --tokenizer="$RUN/tokenizer" --steps="$N" --global_batch=8 --seq_len=256 --lr=2e-4 --warmup_ratio=0.02 \
          --ckpt_every="$N" --seed=$SEED --data_seed=$((SEED + 1)) --out_dir="$D" --peak_flops=0 \
          --progress_bar=false
    fi
    E="$OUT/sftmore_eval/s$SEED"
    [ -f "$E/eval_init_prompts.json" ] || $PY -m ring_jax.cli.rl --init_ckpt="$D/ckpt" $(rl_flags "$RUN" $SEED) \
        --eval_only --out_dir="$E"
  fi

  if [[ " $WHAT " == *" picked "* ]]; then
    [ -f "$RUN/sft/checkpoints.json" ] || $PY -m ring_jax.cli.sft_entropy --sft_dir="$RUN/sft" \
        --prompts_jsonl="$RUN/data/rl_prompts.jsonl" --tokenizer="$RUN/tokenizer" --seed=$SEED
    PICK=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['picked_ckpt'])" "$RUN/sft/checkpoints.json")
    LAST=$($PY -c "import json,sys; c=json.load(open(sys.argv[1]))['checkpoints']; print(max(x['step'] for x in c))" \
           "$RUN/sft/checkpoints.json")
    if [ "${PICK##*:}" = "$LAST" ]; then
      echo "-- seed $SEED: the entropy rule picks the last checkpoint ($PICK): RL from it is the main job's"
    else
      D="$OUT/picked/s$SEED"
      done_at "$D" $STEPS || { echo "-- RL from the picked checkpoint $PICK -> $D";
        $PY -m ring_jax.cli.rl --init_ckpt="$PICK" $(rl_flags "$RUN" $SEED) --eval_before=true --out_dir="$D"; }
    fi
  fi

  if [[ " $WHAT " == *" levers "* ]]; then
    for L in $LEVERS; do
      D="$OUT/lever_${L//[=,]/_}/s$SEED"
      done_at "$D" $STEPS && { echo "-- $D done"; continue; }
      echo "-- lever $L (seed $SEED) -> $D"
      # later flags win in absl, so the lever's flags override rl_flags' --lr and the defaults' --beta/--alpha_ent
      $PY -m ring_jax.cli.rl --init_ckpt="$RUN/sft/ckpt" $(rl_flags "$RUN" $SEED) --eval_before=false \
          $(echo "$L" | tr ',' '\n' | sed 's/^/--/') --out_dir="$D"
    done
  fi

  if [[ " $WHAT " == *" truncated "* ]] && [ "$SEED" = 0 ]; then
    D="$OUT/truncated/s$SEED"
    echo "-- the main job on the truncated corpus (seed $SEED) -> $D"
    $PY -m ring_jax.cli.pipeline --out_dir="$D" --seed=$SEED --sft_truncated=0.3 --sft_checkpoints=1 \
        --progress_bar=false
  fi
done
echo "== done: python experiments/evidence_report.py $OUT $*"
