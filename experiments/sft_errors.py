"""Where does an SFT checkpoint fail?  Greedy and sampled accuracy on held-out and on train-side prompts, and for chain
sums the share of greedy answers whose FIRST step is already right, by number of terms.

Issue 16 asks what holds RL back.  A model that fails held-out problems because it computes badly in a way that
every problem shares (a habit, a strategy) gives RL a signal that transfers; a model that fails because it never
learned a fact, or recalls train problems by heart, gives RL little that carries over to unseen problems.  This
script separates the two for the pipeline's families:

- held-out (``data/eval.jsonl``) against train-side prompts (``data/rl_prompts.jsonl``, which overlap the SFT
  corpus): a large gap means answers recalled per problem rather than computed;
- chain sums by terms: 2-term problems are one fact; for 3-term ones the first step is a one-digit fact and the
  second adds or subtracts a digit to a number in [-9, 18].

    python experiments/sft_errors.py --run=runs/pipeline [--step=800] [--prompts=200] [--n=8]

A script, not a test: it prints a markdown table (BUILD_NOTES.md, issue 16, quotes it).
"""

from __future__ import annotations

import collections
import os

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("run", "", "a ring-jax-pipeline run folder (data/, tokenizer/, sft/ckpt)")
flags.DEFINE_integer("step", 0, "SFT checkpoint step (0: the newest)")
flags.DEFINE_integer("prompts", 200, "prompts per family and file (a seeded draw)")
flags.DEFINE_integer("n", 8, "samples per prompt at T = 1, top-p 0.95")
flags.DEFINE_integer("seed", 0, "seed of the draw and the samples")


def chain_terms(prompt: str) -> list[str]:
    """'7 + 4 - 3 =' -> ['7', '+', '4', '-', '3']."""
    return prompt.rstrip(" =").split(" ")


def first_step_ok(prompt: str, response: str) -> bool:
    """Whether a chain-sum response starts with the right first step 'a op b = v'."""
    t = chain_terms(prompt)
    a, op, b = int(t[0]), t[1], int(t[2])
    return response.startswith(f"{a} {op} {b} = {a + b if op == '+' else a - b}\n")


def main(argv):
    del argv
    import numpy as np

    from ring_jax.cli.export import restore_model
    from ring_jax.data import load_tokenizer
    from ring_jax.data.chat import ChatRenderer
    from ring_jax.data.jsonl import load_prompt_records
    from ring_jax.rewards import registry as rewards
    from ring_jax.sampling.engine import SamplingEngine
    from ring_jax.sampling.types import SamplingParams
    from ring_jax.train.step import split_model

    run = os.path.abspath(FLAGS.run)
    tok = load_tokenizer(os.path.join(run, "tokenizer"))
    model, _, step = restore_model(os.path.join(run, "sft", "ckpt"), FLAGS.step or None)
    graphdef, _, params = split_model(model)
    stop = ChatRenderer(tok).stop_ids
    engine = SamplingEngine(graphdef, params, num_slots=256)
    rng = np.random.default_rng(FLAGS.seed)

    def decode(c):
        return tok.decode([t for t in c.token_ids.tolist() if t not in stop])

    print(
        f"SFT checkpoint {run}/sft/ckpt step {step}; {FLAGS.prompts} prompts per family and side, greedy and "
        f"{FLAGS.n} samples at T = 1 / top-p 0.95\n"
    )
    print("| side | family | greedy | pass@1 | pass@n | chain sums: terms | greedy | first step right |")
    print("|---|---|---|---|---|---|---|---|")
    for side, name in (("held-out", "eval.jsonl"), ("train-side", "rl_prompts.jsonl")):
        recs, _ = load_prompt_records(os.path.join(run, "data", name), tokenizer=tok, max_prompt_tokens=192)
        by_fam = collections.defaultdict(list)
        for r in recs:
            by_fam[r["family"]].append(r)
        for fam, rs in sorted(by_fam.items()):
            pick = [rs[i] for i in sorted(rng.choice(len(rs), size=min(FLAGS.prompts, len(rs)), replace=False))]
            prompts = [r["prompt_ids"] for r in pick]
            g = engine.generate(
                prompts, SamplingParams(temperature=0.0, max_new_tokens=64, stop_token_ids=tuple(stop)), key=FLAGS.seed
            )
            s = engine.generate(
                prompts,
                SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=64, n=FLAGS.n, stop_token_ids=tuple(stop)),
                key=FLAGS.seed + 1,
            )
            gtext = [decode(c) for c in g]
            gres, _ = rewards.score_batch(pick, gtext, timeout_s=30)
            sres, _ = rewards.score_batch([pick[c.prompt_index] for c in s], [decode(c) for c in s], timeout_s=30)
            gok = np.array([x.reward >= 1 for x in gres])
            solved = np.zeros(len(pick))
            for c, x in zip(s, sres):
                solved[c.prompt_index] += x.reward >= 1
            row = f"| {side} | {fam} | {gok.mean():.3f} | {solved.mean() / FLAGS.n:.3f} | {(solved > 0).mean():.3f} |"
            if fam.startswith("chain_sum"):
                for nt in sorted({len(chain_terms(r["prompt"])) // 2 + 1 for r in pick}):
                    idx = [i for i, r in enumerate(pick) if len(chain_terms(r["prompt"])) // 2 + 1 == nt]
                    first = np.mean([first_step_ok(pick[i]["prompt"], gtext[i]) for i in idx])
                    print(f"{row} {nt} ({len(idx)}) | {gok[idx].mean():.3f} | {first:.3f} |")
            else:
                print(f"{row} - | - | - |")


if __name__ == "__main__":
    app.run(main)
