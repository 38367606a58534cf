"""Held-out metrics: pass@1, pass@n, greedy, length, unfinished, and their 95% intervals, against hand counts."""

import math

import numpy as np
import pytest

from ring_jax.rl import evaluate as ev
from ring_jax.sampling.types import Completion


def test_wilson_interval_matches_the_formula_and_stays_inside_0_1():
    r = ev.wilson_interval(5, 10)  # textbook value: [0.2366, 0.7634]
    assert r.value == 0.5 and abs(r.lo - 0.23659) < 1e-4 and abs(r.hi - 0.76341) < 1e-4
    z = ev.wilson_interval(0, 20)
    assert z.lo == pytest.approx(0.0, abs=1e-12) and 0.1 < z.hi < 0.2
    assert ev.wilson_interval(20, 20).hi == pytest.approx(1.0)


def test_mean_interval_is_clustered_by_prompt():
    per_prompt = [1.0, 1.0, 0.0, 0.0, 0.5, 0.5, 0.25, 0.75]
    r = ev.mean_interval(per_prompt)
    se = np.std(per_prompt, ddof=1) / math.sqrt(8)
    assert r.value == pytest.approx(0.5) and r.se == pytest.approx(se)
    assert r.lo == pytest.approx(0.5 - 1.959964 * se) and r.hi == pytest.approx(0.5 + 1.959964 * se)


def test_paired_difference_cancels_prompt_difficulty():
    before = {f"p{i}": {"solved": i / 10} for i in range(10)}
    after = {f"p{i}": {"solved": i / 10 + 0.1} for i in range(10)}
    d = ev.paired_difference(before, after, "solved")
    assert d.value == pytest.approx(0.1) and d.se == pytest.approx(0.0, abs=1e-12)  # every prompt +0.1
    assert ev.paired_difference(before, {"p0": {"solved": 1.0}}, "solved").n == 1


class FakeEngine:
    """Answers prompt i's sample j with the scripted text; greedy rows get the greedy script."""

    scripts: dict = {}

    def __init__(self, *a, **k):
        pass

    def generate(self, prompts, sp, key=0):
        which = "greedy" if sp.temperature == 0 else "sampled"
        out = []
        for i, _ in enumerate(prompts):
            for j in range(sp.n):
                text = self.scripts[which][i][j]
                ids = np.array([ord(c) for c in text], np.int32)
                out.append(
                    Completion(
                        prompt_index=i,
                        sample_index=j,
                        prompt_ids=np.array(prompts[i], np.int32),
                        token_ids=ids,
                        logprobs=np.zeros(len(ids), np.float32),
                        raw_logprobs=np.zeros(len(ids), np.float32),
                        finish_reason="stop",
                    )
                )
        return out


def test_evaluate_counts_against_a_scripted_engine(monkeypatch):
    from ring_jax.data.tasks import make_task_records

    recs = make_task_records("chain_sum_1d", 3, seed=2, split="eval", distinct=True)
    recs += make_task_records("countdown_15", 2, seed=2, split="eval", distinct=True)
    right = [
        f"<answer>{r['answer'] if r['task'] != 'countdown' else r['gym']['entry']['metadata']['expression']}</answer>"
        for r in recs
    ]
    wrong, unfinished = "<answer>1000</answer>", "1 + 2 = 3"
    FakeEngine.scripts = {
        "sampled": [
            [right[0]] * 4,
            [right[1], wrong, unfinished, unfinished],
            [wrong] * 4,
            [right[3], right[3], wrong, wrong],
            [unfinished] * 4,
        ],
        "greedy": [[right[0]], [wrong], [wrong], [right[3]], [right[4]]],
    }
    monkeypatch.setattr(ev, "SamplingEngine", FakeEngine)
    res = ev.evaluate(None, None, recs, encode_prompt=lambda r: [1], decode=lambda ids: "".join(map(chr, ids)), n=4)
    cs, cd = res.families["chain_sum_1d"], res.families["countdown_15"]
    assert cs.pass_at_1.value == pytest.approx((4 + 1 + 0) / 12) and cd.pass_at_1.value == pytest.approx(2 / 8)
    assert cs.pass_at_k.value == pytest.approx(2 / 3) and cd.pass_at_k.value == pytest.approx(1 / 2)
    assert cs.greedy.value == pytest.approx(1 / 3) and cd.greedy.value == pytest.approx(1.0)
    assert cs.unfinished.value == pytest.approx(2 / 12) and cd.unfinished.value == pytest.approx(4 / 8)
    assert res.pass_at_1 == pytest.approx(7 / 20) and res.overall.greedy.value == pytest.approx(3 / 5)
    assert cs.response_len == pytest.approx(np.mean([[len(t) for t in s] for s in FakeEngine.scripts["sampled"][:3]]))
    assert len(res.per_prompt) == 5 and sorted(v["greedy"] for v in res.per_prompt.values()) == [0, 0, 1, 1, 1]


def test_report_table_pairs_before_and_after_by_prompt(tmp_path):
    import json

    from ring_jax.cli.report import held_out_table

    def fam(p1):
        r = ev.mean_interval([p1] * 4).as_dict()
        return {"pass_at_1": r, "pass_at_k": r, "greedy": r, "response_len": 20.0, "unfinished": r, "num_prompts": 4}

    evals = [
        {"tag": t, "n": 8, "families": {"a": fam(v)}, "overall": fam(v)} for t, v in (("before", 0.25), ("after", 0.5))
    ]
    before = {f"a|k{i}": {"family": "a", "solved": 0.25, "any": 0, "greedy": 0, "unfinished": 0.5} for i in range(4)}
    after = {
        f"a|k{i}": {"family": "a", "solved": 0.25 + 0.25 * (i % 2) * 2, "any": 1, "greedy": i % 2, "unfinished": 0.0}
        for i in range(4)
    }
    for t, d in (("before", before), ("after", after)):
        (tmp_path / f"eval_{t}_prompts.json").write_text(json.dumps(d))
    text = "\n".join(held_out_table(str(tmp_path), evals))
    row = next(ln for ln in text.splitlines() if ln.startswith("| all | +"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1].startswith("+0.250 ") and cells[2].startswith("+1.000 ") and cells[3].startswith("+0.500 ")
    assert cells[4].startswith("-0.500 ")
    assert "| before | a | 4 | 0.250 [0.250, 0.250]" in text
