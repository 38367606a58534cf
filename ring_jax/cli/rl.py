"""ring-jax-rl: C3PO reinforcement learning with verifiable rewards (Ring-lite section 3.2).

    ring-jax-rl --flagfile=experiments/flags/rl_small_cpu.flags --init_ckpt=runs/sft/ckpt --out_dir=runs/rl
    ring-jax-rl --preset=tiny --tasks=chain_sum --steps=4 --budget=256 --out_dir=/tmp/rl     # no SFT, no data
    ring-jax-rl ... --aggregation=seq_mean --responses_per_step=16     # sample-level GRPO baseline
    ring-jax-rl ... --updates_per_rollout=2 --budget=1024     # two PPO updates per rollout, 1024 tokens each

Each step: rollout (the sampling engine on the live parameters) -> rewards (ring_jax.rewards registry) -> GRPO
advantages -> C3PO token-budget selection of --updates_per_rollout disjoint budgets -> one micro-batched update per
budget, normalised by the budget (ring_jax.rl.step).  With --eval_tasks or --eval_jsonl, held-out pass@1 is measured
before the first step and after the last (and every --eval_every steps).

Prompts are checked when they are read: a line that is not UTF-8 JSON, a record without a usable prompt, a task
with no reward function, or a prompt that leaves fewer than --max_new_tokens of the --seq_len row (or of the
model's context) for its response is skipped, counted and named with its file:line (generated tasks: ``<generated
FAMILY>:N``); past --max_bad_prompts of a source the run stops before it starts.  Without a tokenizer (none given,
none in the --init_ckpt run or --hf_dir) and with text prompts, a BPE tokenizer is trained on the prompts (a run
from a preset only).

--resume continues from the newest checkpoint; the KL reference stays the initial policy: it is rebuilt from the
source recorded in <out_dir>/init.json (the --init_ckpt step, --hf_dir or the preset and seed) and checked against
the checksums recorded there.

Prompts are not sharded across JAX processes: every process draws the same global prompt batch and runs the same
rollout on the global mesh (collectives need identical host-side control flow).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from absl import app, flags, logging

from ring_jax.cli import common
from ring_jax.cli.common import usage
from ring_jax.cli.run import TrainRun

FLAGS = flags.FLAGS


def define_flags() -> None:
    common.define_model_flags("small")
    common.define_runtime_flags()
    flags.DEFINE_string("tokenizer", "", "tokenizer path; default: the --init_ckpt run's or --hf_dir's")
    flags.DEFINE_list("tasks", [], "generated task families for training prompts (chain_sum, countdown)")
    flags.DEFINE_integer("num_prompts", 2000, "generated training prompts per family")
    flags.DEFINE_integer("task_seed", 1000, "seed of the generated training prompts")
    flags.DEFINE_string("prompts_jsonl", "", "training prompt records (JSONL: prompt or prompt_ids, task, ...)")
    flags.DEFINE_list("eval_tasks", [], "generated task families for held-out pass@1")
    flags.DEFINE_string("eval_jsonl", "", "held-out prompt records for pass@1")
    flags.DEFINE_integer("eval_prompts", 64, "held-out prompts per family")
    flags.DEFINE_integer("eval_seed", 99_000, "seed of the generated held-out prompts (disjoint from training)")
    flags.DEFINE_integer("eval_n", 4, "samples per held-out prompt")
    flags.DEFINE_float("eval_top_p", 0.95, "top-p for evaluation (Ring-lite: 0.95)")
    flags.DEFINE_bool(
        "eval_only",
        False,
        "evaluate the initial parameters on the held-out prompts (tag 'init') and exit: no RL step, no checkpoint",
    )
    flags.DEFINE_bool(
        "eval_before",
        True,
        "evaluate before the first step (off: only after, e.g. when another run "
        "from the same checkpoint already measured the start)",
    )
    flags.DEFINE_bool("eval_greedy", True, "also measure greedy accuracy (one greedy response per held-out prompt)")
    flags.DEFINE_integer("eval_slots", 0, "decode batch of the evaluation's engine (0: --num_slots)")
    flags.DEFINE_integer("eval_every", 0, "evaluate every N steps (0: only before and after)")
    # rollout and C3PO
    flags.DEFINE_integer("prompts_per_step", 8, "prompts per step (L)")
    flags.DEFINE_integer("samples_per_prompt", 4, "responses per prompt (K)")
    flags.DEFINE_integer(
        "updates_per_rollout",
        1,
        "optimiser updates per rollout, each on its own budget of --budget "
        "tokens drawn disjointly from the rollout pool (pi_old = the policy that sampled, so the PPO "
        "clip acts from the second update on); baselines: --responses_per_step each",
    )
    flags.DEFINE_enum("aggregation", "c3po", ["c3po", "seq_mean", "token_mean"], "loss aggregation / batching")
    flags.DEFINE_integer("budget", 1024, "C3PO token budget Phi per optimiser step")
    flags.DEFINE_integer("responses_per_step", 0, "baselines: responses per step (0: all)")
    flags.DEFINE_enum(
        "selection_order",
        "random",
        ["random", "rollout", "shortest_first", "longest_first", "informative_first"],
        "order of the greedy budget selection (informative_first: non-zero advantages first)",
    )
    flags.DEFINE_bool(
        "binary_reward",
        True,
        "reward 1 iff the verifier scores 1 (Ring-lite; no partial credit); learned reward-model scores pass through",
    )
    flags.DEFINE_integer("max_new_tokens", 64, "response length limit")
    flags.DEFINE_float("temperature", 1.0, "rollout temperature")
    flags.DEFINE_float("top_p", 1.0, "rollout top-p")
    flags.DEFINE_integer("seq_len", 256, "packed training row length")
    flags.DEFINE_integer("micro_batches", 1, "micro-batches per step")
    flags.DEFINE_integer("num_slots", 32, "decode batch of the sampling engine")
    flags.DEFINE_enum("sampling_moe_impl", None, ["dispatch", "ragged", "dense", "pallas"], "MoE path in sampling")
    flags.DEFINE_float("clip_eps", 0.2, "PPO clip range")
    flags.DEFINE_float("beta", 1e-3, "KL(pi || pi_ref) weight (k3 estimator); 0: no reference model")
    flags.DEFINE_float("alpha_ent", 5e-4, "entropy bonus weight")
    flags.DEFINE_float("alpha_bal", 1e-5, "MoE load-balance loss weight")
    flags.DEFINE_float("alpha_z", 1e-7, "router z-loss weight")
    flags.DEFINE_float(
        "tis_cap",
        2.0,
        "truncated importance sampling between sampler and trainer: each trained "
        "token weighs min(pi_old / q_sampler, C), correcting rollouts at --temperature != 1 or "
        "--top_p < 1 (1 otherwise); <= 0: off",
    )
    flags.DEFINE_enum(
        "tis_level",
        "token",
        ["token", "sequence"],
        "importance weight per token, or one per response (the product of its tokens' ratios, truncated)",
    )
    flags.DEFINE_enum(
        "rollout_dtype",
        None,
        ["float32", "bfloat16"],
        "compute dtype of the rollouts, from the same parameters on the same mesh (default: --dtype, the "
        "trainer's); bfloat16 beside a float32 trainer is the common TPU deployment and reproduces the "
        "trainer/sampler mismatch (mismatch/* metrics)",
    )
    flags.DEFINE_enum(
        "old_logp",
        "sampler",
        ["sampler", "trainer"],
        "pi_old of the PPO ratio: the sampler's temperature-1 log-probs, or the trainer's at the rollout "
        "parameters (one extra forward per step is taken anyway for the mismatch metrics; TIS then corrects "
        "pi_old against the sampler)",
    )
    flags.DEFINE_list(
        "icepop",
        [],
        "LOW,HIGH: IcePop (Ring-1T): a token whose pi_train / pi_infer ratio is outside [LOW, HIGH] gets no "
        "policy-gradient term (beside the PPO clip and TIS); empty: off",
    )
    flags.DEFINE_bool(
        "routing_replay",
        False,
        "rollout routing replay (R3): the training forward sends each token to the experts the sampler routed it "
        "to (gate weights still from the trainer's router at those ids)",
    )
    flags.DEFINE_bool(
        "skip_no_signal",
        True,
        "skip an update whose selected responses all have advantage 0 (it would "
        "move the weights by the KL, entropy and MoE aux terms alone); counted as skipped_no_signal",
    )
    flags.DEFINE_float("reward_timeout_s", 30.0, "per-response reward timeout")
    flags.DEFINE_float(
        "max_reward_fail_frac",
        0.1,
        "stop (after checkpointing) when more than this fraction of a "
        "rollout's rewards fail (raise, time out, NaN); failed ones never enter advantages or budgets",
    )
    flags.DEFINE_float(
        "max_bad_prompts",
        0.05,
        "stop before training when more than this fraction of a prompt "
        "source is unusable (bad JSON / UTF-8, no reward function, too long)",
    )
    flags.DEFINE_string(
        "reward_model",
        "",
        "learned reward model directory (ring_jax.rl.reward_model "
        "LearnedRewardModel.save) that scores records of task 'reward_model'",
    )
    # optimiser and run
    flags.DEFINE_integer("steps", 20, "RL steps")
    flags.DEFINE_float("lr", 3e-6, "learning rate (constant after warm-up; Ring-lite: 3e-6)")
    flags.DEFINE_integer(
        "warmup_steps",
        3,
        "warm-up RL steps: the learning rate rises linearly from 0 over this "
        "many steps (x --updates_per_rollout updates), then stays constant (Ring-lite)",
    )
    flags.DEFINE_float("weight_decay", 0.1, "decoupled weight decay")
    flags.DEFINE_float("clip_norm", 1.0, "global gradient-norm clipping (<= 0: off)")
    common.define_run_flags(out_dir="runs/rl", ckpt_every=10, keep=2, max_nonfinite=5)


def _check_flags() -> None:
    """One-line usage errors for flag values that cannot work, before anything is built."""
    positive = (
        "steps",
        "prompts_per_step",
        "samples_per_prompt",
        "updates_per_rollout",
        "max_new_tokens",
        "micro_batches",
        "num_slots",
        "eval_n",
    )
    for name in positive:
        if getattr(FLAGS, name) < 1:
            usage(f"--{name} must be >= 1, got {getattr(FLAGS, name)}")
    for name in (
        "warmup_steps",
        "ckpt_every",
        "responses_per_step",
        "eval_prompts",
        "eval_every",
        "num_prompts",
        "eval_slots",
    ):
        if getattr(FLAGS, name) < 0:
            usage(f"--{name} must be >= 0, got {getattr(FLAGS, name)}")
    if FLAGS.aggregation == "c3po" and FLAGS.budget <= 0:
        usage("--budget must be positive")
    if FLAGS.eval_only and not (FLAGS.eval_tasks or FLAGS.eval_jsonl):
        usage("--eval_only needs held-out prompts (--eval_tasks or --eval_jsonl)")
    if FLAGS.temperature <= 0:
        usage(
            f"--temperature must be > 0 for RL rollouts (greedy samples of one prompt are identical), got "
            f"{FLAGS.temperature}"
        )
    for name in ("top_p", "eval_top_p"):
        if not 0.0 < getattr(FLAGS, name) <= 1.0:
            usage(f"--{name} must be in (0, 1], got {getattr(FLAGS, name)}")
    for name in ("max_reward_fail_frac", "max_bad_prompts"):
        if not 0.0 <= getattr(FLAGS, name) <= 1.0:
            usage(f"--{name} must be in [0, 1], got {getattr(FLAGS, name)}")
    if FLAGS.max_new_tokens >= FLAGS.seq_len:
        usage(f"--max_new_tokens={FLAGS.max_new_tokens} leaves no room for a prompt in a --seq_len={FLAGS.seq_len} row")
    if not FLAGS.tasks and not FLAGS.prompts_jsonl:
        usage("give --tasks and/or --prompts_jsonl")


def _sources(tasks, n, seed, jsonl, split: str) -> list[tuple[str, object]]:
    """(name, source) per prompt source: ``<generated FAMILY>`` record lists (problems of ``split``'s side only:
    "train" for training prompts, "eval" for held-out ones, one record per problem) and the JSONL file."""
    from ring_jax.data.tasks import FAMILIES, make_task_records

    out = []
    for fam in tasks:
        if fam not in FAMILIES:
            usage(f"unknown task family {fam!r}; known: {', '.join(sorted(FAMILIES))}")
        try:
            recs = make_task_records(fam, n, seed, split=split, distinct=split == "eval")
        except ValueError as e:
            usage(str(e))
        out.append((f"<generated {fam}>", recs))
    if jsonl:
        if not os.path.exists(jsonl):
            usage(f"{jsonl}: no such file")
        out.append((jsonl, jsonl))
    return out


def _drop_overlap(train_recs: list[dict], eval_recs: list[dict]) -> list[dict]:
    """Held-out records whose problem (key or canonical text) is also a training prompt are left out and counted:
    pass@1 on them would measure memory, not reasoning.  All of them overlapping is an error."""
    from ring_jax.data.splits import overlap

    if not eval_recs:
        return eval_recs
    bad = set(overlap(train_recs, eval_recs))
    if not bad:
        return eval_recs
    if len(bad) == len(eval_recs):
        common.die(
            f"every one of the {len(eval_recs)} held-out prompts is also a training prompt (same problem or "
            "same text): nothing is held out"
        )
    first = eval_recs[min(bad)]
    print(
        f"warning: held-out prompts: left out {len(bad)} of {len(eval_recs)} that are also training prompts "
        f"(same problem or same text; e.g. {str(first.get('prompt', ''))[:60]!r})",
        file=sys.stderr,
        flush=True,
    )
    return [r for i, r in enumerate(eval_recs) if i not in bad]


def _load_prompts(sources, tok, max_prompt_tokens: int, hint: str, what: str) -> list[dict]:
    """Every source through ``load_prompt_records`` (skips named file:line, counted; DataError past
    --max_bad_prompts -> one line, exit 1)."""
    from ring_jax.data.jsonl import DataError, load_prompt_records
    from ring_jax.rewards import registry

    recs = []
    for name, src in sources:
        try:
            got, stats = load_prompt_records(
                src,
                tokenizer=tok,
                max_prompt_tokens=max_prompt_tokens,
                max_bad_fraction=FLAGS.max_bad_prompts,
                known_tasks=registry.list_tasks(),
                too_long_hint=hint,
                origin=name,
            )
        except DataError as e:
            common.die(f"{what} prompts {name}: {e}")
        if stats.bad:
            print(
                f"warning: {what} prompts {name}: skipped {stats.bad} of {stats.total} "
                f"({', '.join(f'{k} {v}' for k, v in sorted(stats.reasons.items()))}; first at "
                f"{', '.join(f'{f}:{n}' for f, n, _ in stats.bad_records[:3])})",
                file=sys.stderr,
                flush=True,
            )
        recs += got
    return recs


def _prompt_texts(sources) -> list[str]:
    """Text of every usable record of the sources (to train a tokenizer on when there is none)."""
    from ring_jax.data.jsonl import iter_records, prompt_messages

    texts = []
    for name, src in sources:
        for _, _, r in iter_records(src, name):
            if isinstance(r, dict) and isinstance(r.get("prompt"), (str, list)):
                try:
                    texts.append("\n".join(str(m["content"]) for m in prompt_messages(r)))
                except (KeyError, TypeError):
                    continue
                if isinstance(r.get("solution"), str):
                    texts.append(r["solution"])
    return texts


def _reference_params(run: TrainRun):
    """The KL reference of a resumed run: the initial policy, rebuilt from ``<out_dir>/init.json`` and checked
    against its checksums (never the restored parameters)."""
    import jax
    import numpy as np

    from ring_jax.train.checkpoint import Checkpointer, CheckpointError, tree_checksums

    path = os.path.join(run.out_dir, "init.json")
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        common.die(
            f"--resume with --beta={FLAGS.beta}: cannot rebuild the KL reference (the initial policy): {path}: {e}"
        )
    if rec.get("init_ckpt"):
        try:
            with Checkpointer(rec["init_ckpt"], read_only=True) as c:
                params = c.restore_params(run.params, run.shardings.params, rec.get("step")).params
        except CheckpointError as e:
            common.die(
                f"--resume: the KL reference's checkpoint {rec['init_ckpt']}:{rec.get('step')} is unreadable ({e})",
                now=True,
            )
    else:
        hf_dir = rec.get("hf_dir") or ""
        if hf_dir and not os.path.isdir(hf_dir):
            common.die(f"--resume: the KL reference's Hugging Face directory {hf_dir} (init.json) is gone")
        params = common.init_params(run.cfg, run.mesh, int(rec.get("seed", FLAGS.seed)), hf_dir)[2]
    sums = [int(v) for v in np.asarray(jax.device_get(tree_checksums(params)))]
    if sums != rec.get("params_checksums"):
        common.die(
            f"--resume: the rebuilt KL reference does not match the checksums in {path} (the initial policy's "
            "source changed since the run started)"
        )
    return params


def _rl_config():
    from ring_jax.rl.losses import PolicyLossConfig
    from ring_jax.rl.step import RLConfig

    try:
        return common.dataclass_from_flags(
            RLConfig, {"num_micro": "micro_batches"}, policy=common.dataclass_from_flags(PolicyLossConfig)
        )
    except ValueError as e:
        usage(str(e))


def _register_reward_model(mesh) -> None:
    """--reward_model: the learned reward model scores the records of task 'reward_model'."""
    if not os.path.isdir(os.path.join(FLAGS.reward_model, "ckpt")):
        usage(f"--reward_model: {FLAGS.reward_model} holds no ckpt/ (write one with LearnedRewardModel.save)")
    from ring_jax.rewards.general import register_reward_model
    from ring_jax.rl.reward_model import LearnedRewardModel, RewardModelError

    try:
        register_reward_model(LearnedRewardModel.load(FLAGS.reward_model, mesh=mesh))
    except (RewardModelError, FileNotFoundError) as e:
        usage(f"--reward_model: {e}")


def _prompt_records(train_src, eval_src, tok, cfg) -> tuple[list[dict], list[dict]]:
    """(training, held-out) prompt records of the sources, each with ``prompt_ids`` in ``cfg``'s vocabulary and
    room for a --max_new_tokens response; held-out ones that are also training prompts left out."""
    room = min(FLAGS.seq_len, cfg.max_position_embeddings) - FLAGS.max_new_tokens
    train_recs = _load_prompts(
        train_src,
        tok,
        room,
        f" (leaves fewer than --max_new_tokens={FLAGS.max_new_tokens} "
        f"of the {min(FLAGS.seq_len, cfg.max_position_embeddings)}-token row for the response)",
        "training",
    )
    eval_recs = (
        _load_prompts(
            eval_src,
            tok,
            cfg.max_position_embeddings - FLAGS.max_new_tokens,
            f" (leaves fewer than --max_new_tokens={FLAGS.max_new_tokens} of the "
            f"{cfg.max_position_embeddings}-token context)",
            "held-out",
        )
        if eval_src
        else []
    )
    eval_recs = _drop_overlap(train_recs, eval_recs)
    if not all("prompt_ids" in r for r in train_recs + eval_recs):
        usage(
            "no tokenizer found (--tokenizer, --hf_dir, or an --init_ckpt run with tokenizer/) and the prompts have "
            "no prompt_ids"
        )
    bad_ids = [r for r in train_recs + eval_recs if max(r["prompt_ids"]) >= cfg.vocab_size or min(r["prompt_ids"]) < 0]
    if bad_ids:
        usage(
            f"{len(bad_ids)} prompts hold token ids outside [0, vocab_size={cfg.vocab_size}), e.g. task "
            f"{bad_ids[0].get('task')!r}: the tokenizer does not belong to this model"
        )
    return train_recs, eval_recs


def _evaluator(run: TrainRun, eval_recs: list[dict], encode, decode, stop_ids):
    """``run_eval(params, tag) -> metrics``: held-out pass@1 of ``params`` (and greedy accuracy), printed and
    appended to ``<out_dir>/eval.jsonl`` by the chief; {} without held-out prompts."""
    from ring_jax.rl.evaluate import evaluate

    out_dir = run.out_dir

    def run_eval(params, tag):
        if not eval_recs:
            return {}
        res = evaluate(
            run.graphdef,
            params,
            eval_recs,
            encode_prompt=encode,
            decode=decode,
            stop_ids=stop_ids,
            n=FLAGS.eval_n,
            top_p=FLAGS.eval_top_p,
            max_new_tokens=FLAGS.max_new_tokens,
            seed=FLAGS.eval_seed,
            num_slots=FLAGS.eval_slots or FLAGS.num_slots,
            moe_impl=FLAGS.sampling_moe_impl,
            greedy=FLAGS.eval_greedy,
        )
        if run.chief:

            def line(m):
                return (
                    f"pass@1 {m.pass_at_1.fmt()}, pass@{FLAGS.eval_n} {m.pass_at_k.fmt()}"
                    + (f", greedy {m.greedy.fmt()}" if m.greedy else "")
                    + f", length {m.response_len:.1f}, unfinished {m.unfinished.value:.3f} ({m.num_prompts} "
                    f"prompts x {FLAGS.eval_n}, T=1, top-p {FLAGS.eval_top_p}; 95% intervals)"
                )

            print(f"[eval {tag}] held-out {line(res.overall)}", flush=True)
            for fam, m in res.families.items():
                print(f"[eval {tag}]   {fam}: {line(m)}", flush=True)
            with open(os.path.join(out_dir, "eval.jsonl"), "a") as f:
                f.write(
                    json.dumps(
                        {
                            "tag": tag,
                            "pass_at_1": res.pass_at_1,
                            "per_task": res.per_task,
                            "mean_reward": res.mean_reward,
                            "response_len": res.response_len,
                            "n": res.n,
                            "families": {k: v.as_dict() for k, v in res.families.items()},
                            "overall": res.overall.as_dict(),
                            "samples": res.samples,
                        }
                    )
                    + "\n"
                )
            common.write_json(os.path.join(out_dir, f"eval_{tag}_prompts.json"), res.per_prompt)
        out = {"eval/pass_at_1": res.pass_at_1, **{f"eval/{k}/pass_at_1": v for k, v in res.per_task.items()}}
        if res.overall.greedy:
            out["eval/greedy"] = res.overall.greedy.value
        return out

    return run_eval


def main(argv: list[str]) -> None:
    common.start_main(argv)
    _check_flags()
    import jax

    from ring_jax.data import train_bpe
    from ring_jax.data.pipeline import prompt_dataset
    from ring_jax.rl.rollout import EngineRollout
    from ring_jax.rl.step import RLStep, make_rl_train_step
    from ring_jax.train.loop import LoopConfig
    from ring_jax.train.optim import OptimConfig
    from ring_jax.train.step import data_parallel_size, global_batch

    run = TrainRun.from_flags()
    if FLAGS.reward_model:
        _register_reward_model(run.mesh)
    dp = data_parallel_size(run.mesh)
    rl = _rl_config()
    run.check_resume()

    # ---- prompts and tokenizer
    train_src = _sources(FLAGS.tasks, FLAGS.num_prompts, FLAGS.task_seed, FLAGS.prompts_jsonl, "train")
    eval_src = _sources(FLAGS.eval_tasks, FLAGS.eval_prompts, FLAGS.eval_seed, FLAGS.eval_jsonl, "eval")
    tok = run.find_tokenizer()
    if tok is None and not (FLAGS.hf_dir or run.init_dir):
        texts = _prompt_texts(train_src + eval_src)
        if texts:  # a run from a preset with text prompts: its own tokenizer, trained on them
            vocab = run.cfg.vocab_size if run.cfg.vocab_size >= 320 else 384
            logging.info("no tokenizer given: training a %d-token BPE tokenizer on %d prompt texts", vocab, len(texts))
            tok = train_bpe(texts, vocab_size=vocab)
    if tok is None:
        encode, decode, stop_ids = (lambda r: r["prompt_ids"]), (lambda ids: " ".join(map(str, ids))), run.cfg.eos_ids
    else:
        from ring_jax.data.chat import ChatRenderer

        renderer = ChatRenderer(tok)
        encode, decode, stop_ids = (lambda r: r["prompt_ids"]), tok.decode, tuple(renderer.stop_ids)
        run.use_tokenizer(tok)
    train_recs, eval_recs = _prompt_records(train_src, eval_src, tok, run.cfg)

    # ---- model, optimizer, state
    n_upd = FLAGS.updates_per_rollout
    run.build(
        common.dataclass_from_flags(OptimConfig, schedule="constant", warmup_steps=FLAGS.warmup_steps * n_upd),
        FLAGS.steps * n_upd,
    )
    it = prompt_dataset(
        train_recs, FLAGS.prompts_per_step, seed=FLAGS.seed, num_epochs=None, shard_index=0, shard_count=1
    )
    run_eval = _evaluator(run, eval_recs, encode, decode, stop_ids)

    with run.checkpointer() as ckpt:
        state, start_step = run.restore_or_init(ckpt, it, record_init=True)
        ref_params = None
        if FLAGS.beta:  # the frozen pi_ref: the initial policy (a copy: the state is donated)
            ref_params = _reference_params(run) if run.resuming else jax.tree.map(lambda x: x.copy(), state.params)
        train_step = make_rl_train_step(run.graphdef, rl, run.optimizer, run.mesh, run.shardings, schedule=run.schedule)
        rl_step = RLStep(
            run.graphdef,
            train_step,
            rl,
            encode_prompt=encode,
            decode=decode,
            stop_ids=stop_ids,
            ref_params=ref_params,
            row_multiple=dp,
            seed=FLAGS.seed,
            to_device=lambda b: global_batch(b, run.mesh),
            rollout=EngineRollout(
                run.graphdef, num_slots=rl.num_slots, moe_impl=rl.sampling_moe_impl, dtype=rl.rollout_dtype
            ),
        )
        if FLAGS.eval_only:
            run_eval(state.params, "init")
            return
        before = run_eval(state.params, "before") if start_step == 0 and FLAGS.eval_before else {}
        total = FLAGS.steps
        no_signal = [0, 0]  # updates skipped for lack of signal, updates in all

        def step_fn(state, records):
            state, m = rl_step(state, records)
            no_signal[0] += int(m["skipped_no_signal"])
            no_signal[1] += n_upd
            step = int(jax.device_get(state.step)) // n_upd
            if FLAGS.eval_every and step % FLAGS.eval_every == 0 and step < total:
                m.update(run_eval(state.params, f"step{step}"))
            return state, m

        result = run.train(
            step_fn,
            state,
            it,
            start_step=start_step,
            ckpt=ckpt,
            desc="rl",
            loop_cfg=common.dataclass_from_flags(LoopConfig, total_steps=total),
            meta={"rl": json.loads(json.dumps(dataclasses.asdict(rl), default=str))},
        )
        after = run_eval(result.state.params, "after") if not result.preempted else {}
    run.exit_if_preempted(result)
    if run.chief:
        line = f"done: {result.step} RL steps; checkpoints in {run.ckpt_dir}"
        if no_signal[0]:
            line += (
                f"; {no_signal[0]} of {no_signal[1]} updates skipped: every selected response had advantage 0 "
                "(no reward varied within a group)"
            )
        if start_step == 0 and before and after:
            line += f"; held-out pass@1 {before['eval/pass_at_1']:.3f} -> {after['eval/pass_at_1']:.3f}"
        print(line, flush=True)


def run() -> None:
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
