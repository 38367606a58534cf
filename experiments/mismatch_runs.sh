#!/usr/bin/env bash
# Issue 30, item 6: MoE RL at real precision on the main job's model and tasks.  Rollouts in bfloat16 beside the
# float32 trainer (same parameters, same mesh), from the main job's SFT checkpoint, with the main job's RL flags
# (64 prompts x 8 samples per step, Phi = 2048, lr 5e-5), STEPS steps per run, arms:
#
#   f32            float32 rollouts (the baseline: the trainer's own numerics)
#   bf16           bfloat16 rollouts, nothing acting on the mismatch (pi_old = the sampler's log-probs)
#   bf16_tis       bfloat16, pi_old from the trainer at the rollout parameters (TIS then corrects it to the sampler)
#   bf16_icepop    bfloat16, IcePop [0.5, 2]
#   bf16_replay    bfloat16, rollout routing replay
#   bf16_replay_icepop
#
# usage: experiments/mismatch_runs.sh OUT RUN
#   RUN: a finished `ring-jax-pipeline` folder (its sft/ckpt, tokenizer and data/); OUT: where the runs go.
#   SEEDS="0 1 2" the RL seeds (rollout sampling and prompt order; the SFT checkpoint is RUN's for all of them),
#   ARMS the arms, STEPS (default 20) the RL steps.  A run whose final checkpoint exists is skipped.  Each run
#   measures the held-out set after its last step; the SFT checkpoint's own figures ("before") are RUN's
#   rl/eval_before_prompts.json, on the same prompts with the same evaluation seed.
# Then: python experiments/mismatch_report.py collect OUT RUN experiments/results/issue30/data   (compact, committed)
#       python experiments/mismatch_report.py table experiments/results/issue30/data  (writes mismatch.md there)
set -euo pipefail
OUT=$(realpath -m "$1")
RUN=$(realpath "$2")
read -r -a SEEDS <<< "${SEEDS:-0 1 2}"
ARMS=${ARMS:-"f32 bf16 bf16_tis bf16_icepop bf16_replay bf16_replay_icepop"}
STEPS=${STEPS:-20}
PY=${PYTHON:-python}
[ -d "$RUN/sft/ckpt" ] || { echo "error: $RUN has no sft/ckpt (a finished ring-jax-pipeline run?)" >&2; exit 2; }
mkdir -p "$OUT"

arm_flags() {
  case "$1" in
    f32) echo --rollout_dtype=float32 ;;
    bf16) echo --rollout_dtype=bfloat16 ;;
    bf16_tis) echo --rollout_dtype=bfloat16 --old_logp=trainer ;;
    bf16_icepop) echo --rollout_dtype=bfloat16 --icepop=0.5,2.0 ;;
    bf16_replay) echo --rollout_dtype=bfloat16 --routing_replay ;;
    bf16_replay_icepop) echo --rollout_dtype=bfloat16 --routing_replay --icepop=0.5,2.0 ;;
    *) echo "error: unknown arm $1" >&2; exit 2 ;;
  esac
}

for SEED in "${SEEDS[@]}"; do
  for ARM in $ARMS; do
    D="$OUT/$ARM/s$SEED"
    mkdir -p "$OUT/$ARM"
    [ -d "$D/ckpt/$STEPS" ] && { echo "-- $D done"; continue; }
    echo "-- $ARM (seed $SEED) -> $D  $(date -u +%H:%M:%S)"
    # the pipeline's RL stage flags (ring_jax/cli/pipeline.py), without the evaluation before (RUN's is shared)
    $PY -m ring_jax.cli.rl --init_ckpt="$RUN/sft/ckpt" --tokenizer="$RUN/tokenizer" \
        --prompts_jsonl="$RUN/data/rl_prompts.jsonl" --eval_jsonl="$RUN/data/eval.jsonl" --eval_n=8 \
        --eval_seed=99000 --eval_slots=256 --num_slots=256 --steps="$STEPS" --lr=5e-05 --warmup_steps=3 \
        --updates_per_rollout=1 --prompts_per_step=64 --samples_per_prompt=8 --budget=2048 \
        --selection_order=informative_first --max_new_tokens=64 --seed="$SEED" --ckpt_every="$STEPS" \
        --progress_bar=false --eval_before=false $(arm_flags "$ARM") --out_dir="$D" > "$D.log" 2>&1 \
        || { echo "error: $ARM seed $SEED failed, see $D.log" >&2; exit 1; }
  done
done
echo "all runs done $(date -u +%H:%M:%S)"
