"""Tokens and log-probabilities of the sampling engine as it was before the decode-throughput work (commit d083554),
kept as a golden file: the faster engine must reproduce them (greedy and sampled with fixed keys, at several slot
counts, so every decode MoE path and the sampling shortcuts are covered).

Regenerate only on purpose, with the engine whose output is the reference:
    python -m tests.sampling.golden   # writes tests/sampling/data/engine_golden.json
"""

from __future__ import annotations

import json
import os

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "engine_golden.json")

# prompts of several lengths; one of them repeated so that n samples and shared prefills are exercised
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16, 17], [3], [40, 41, 42, 43, 44], [7] * 20, [100, 3, 50, 2]]
# decode MoE path on CPU (8 experts top-2): dispatch at 2 rows, dense (before issue 15) / capacity at 8 and 32 rows.
# The file holds all three; the test replays 2 and 8 (32 repeats 8's path at the cost of another compile).
SLOTS = (2, 8, 32)
TEST_SLOTS = (2, 8)
CASES = {  # name -> SamplingParams kwargs
    "greedy": dict(temperature=0.0, max_new_tokens=12, ignore_eos=True),
    "t1": dict(temperature=1.0, max_new_tokens=12, n=3, ignore_eos=True),
    "t07_topp09_topk20": dict(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=12, n=2, ignore_eos=True),
    "t1_topp095_stops": dict(temperature=1.0, top_p=0.95, max_new_tokens=16, n=2, stop_token_ids=(4, 8, 15, 16)),
}


def config():
    from ring_jax.config import get_preset

    # the tiny preset with 8 experts (so that 8+ decode rows take the all-experts path) and norm_head
    return get_preset("tiny").replace(num_experts=8, norm_head=True)


def run_all(model, slots_list=SLOTS, cases=None, **engine_kw) -> dict:
    from ring_jax.sampling import SamplingEngine, SamplingParams

    out = {}
    for slots in slots_list:
        eng = SamplingEngine.from_model(model, num_slots=slots, chunk=4, **engine_kw)
        for name, kw in CASES.items():
            if cases is not None and name not in cases:
                continue
            comps = eng.generate(PROMPTS, SamplingParams(**kw), key=11)
            out[f"{slots}/{name}"] = [
                dict(
                    prompt=c.prompt_index,
                    sample=c.sample_index,
                    tokens=c.token_ids.tolist(),
                    logprobs=c.logprobs.tolist(),
                    raw_logprobs=c.raw_logprobs.tolist(),
                    finish=c.finish_reason,
                )
                for c in comps
            ]
    return out


def main():
    from tests.sampling.models import random_model

    res = run_all(random_model(config(), seed=3))
    with open(GOLDEN, "w") as f:
        json.dump(res, f)
    print(f"wrote {GOLDEN}: {len(res)} runs")


if __name__ == "__main__":
    import tests.conftest  # noqa: F401  (the suite's XLA flags: the golden values are those the tests compute)

    main()
