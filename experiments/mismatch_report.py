"""Issue 30, item 6: the bfloat16-rollout experiment's table, from committed compact data.

    python experiments/mismatch_report.py collect OUT RUN DATA   # runs of mismatch_runs.sh -> compact JSON in DATA
    python experiments/mismatch_report.py table DATA [--to FILE]  # the markdown table (default DATA/../mismatch.md)

``collect`` keeps, per (arm, seed), the per-step metrics the table reads and each held-out prompt's figures after
RL (solved share of its 8 samples, greedy correct, family), plus RUN's evaluation of the SFT checkpoint ("before",
the same prompts and evaluation seed).  ``table`` computes everything from those files alone:

- the mismatch over training: per-step mean |log pi_train - log pi_infer|, its largest value, the k3 KL,
  the share of tokens past 2x, the routing disagreement, IcePop's masked share; mean over steps and seeds;
- grad-norm spread: the relative spread (std / mean over steps) per seed, averaged;
- the rollout reward: mean of the first 5 steps and of the last 5;
- held-out pass@1 and greedy accuracy: the change against the SFT checkpoint, paired over the same prompts, with its
  95% interval (``ring_jax.rl.evaluate.paired_difference``), per seed, and the mean over seeds with the interval of
  the per-prompt mean of the seeds' changes.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np

from ring_jax.rl.evaluate import paired_difference

ARMS = (
    ("f32", "float32 rollouts (baseline)"),
    ("bf16", "bf16 rollouts, nothing"),
    ("bf16_tis", "bf16, TIS with pi_old from the trainer"),
    ("bf16_icepop", "bf16, IcePop [0.5, 2]"),
    ("bf16_replay", "bf16, routing replay"),
    ("bf16_replay_icepop", "bf16, replay + IcePop"),
)
STEP_KEYS = (
    "step",
    "reward_mean",
    "grad_norm",
    "entropy",
    "logprob_drift",
    "tis/weight_mean",
    "tis/truncated_frac",
    "icepop/masked_frac",
    "time/rollout_s",
    "time/trainer_logp_s",
    "time/train_s",
)


def _jsonl(path):
    return [json.loads(x) for x in open(path) if x.strip()]


def _compact_prompts(d):
    return {k: [v["family"], round(float(v["solved"]), 4), v["greedy"]] for k, v in d.items()}


def collect(out: str, run: str, data: str) -> None:
    os.makedirs(data, exist_ok=True)
    before = json.load(open(os.path.join(run, "rl", "eval_before_prompts.json")))
    json.dump(_compact_prompts(before), open(os.path.join(data, "before.json"), "w"))
    n = 0
    for arm, _ in ARMS:
        for d in sorted(glob.glob(os.path.join(out, arm, "s*"))):
            after = os.path.join(d, "eval_after_prompts.json")
            if not os.path.exists(after):
                continue
            steps = [
                {k: v for k, v in r.items() if k in STEP_KEYS or k.startswith("mismatch/")}
                for r in _jsonl(os.path.join(d, "metrics.jsonl"))
            ]
            rec = {"arm": arm, "seed": int(os.path.basename(d)[1:]), "steps": steps}
            rec["after"] = _compact_prompts(json.load(open(after)))
            json.dump(rec, open(os.path.join(data, f"{arm}_{os.path.basename(d)}.json"), "w"))
            n += 1
    print(f"collected {n} runs into {data}")


def _per_prompt(compact):
    return {k: {"family": f, "solved": s, "greedy": g} for k, (f, s, g) in compact.items()}


def _mean_over(steps, key):
    v = [s[key] for s in steps if s.get(key) is not None and np.isfinite(s[key])]
    return float(np.mean(v)) if v else float("nan")


def _fmt_rate(r):
    return f"{100 * r.value:+.1f} [{100 * r.lo:+.1f}, {100 * r.hi:+.1f}]"


def _mean_change(before, afters, field):
    """Mean over seeds of the paired change, with the interval of the per-prompt mean of the seeds' changes."""
    keys = sorted(set(before).intersection(*[set(a) for a in afters]))
    diff = np.mean([[a[k][field] - before[k][field] for k in keys] for a in afters], axis=0)
    m, se = float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(diff.size))
    return f"{100 * m:+.1f} [{100 * (m - 1.96 * se):+.1f}, {100 * (m + 1.96 * se):+.1f}]"


