"""The distribution of the trainer / sampler mismatch on one checkpoint, token by token (issue 30, item 6).

From a checkpoint (the main job's SFT one), one rollout of ``--prompts`` x ``--samples`` responses per sampler dtype
(the same prompts and keys), then the float32 trainer's forward over prompt + response (its own routing).  Per token
d = log pi_train - log pi_infer (pi_infer: the sampler's temperature-1 log-prob): quantiles of |d|, the share past
2x, and |d| split by whether the token's top-k expert set differed from the trainer's in any MoE layer (the
routing flips a MoE adds on top of rounding).  With ``--replay`` the trainer's forward replays the sampler's
record, which shows what routing replay leaves: rounding.

    python experiments/mismatch_distribution.py --init_ckpt=RUN/sft/ckpt --prompts_jsonl=RUN/data/rl_prompts.jsonl

A script, not a test: it prints a markdown table (BUILD_NOTES.md, issue 30, quotes it) and writes it to --out.
"""

from __future__ import annotations

import functools
import os
import random

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("init_ckpt", "", "checkpoint directory (DIR or DIR:STEP)")
flags.DEFINE_string("tokenizer", "", "tokenizer directory (default: the run's tokenizer/ or its parent's)")
flags.DEFINE_string("prompts_jsonl", "", "prompt records")
flags.DEFINE_integer("prompts", 64, "prompts")
flags.DEFINE_integer("samples", 8, "samples per prompt")
flags.DEFINE_integer("max_new_tokens", 64, "response length limit")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "sampler dtypes")
flags.DEFINE_integer("seed", 0, "prompt draw and sampling seed")
flags.DEFINE_string("out", "", "also write the table here")

QUANTILES = (0.5, 0.9, 0.99, 0.999)


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
    from ring_jax.sampling.engine import SamplingEngine
    from ring_jax.sampling.types import SamplingParams
    from ring_jax.sharding import make_mesh
    from ring_jax.train.checkpoint import Checkpointer, model_config_from_meta, resolve_ckpt_dir

    ref, step = parse_ckpt_ref(FLAGS.init_ckpt)
    run_dir, ckpt_dir = resolve_ckpt_dir(ref)
    with Checkpointer(ckpt_dir, read_only=True) as c:
        cfg = model_config_from_meta(c.read_meta(step))
    graphdef, _, abstract = init_params(cfg, make_mesh(""), 0, materialize=False)
    with Checkpointer(ckpt_dir, read_only=True) as c:
        params = c.restore_params(abstract, jax.tree.map(lambda x: x.sharding, abstract), step).params
    tok_dir = FLAGS.tokenizer or next(
        p
        for p in (os.path.join(run_dir, "tokenizer"), os.path.join(os.path.dirname(run_dir), "tokenizer"))
        if os.path.exists(p)
    )
    tok = load_tokenizer(tok_dir)
    stop = tuple(ChatRenderer(tok).stop_ids)
    recs, _ = load_prompt_records(FLAGS.prompts_jsonl, tokenizer=tok)
    random.Random(FLAGS.seed).shuffle(recs)
    prompts = [r["prompt_ids"] for r in recs[: FLAGS.prompts]]
    sp = SamplingParams(max_new_tokens=FLAGS.max_new_tokens, n=FLAGS.samples, stop_token_ids=stop)

    @functools.partial(jax.jit, static_argnames=("replay",))
    def trainer(tokens, routing, replay):
        out = nnx.merge(graphdef, params)(tokens, routing=routing if replay else None, return_routing=True)
        return jax.nn.log_softmax(out.logits, -1), out.routing

    lines = [
        f"Checkpoint {ckpt_dir}, {len(prompts)} prompts x {FLAGS.samples} samples at T = 1; float32 trainer. "
        "|d| = |log pi_train - log pi_infer| per response token; 'flipped' = at the position that predicts the "
        "token, the sampler's top-k set differed from the trainer router's own in at least one MoE layer.",
        "",
        "| sampler | trainer routing | tokens | "
        + " | ".join(f"q{q:g} abs d" for q in QUANTILES)
        + " | max abs d | past 2x | flipped tokens | mean abs d flipped | mean abs d not flipped |",
        "|---|---|---|" + "---|" * len(QUANTILES) + "---|---|---|---|---|",
    ]
    for dtype in FLAGS.dtypes:
        eng = SamplingEngine(graphdef, params, num_slots=256, record_routing=True, dtype=dtype)
        comps = eng.generate(prompts, sp, key=FLAGS.seed)
        for replay in (False, True):
            ds, flips = [], []
            for c in comps:
                ids = np.concatenate([c.prompt_ids, c.token_ids]).astype(np.int32)
                n, p = len(ids), len(c.prompt_ids)
                pad = 1 << (n - 1).bit_length()
                toks = np.zeros((1, pad), np.int32)
                toks[0, :n] = ids
                rout = np.full((1, pad) + c.routing.shape[1:], -1, np.int8)
                rout[0, :n] = c.routing
                lp, own = trainer(jnp.asarray(toks), jnp.asarray(rout), replay)
                lp, own = np.asarray(lp)[0], np.asarray(own)[0]
                train = lp[p - 1 : n - 1][np.arange(len(c.token_ids)), c.token_ids]
                ds.append(np.abs(train.astype(np.float64) - c.raw_logprobs))
                # response token j is predicted at position p - 1 + j: did that position's experts differ?
                diff = np.any(np.sort(own[: n - 1], -1) != np.sort(c.routing[: n - 1], -1), axis=(-1, -2))
                flips.append(diff[p - 1 : n - 1])
            d, f = np.concatenate(ds), np.concatenate(flips)
            qs = " | ".join(f"{np.quantile(d, q):.2e}" for q in QUANTILES)
            mf = f"{d[f].mean():.2e}" if f.any() else "-"
            mn = f"{d[~f].mean():.2e}" if (~f).any() else "-"
            lines.append(
                f"| {dtype} | {'replayed' if replay else 'own'} | {d.size} | {qs} | {d.max():.2e} "
                f"| {np.mean(d > np.log(2)):.4f} | {f.mean():.3f} | {mf} | {mn} |"
            )
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if FLAGS.out:
        with open(FLAGS.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    app.run(main)
