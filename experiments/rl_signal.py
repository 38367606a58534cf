"""How much signal is in one RL step?  Cosines between the policy gradients of independent rollout batches.

From one checkpoint (no update is applied), for each (prompts per step, samples per prompt) configuration, draw
``--batches`` rollouts on disjoint prompt sets, select each one's C3PO budget (``--budget`` scaled with the
prompts, so tokens per prompt stay fixed), and take the gradient of the C3PO loss.  For independent batches g1, g2
of a true gradient mu with per-batch noise of covariance S/B, E[cos(g1, g2)] ~ |mu|^2 / (|mu|^2 + tr(S)/B): a cosine
near 0 means a step is mostly noise (Adam then moves every parameter by ~lr in a random direction), and the way it
grows with B says how many prompts a step needs.  Also prints, per configuration, the rollout pass rate, the share of
prompts whose group has any signal (rewards not all equal) and the gradient norm.  For scale, the same cosine between
two SFT batches of ``--sft_rows`` rows from ``--sft_jsonl`` (optional).

    python experiments/rl_signal.py --init_ckpt=runs/pipeline/sft/ckpt \\
        --prompts_jsonl=runs/pipeline/data/rl_prompts.jsonl --configs=16x8,64x8,16x16 --batches=4

A script, not a test: it prints a markdown table (BUILD_NOTES.md, issue 16, quotes it).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("init_ckpt", "", "checkpoint directory (DIR or DIR:STEP) of an SFT run")
flags.DEFINE_string("tokenizer", "", "tokenizer directory (default: the run's tokenizer/ or its parent's)")
flags.DEFINE_string("prompts_jsonl", "", "RL prompt records")
flags.DEFINE_list("configs", ["16x8", "64x8"], "PROMPTSxSAMPLES per step")
flags.DEFINE_integer("batches", 4, "independent rollout batches per configuration")
flags.DEFINE_integer("budget_per_prompt", 128, "C3PO budget per prompt (Phi = prompts x this; the pipeline: 2048/16)")
flags.DEFINE_integer("max_new_tokens", 64, "response length limit")
flags.DEFINE_float("beta", 1e-3, "KL coefficient (the reference is the checkpoint itself: its gradient is 0 here)")
flags.DEFINE_string("sft_jsonl", "", "SFT records for the SFT-gradient comparison ('' = skip)")
flags.DEFINE_integer("sft_rows", 8, "rows of one SFT batch")
flags.DEFINE_integer("seed", 0, "seed")


def _flat(tree):
    import jax
    import jax.numpy as jnp

    return jnp.concatenate([x.reshape(-1).astype(jnp.float32) for x in jax.tree.leaves(tree)])


def _cos_stats(gs):
    import numpy as np

    cs = [
        float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)) for a, b in itertools.combinations(gs, 2)
    ]
    return float(np.mean(cs)), float(np.std(cs)), len(cs)


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from ring_jax.cli.common import init_params, parse_ckpt_ref
    from ring_jax.data import load_tokenizer
    from ring_jax.data.chat import ChatRenderer
    from ring_jax.data.jsonl import load_prompt_records
    from ring_jax.rl.advantages import group_advantages
    from ring_jax.rl.losses import PolicyLossConfig
    from ring_jax.rl.selection import select_budgets
    from ring_jax.rl.step import RLConfig, RLStep, rl_loss_fn
    from ring_jax.sharding import make_mesh
    from ring_jax.train.checkpoint import Checkpointer, model_config_from_meta, resolve_ckpt_dir

    ref, step = parse_ckpt_ref(FLAGS.init_ckpt)
    run_dir, ckpt_dir = resolve_ckpt_dir(ref)
    with Checkpointer(ckpt_dir, read_only=True) as c:
        cfg = model_config_from_meta(c.read_meta(step))
    mesh = make_mesh("")
    graphdef, pvars, abstract = init_params(cfg, mesh, 0, materialize=False)
    with Checkpointer(ckpt_dir, read_only=True) as c:
        params = c.restore_params(abstract, jax.tree.map(lambda x: x.sharding, abstract), step).params
    tok_dir = FLAGS.tokenizer or next(
        p
        for p in (os.path.join(run_dir, "tokenizer"), os.path.join(os.path.dirname(run_dir), "tokenizer"))
        if os.path.exists(p)
    )
    tok = load_tokenizer(tok_dir)
    renderer = ChatRenderer(tok)
    recs, _ = load_prompt_records(FLAGS.prompts_jsonl, tokenizer=tok)
    random.Random(FLAGS.seed).shuffle(recs)
    print(
        f"{len(recs)} prompts; checkpoint {ckpt_dir} (step {step or 'latest'}); {cfg.num_hidden_layers} layers, "
        f"{cfg.num_experts} experts",
        flush=True,
    )

    grad_fns = {}

    def grad_of(rl, batch, normaliser):
        if rl not in grad_fns:
            loss_fn = rl_loss_fn(rl)

            @jax.jit
            def g(p, batch, normaliser):
                return _flat(jax.grad(lambda q: loss_fn(nnx.merge(graphdef, q), batch)[0] / normaliser)(p))

            grad_fns[rl] = g
        return np.asarray(grad_fns[rl](params, batch, jnp.float32(normaliser)))

    rows = []
    used = 0
    for conf in FLAGS.configs:
        P, S = (int(x) for x in conf.lower().split("x"))
        rl = RLConfig(
            samples_per_prompt=S,
            aggregation="c3po",
            budget=P * FLAGS.budget_per_prompt,
            selection_order="informative_first",
            max_new_tokens=FLAGS.max_new_tokens,
            temperature=1.0,
            top_p=1.0,
            num_slots=min(256, P * S),
            policy=PolicyLossConfig(beta=FLAGS.beta),
            tis_cap=0.0,
            alpha_bal=0.0,
            alpha_z=0.0,
        )  # the policy gradient alone (the MoE terms pay no reward)
        grads, stats = [], []
        t0 = time.time()
        for b in range(FLAGS.batches):
            batch_recs = recs[used : used + P]
            used += P
            if len(batch_recs) < P:
                sys.exit(f"out of prompts: {len(recs)} < needed")
            # RLStep for its rollout, scoring and row building only: no optimiser step is taken here
            step_obj = RLStep(
                graphdef,
                None,
                rl,
                encode_prompt=lambda r: r["prompt_ids"],
                decode=tok.decode,
                stop_ids=renderer.stop_ids,
                ref_params=params,
                seed=FLAGS.seed * 7919 + b + 100 * P,
            )
            prompts = [r["prompt_ids"] for r in batch_recs]
            comps = step_obj.rollout(params, prompts, key=FLAGS.seed * 7919 + b + 100 * P + 1000 * S)
            texts = [tok.decode([t for t in c.token_ids.tolist() if t not in renderer.stop_ids]) for c in comps]
            reward, valid, _ = step_obj.score([batch_recs[c.prompt_index] for c in comps], texts)
            adv = group_advantages(reward, [c.prompt_index for c in comps], valid=valid)
            lengths = np.array([len(c.token_ids) for c in comps])
            sel = select_budgets(lengths, rl.budget, 1, rl.selection_order, seed=b, advantages=adv, eligible=valid)[0]
            tis = [(np.ones(len(c.token_ids), np.float32), 0.0) for c in comps]
            batch, normaliser, _, _ = step_obj._batch(comps, sel, adv, tis)
            g = grad_of(rl, batch, normaliser)
            grads.append(g)
            by_prompt = np.array(reward).reshape(P, S)
            stats.append(
                (float(np.mean(reward)), float(np.mean(by_prompt.max(1) != by_prompt.min(1))), float(np.linalg.norm(g)))
            )
        m, sd, npairs = _cos_stats(grads)
        mean_g = np.mean(grads, axis=0)
        st = np.array(stats)
        rows.append(
            (
                conf,
                P * FLAGS.budget_per_prompt,
                m,
                sd,
                npairs,
                st[:, 0].mean(),
                st[:, 1].mean(),
                st[:, 2].mean(),
                float(np.linalg.norm(mean_g)),
                time.time() - t0,
            )
        )
        print(
            f"{conf}: cos {m:+.4f} +- {sd:.4f} over {npairs} pairs; pass rate {st[:, 0].mean():.3f}; groups with "
            f"signal {st[:, 1].mean():.3f}; |g| {st[:, 2].mean():.4f}; ({time.time() - t0:.0f}s)",
            flush=True,
        )

    sft_line = None
    if FLAGS.sft_jsonl:
        from ring_jax.data.pipeline import sft_dataset
        from ring_jax.train.losses import LossConfig, sft_loss_fn

        it = iter(sft_dataset(FLAGS.sft_jsonl, tok, 256, FLAGS.sft_rows, seed=FLAGS.seed))
        loss = sft_loss_fn(LossConfig(alpha_bal=0.0, alpha_z=0.0))
        gs = []
        for _ in range(FLAGS.batches):
            b = {k: jnp.asarray(v) for k, v in next(it).items()}
            n = jnp.maximum(jnp.sum(b["loss_mask"]), 1)
            gs.append(
                np.asarray(
                    jax.jit(lambda p, b=b, n=n: _flat(jax.grad(lambda q: loss(nnx.merge(graphdef, q), b)[0] / n)(p)))(
                        params
                    )
                )
            )
        sm, ssd, snp = _cos_stats(gs)
        sft_line = (sm, ssd, snp)
        print(f"SFT {FLAGS.sft_rows} rows: cos {sm:+.4f} +- {ssd:.4f}", flush=True)

    print(
        "\n| prompts x samples | Phi | cos(g_i, g_j) mean +- sd (pairs) | rollout pass rate | groups with signal | "
        "mean abs g | abs(mean g) | s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for conf, phi, m, sd, npairs, pr, sig, gn, mg, s in rows:
        print(
            f"| {conf} | {phi} | {m:+.4f} +- {sd:.4f} ({npairs}) | {pr:.3f} | {sig:.3f} | {gn:.4f} | {mg:.4f} "
            f"| {s:.0f} |"
        )
    if sft_line:
        print(
            f"| SFT batch of {FLAGS.sft_rows} x 256-token rows | - | {sft_line[0]:+.4f} +- {sft_line[1]:.4f} "
            f"({sft_line[2]}) | - | - | - | - | - |"
        )
    print("RESULTS " + json.dumps({"rows": rows, "sft": sft_line}))


if __name__ == "__main__":
    app.run(main)