def table(data: str) -> str:
    before = _per_prompt(json.load(open(os.path.join(data, "before.json"))))
    runs: dict = {}
    for path in sorted(glob.glob(os.path.join(data, "*_s*.json"))):
        rec = json.load(open(path))
        runs.setdefault(rec["arm"], []).append(rec)
    lines = [
        "# bfloat16 rollouts beside a float32 trainer (issue 30, item 6)",
        "",
        "Written by `python experiments/mismatch_report.py table experiments/results/issue30/data` from the compact",
        "data beside this file (`experiments/mismatch_runs.sh` made the runs; `collect` compacted them).",
        "",
    ]
    seeds = sorted({r["seed"] for rs in runs.values() for r in rs})
    nsteps = sorted({len(r["steps"]) for rs in runs.values() for r in rs})
    lines += [f"Seeds {seeds}, {nsteps} RL steps per run; held-out set: {len(before)} problems.", ""]
    lines += [
        "## Mismatch over training (mean over steps and seeds)",
        "",
        "| arm | mean abs dlogp | max abs dlogp | k3 KL(infer, train) | tokens past 2x | "
        "routing disagree (pairs) | (tokens) | IcePop masked |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, name in ARMS:
        rs = runs.get(arm)
        if not rs:
            continue
        st = [s for r in rs for s in r["steps"]]
        mx = max((s.get("mismatch/logp_abs_max") or 0.0) for s in st)
        mean = {k: _mean_over(st, f"mismatch/{k}") for k in ("logp_abs_mean", "kl", "ratio_out_2x_frac")}
        lines.append(
            f"| {name} | {mean['logp_abs_mean']:.2e} | {mx:.2e} | {mean['kl']:.2e} | {mean['ratio_out_2x_frac']:.2e} "
            f"| {_mean_over(st, 'mismatch/routing_disagree_frac'):.4f} "
            f"| {_mean_over(st, 'mismatch/routing_disagree_token_frac'):.4f} "
            f"| {_mean_over(st, 'icepop/masked_frac'):.2e} |"
        )
    lines += [
        "",
        "## Training and the held-out set (change against the SFT checkpoint, points, paired, 95% intervals)",
        "",
        "| arm | grad-norm rel. spread | reward first 5 -> last 5 | step time (s) | pass@1 per seed | greedy per seed "
        "| pass@1 mean | greedy mean |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, name in ARMS:
        rs = sorted(runs.get(arm, []), key=lambda r: r["seed"])
        if not rs:
            continue
        spread = np.mean(
            [
                np.std([s["grad_norm"] for s in r["steps"] if s.get("grad_norm") is not None])
                / np.mean([s["grad_norm"] for s in r["steps"] if s.get("grad_norm") is not None])
                for r in rs
            ]
        )
        r0 = np.mean([_mean_over(r["steps"][:5], "reward_mean") for r in rs])
        r1 = np.mean([_mean_over(r["steps"][-5:], "reward_mean") for r in rs])
        t = np.mean(
            [
                _mean_over(r["steps"][1:], "time/rollout_s")
                + _mean_over(r["steps"][1:], "time/trainer_logp_s")
                + _mean_over(r["steps"][1:], "time/train_s")
                for r in rs
            ]
        )
        afters = [_per_prompt(r["after"]) for r in rs]
        p1 = " / ".join(_fmt_rate(paired_difference(before, a, "solved")) for a in afters)
        gr = " / ".join(_fmt_rate(paired_difference(before, a, "greedy")) for a in afters)
        lines.append(
            f"| {name} | {spread:.2f} | {r0:.3f} -> {r1:.3f} | {t:.1f} | {p1} | {gr} "
            f"| {_mean_change(before, afters, 'solved')} | {_mean_change(before, afters, 'greedy')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect")
    c.add_argument("out")
    c.add_argument("run")
    c.add_argument("data")
    t = sub.add_parser("table")
    t.add_argument("data")
    t.add_argument("--to", default="")
    a = ap.parse_args()
    if a.cmd == "collect":
        collect(a.out, a.run, a.data)
        return
    text = table(a.data)
    to = a.to or os.path.join(os.path.dirname(os.path.abspath(a.data)), "mismatch.md")
    with open(to, "w") as f:
        f.write(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
