"""Generated instruction-following prompts for the "ifeval" reward (general RL in the two-stage schedule).

Each record is ``{"task": "ifeval", "prompt": ..., "constraints": [...]}`` in the format of
``ring_jax.rewards.general`` (its checks decide the reward: the fraction of constraints satisfied).  A prompt is a
short writing request on a topic followed by one to three instructions, each stated in words next to the machine
check it maps to; instructions that could contradict each other (a keyword both required and forbidden, a minimum
word count above the maximum, JSON with paragraphs, word limits, lowercase or an ending phrase, a capitalised ending
phrase with lowercase) are never combined.
Deterministic for a given seed.

    python -m ring_jax.rewards.ifeval_prompts --n=200 --seed=0 --out=experiments/data/ifeval_small.jsonl
    python -m ring_jax.rewards.ifeval_prompts --n=64 --seed=1 --exclude_jsonl=experiments/data/ifeval_small.jsonl \
        --out=experiments/data/ifeval_small_eval.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterable, Sequence

from ring_jax.rewards.general import check_constraint

TOPICS = (
    "the sea",
    "a small town",
    "autumn",
    "a library",
    "trains",
    "the moon",
    "bread",
    "a garden",
    "rain",
    "mountains",
    "a market",
    "music",
    "a river",
    "winter",
    "bees",
    "a bridge",
    "the desert",
    "clocks",
)
REQUESTS = (
    "Write a short note about {t}.",
    "Describe {t}.",
    "Say something about {t}.",
    "Tell me about {t}.",
    "Write a few lines on {t}.",
)
KEYWORDS = ("blue", "quiet", "light", "stone", "warm", "green", "old", "bright", "slow", "open")
ENDINGS = ("The end.", "That is all.", "Thank you.")

# the constraint types drawn (all of `ring_jax.rewards.general.CONSTRAINT_CHECKS`)
KINDS = (
    "max_words",
    "min_words",
    "include_keywords",
    "exclude_keywords",
    "lowercase",
    "num_paragraphs",
    "ends_with",
    "json_format",
)


def _constraint(kind: str, rng: random.Random, used_words: set[str]) -> tuple[str, dict]:
    if kind == "max_words":
        n = rng.choice((10, 15, 20, 30))
        return f"Answer in at most {n} words.", {"type": kind, "n": n}
    if kind == "min_words":
        n = rng.choice((3, 5, 8))
        return f"Use at least {n} words.", {"type": kind, "n": n}
    if kind in ("include_keywords", "exclude_keywords"):
        w = rng.choice([k for k in KEYWORDS if k not in used_words])
        used_words.add(w)
        text = f'Include the word "{w}".' if kind == "include_keywords" else f'Do not use the word "{w}".'
        return text, {"type": kind, "words": [w]}
    if kind == "lowercase":
        return "Write everything in lowercase letters.", {"type": kind}
    if kind == "num_paragraphs":
        n = rng.choice((1, 2, 3))
        text = "Write a single paragraph." if n == 1 else f"Write exactly {n} paragraphs, separated by blank lines."
        return text, {"type": kind, "n": n}
    if kind == "ends_with":
        e = rng.choice(ENDINGS)
        return f'End your answer with "{e}"', {"type": kind, "text": e}
    if kind == "json_format":
        return "Give the whole answer as JSON.", {"type": kind}
    raise ValueError(f"unknown constraint kind {kind!r}")


_CONFLICTS = {
    ("json_format", "num_paragraphs"),
    ("json_format", "ends_with"),
    ("json_format", "lowercase"),
    ("json_format", "min_words"),
    ("json_format", "max_words"),
    ("ends_with", "lowercase"),
}


def _compatible(kinds: list[str]) -> bool:
    ks = set(kinds)
    return not any(a in ks and b in ks for a, b in _CONFLICTS)


def make_ifeval_records(n: int, seed: int = 0, max_constraints: int = 3, exclude: Iterable[str] = ()) -> list[dict]:
    """``n`` distinct ifeval records (1..max_constraints constraints each), deterministic for ``seed``; prompts in
    ``exclude`` (e.g. a training set's, for a disjoint held-out set) are skipped."""
    if n < 0 or max_constraints < 1:
        raise ValueError(f"need n >= 0 and max_constraints >= 1, got n={n}, max_constraints={max_constraints}")
    rng = random.Random(seed)
    out = []
    seen = set(exclude)
    misses = 0  # draws in a row that gave nothing new: the space of prompts is finite
    while len(out) < n and misses < 10_000:
        misses += 1
        k = rng.randint(1, max_constraints)
        kinds = rng.sample(KINDS, k)
        if not _compatible(kinds):
            continue
        used: set[str] = set()
        parts = [_constraint(kind, rng, used) for kind in kinds]
        cons = [c for _, c in parts]
        mx = [c["n"] for c in cons if c["type"] == "max_words"]
        mn = [c["n"] for c in cons if c["type"] == "min_words"]
        if mx and mn and mn[0] > mx[0]:
            continue
        prompt = " ".join([rng.choice(REQUESTS).format(t=rng.choice(TOPICS))] + [t for t, _ in parts])
        if prompt in seen:
            continue
        seen.add(prompt)
        for c in cons:  # every constraint is well-formed for the checker
            check_constraint("x", c)
        out.append({"task": "ifeval", "prompt": prompt, "constraints": cons})
        misses = 0
    if len(out) < n:
        raise ValueError(f"only {len(out)} distinct prompts could be drawn, {n} asked for")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max_constraints", type=int, default=3)
    ap.add_argument("--exclude_jsonl", default="", help="skip prompts that occur in this JSONL (held-out sets)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    try:
        exclude = []
        if a.exclude_jsonl:
            with open(a.exclude_jsonl) as f:
                exclude = [json.loads(line)["prompt"] for line in f if line.strip()]
        recs = make_ifeval_records(a.n, a.seed, a.max_constraints, exclude)
        with open(a.out, "w") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(recs)} ifeval records -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
