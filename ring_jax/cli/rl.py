"""ring-jax-rl: C3PO reinforcement learning with verifiable rewards (Ring-lite section 3.2).

    ring-jax-rl --flagfile=experiments/flags/rl_small_cpu.flags --init_ckpt=runs/sft/ckpt --out_dir=runs/rl
    ring-jax-rl --preset=tiny --tasks=chain_sum --steps=4 --budget=256 --out_dir=/tmp/rl     # no SFT, no data
    ring-jax-rl ... --aggregation=seq_mean --responses_per_step=16     # sample-level GRPO baseline

Each step: rollout (the sampling engine on the live parameters) -> rewards (ring_jax.rewards registry) -> GRPO
advantages -> C3PO token-budget selection -> micro-batched update normalised by the budget.  With --eval_tasks or
--eval_jsonl, held-out pass@1 is measured before the first step and after the last (and every --eval_every steps).

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
    flags.DEFINE_integer("eval_every", 0, "evaluate every N steps (0: only before and after)")
    # rollout and C3PO
    flags.DEFINE_integer("prompts_per_step", 8, "prompts per step (L)")
    flags.DEFINE_integer("samples_per_prompt", 4, "responses per prompt (K)")
    flags.DEFINE_enum("aggregation", "c3po", ["c3po", "seq_mean", "token_mean"], "loss aggregation / batching")
    flags.DEFINE_integer("budget", 1024, "C3PO token budget Phi per optimiser step")
    flags.DEFINE_integer("responses_per_step", 0, "baselines: responses per step (0: all)")
    flags.DEFINE_enum("selection_order", "random", ["random", "rollout", "shortest_first", "longest_first",
                                                    "informative_first"],
                      "order of the greedy budget selection (informative_first: non-zero advantages first)")
    flags.DEFINE_bool("binary_reward", True, "reward 1 iff the verifier scores 1 (Ring-lite; no partial credit); "
                      "learned reward-model scores pass through")
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
    flags.DEFINE_float("reward_timeout_s", 30.0, "per-response reward timeout")
    flags.DEFINE_string("reward_model", "", "learned reward model directory (ring_jax.rl.reward_model "
                        "LearnedRewardModel.save) that scores records of task 'reward_model'")
    # optimiser and run
    flags.DEFINE_integer("steps", 20, "RL steps")
    flags.DEFINE_float("lr", 3e-6, "learning rate (constant after warm-up; Ring-lite: 3e-6)")
    flags.DEFINE_integer("warmup_steps", 0, "warm-up steps")
    flags.DEFINE_float("weight_decay", 0.1, "decoupled weight decay")
    flags.DEFINE_float("clip_norm", 1.0, "global gradient-norm clipping (<= 0: off)")
    flags.DEFINE_integer("ckpt_every", 10, "checkpoint every N steps (0: only at the end)")
    flags.DEFINE_integer("keep", 2, "checkpoints to keep")
    flags.DEFINE_bool("resume", False, "continue from the newest checkpoint in --out_dir/ckpt")
    flags.DEFINE_string("out_dir", "runs/rl", "run directory")
    flags.DEFINE_integer("max_nonfinite", 5, "stop after this many consecutive non-finite steps")
    flags.DEFINE_bool("progress_bar", True, "show the progress bar")


def _prompt_records(tasks, n, seed, jsonl):
    from ring_jax.data.tasks import FAMILIES, make_task_records

    recs = []
    for fam in tasks:
        if fam not in FAMILIES:
            usage(f"unknown task family {fam!r}; known: {', '.join(sorted(FAMILIES))}")
        recs += make_task_records(fam, n, seed)
    if jsonl:
        if not os.path.exists(jsonl):
            usage(f"{jsonl}: no such file")
        with open(jsonl) as f:
            recs += [json.loads(line) for line in f if line.strip()]
    return recs


def _tokenizer(init_run: str):
    from ring_jax.data import load_tokenizer

    for p in (FLAGS.tokenizer, FLAGS.hf_dir, os.path.join(init_run, "tokenizer") if init_run else "",
              os.path.join(FLAGS.out_dir, "tokenizer")):
        if p and any(os.path.isfile(os.path.join(p, n)) for n in ("tokenizer.json", "tokenizer.model")) or (
                p and os.path.isfile(p)):
            try:
                return load_tokenizer(p)
            except (FileNotFoundError, ValueError) as e:
                usage(f"tokenizer: {e}")
    return None


def main(argv):
    if len(argv) > 1:
        usage(f"unexpected arguments: {' '.join(argv[1:])}")
    common.init_distributed()
    import jax

    from ring_jax.data.chat import ChatRenderer
    from ring_jax.data.pipeline import prompt_dataset
    from ring_jax.rl.evaluate import evaluate
    from ring_jax.rl.losses import PolicyLossConfig
    from ring_jax.rl.step import RL_SUM_KEYS, RLConfig, RLStep, rl_loss_fn
    from ring_jax.train.checkpoint import CheckpointError, Checkpointer, latest_step_in
    from ring_jax.train.loop import LoopConfig, NonFiniteError, batches_with_state, train_loop
    from ring_jax.train.metrics import MetricsWriter
    from ring_jax.train.optim import OptimConfig, decay_mask, make_optimizer
    from ring_jax.train.step import (abstract_train_state, create_train_state, data_parallel_size, global_batch,
                                     make_train_step, train_state_shardings)

    chief = jax.process_index() == 0
    cfg = common.model_config_from_flags()
    cfg, init_run, init_dir, init_step = common.resolve_init_ckpt(cfg)
    if not FLAGS.tasks and not FLAGS.prompts_jsonl:
        usage("give --tasks and/or --prompts_jsonl")
    mesh = common.build_mesh(FLAGS.mesh)
    if FLAGS.reward_model:
        if not os.path.isdir(os.path.join(FLAGS.reward_model, "ckpt")):
            usage(f"--reward_model: {FLAGS.reward_model} holds no ckpt/ (write one with LearnedRewardModel.save)")
        from ring_jax.rewards.general import register_reward_model
        from ring_jax.rl.reward_model import LearnedRewardModel, RewardModelError

        try:
            register_reward_model(LearnedRewardModel.load(FLAGS.reward_model, mesh=mesh))
        except (RewardModelError, FileNotFoundError) as e:
            usage(f"--reward_model: {e}")
    dp = data_parallel_size(mesh)
    if FLAGS.budget <= 0 and FLAGS.aggregation == "c3po":
        usage("--budget must be positive")

    out_dir = os.path.abspath(FLAGS.out_dir)
    ckpt_dir = os.path.join(out_dir, "ckpt")
    latest = latest_step_in(ckpt_dir)
    if latest is not None and not FLAGS.resume:
        usage(f"{ckpt_dir} already holds checkpoints (latest step {latest}); pass --resume or another --out_dir")
    tok = _tokenizer(init_run or "")
    train_recs = _prompt_records(FLAGS.tasks, FLAGS.num_prompts, FLAGS.task_seed, FLAGS.prompts_jsonl)
    eval_recs = _prompt_records(FLAGS.eval_tasks, FLAGS.eval_prompts, FLAGS.eval_seed, FLAGS.eval_jsonl)
    if tok is None:
        if not all("prompt_ids" in r for r in train_recs + eval_recs):
            usage("no tokenizer found (--tokenizer, --hf_dir, or an --init_ckpt run with tokenizer/) and the "
                  "prompts have no prompt_ids")
        encode, decode, stop_ids = (lambda r: r["prompt_ids"]), (lambda ids: " ".join(map(str, ids))), cfg.eos_ids
    else:
        renderer = ChatRenderer(tok)

        def encode(r):
            if "prompt_ids" in r:
                return r["prompt_ids"]
            return renderer.render_prompt([{"role": "user", "content": r["prompt"]}])

        decode, stop_ids = tok.decode, tuple(renderer.stop_ids)
        if tok.vocab_size > cfg.vocab_size:
            if FLAGS.hf_dir or FLAGS.init_ckpt:
                usage(f"tokenizer vocabulary {tok.vocab_size} > model vocab_size {cfg.vocab_size}")
            cfg = cfg.replace(vocab_size=-(-tok.vocab_size // 64) * 64)
        if chief:
            tok.save(os.path.join(out_dir, "tokenizer"))

    rl = RLConfig(samples_per_prompt=FLAGS.samples_per_prompt, aggregation=FLAGS.aggregation, budget=FLAGS.budget,
                  responses_per_step=FLAGS.responses_per_step, selection_order=FLAGS.selection_order,
                  max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature, top_p=FLAGS.top_p,
                  seq_len=FLAGS.seq_len, num_micro=FLAGS.micro_batches,
                  policy=PolicyLossConfig(clip_eps=FLAGS.clip_eps, beta=FLAGS.beta, alpha_ent=FLAGS.alpha_ent),
                  alpha_bal=FLAGS.alpha_bal, alpha_z=FLAGS.alpha_z, reward_timeout_s=FLAGS.reward_timeout_s,
                  binary_reward=FLAGS.binary_reward,
                  num_slots=FLAGS.num_slots, sampling_moe_impl=FLAGS.sampling_moe_impl)
    optim_cfg = OptimConfig(lr=FLAGS.lr, schedule="constant", warmup_steps=FLAGS.warmup_steps,
                            weight_decay=FLAGS.weight_decay, clip_norm=FLAGS.clip_norm)
    resuming = FLAGS.resume and latest is not None
    graphdef, pvars, params = common.init_params(cfg, mesh, FLAGS.seed, FLAGS.hf_dir,
                                                 materialize=not (resuming or init_dir))
    optimizer, schedule = make_optimizer(optim_cfg, FLAGS.steps, decay_mask(pvars))
    abstract = abstract_train_state(params, optimizer, FLAGS.seed)
    shardings = train_state_shardings(pvars, abstract, mesh)
    it = prompt_dataset(train_recs, FLAGS.prompts_per_step, seed=FLAGS.seed, num_epochs=None, shard_index=0,
                        shard_count=1)

    def run_eval(params, tag):
        if not eval_recs:
            return {}
        res = evaluate(graphdef, params, eval_recs, encode_prompt=encode, decode=decode, stop_ids=stop_ids,
                       n=FLAGS.eval_n, top_p=FLAGS.eval_top_p, max_new_tokens=FLAGS.max_new_tokens,
                       seed=FLAGS.eval_seed, num_slots=FLAGS.num_slots, moe_impl=FLAGS.sampling_moe_impl)
        if chief:
            print(f"[eval {tag}] held-out pass@1 = {res.pass_at_1:.3f} "
                  + " ".join(f"{k}={v:.3f}" for k, v in res.per_task.items())
                  + f" (n={FLAGS.eval_n}, {res.num_prompts} prompts, mean length {res.response_len:.1f})",
                  flush=True)
            with open(os.path.join(out_dir, "eval.jsonl"), "a") as f:
                f.write(json.dumps({"tag": tag, "pass_at_1": res.pass_at_1, "per_task": res.per_task,
                                    "mean_reward": res.mean_reward, "response_len": res.response_len,
                                    "samples": res.samples}) + "\n")
        return {"eval/pass_at_1": res.pass_at_1, **{f"eval/{k}/pass_at_1": v for k, v in res.per_task.items()}}

    with Checkpointer(ckpt_dir, save_every=FLAGS.ckpt_every, keep=FLAGS.keep) as ckpt:
        start_step = 0
        ref_params = None
        if resuming:
            try:
                restored = ckpt.restore(abstract, shardings)
            except CheckpointError as e:
                common.die(str(e))
            state, start_step = restored.state, restored.step
            if restored.data_state:
                it.set_state(restored.data_state)
            if FLAGS.beta:
                ref_params = state.params  # best effort: the reference after a resume is not the initial policy
                logging.warning("resumed: the KL reference is re-anchored at the restored parameters")
        else:
            if init_dir:
                try:
                    with Checkpointer(init_dir, read_only=True) as c:
                        restored_init = c.restore_params(params, shardings.params, init_step)
                except CheckpointError as e:
                    common.die(f"--init_ckpt: {e}")
                params = restored_init.params
                common.write_init_record(out_dir, init_dir, restored_init.step, params, chief)
            state = create_train_state(params, optimizer, shardings, FLAGS.seed)
            if FLAGS.beta:
                ref_params = jax.tree.map(lambda x: x.copy(), state.params)  # frozen pi_ref
        if chief:
            common.write_json(os.path.join(out_dir, "config.json"), cfg.to_hf_dict())
        train_step = make_train_step(graphdef, rl_loss_fn(rl), optimizer, mesh, shardings, FLAGS.micro_batches,
                                     schedule=schedule, sum_aux_keys=RL_SUM_KEYS)
        rl_step = RLStep(graphdef, train_step, rl, encode_prompt=encode, decode=decode, stop_ids=stop_ids,
                         ref_params=ref_params, row_multiple=dp, seed=FLAGS.seed,
                         to_device=lambda b: global_batch(b, mesh))
        if start_step == 0:
            before = run_eval(state.params, "before")
        total = FLAGS.steps

        def step_fn(state, records):
            state, m = rl_step(state, records)
            step = int(jax.device_get(state.step))
            if FLAGS.eval_every and step % FLAGS.eval_every == 0 and step < total:
                m.update(run_eval(state.params, f"step{step}"))
            return state, m

        meta = {"model_config": cfg.to_hf_dict(),
                "runtime": {k: getattr(cfg, k) for k in ("dtype", "param_dtype", "moe_impl", "remat")},
                "rl": json.loads(json.dumps(dataclasses.asdict(rl), default=str)), "total_steps": total}
        with MetricsWriter(out_dir, total, is_chief=chief, desc="rl", show_bar=FLAGS.progress_bar) as writer:
            try:
                result = train_loop(step_fn, state, batches_with_state(it), start_step=start_step,
                                    cfg=LoopConfig(total_steps=total, max_nonfinite=FLAGS.max_nonfinite),
                                    checkpointer=ckpt, writer=writer, meta=meta)
            except NonFiniteError as e:
                common.die(str(e))
        after = run_eval(result.state.params, "after") if not result.preempted else {}
    if result.preempted:
        print(f"pre-empted by signal {result.signal}: checkpoint of step {result.step} in {ckpt_dir}", flush=True)
        sys.exit(128 + int(result.signal))
    if chief:
        line = f"done: {result.step} RL steps; checkpoints in {ckpt_dir}"
        if start_step == 0 and before and after:
            line += f"; held-out pass@1 {before['eval/pass_at_1']:.3f} -> {after['eval/pass_at_1']:.3f}"
        print(line, flush=True)


def run():
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
