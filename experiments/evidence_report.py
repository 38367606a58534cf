"""Tables and plots of issue 16's experiments (experiments/evidence_runs.sh) beside the main job, per seed and mean.

    python experiments/evidence_report.py OUT RUN0 [RUN1 ...] [--to DIR]

RUNi: folders of ``ring-jax-pipeline --seed=i``; OUT: evidence_runs.sh's folder.  Every change is paired over the
held-out problems that all the evaluations of one seed share, against that seed's SFT checkpoint, with its 95%
interval (``ring_jax.rl.evaluate.paired_difference``).  Writes ``evidence.md`` and PNG curves to --to (default OUT).
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np

from ring_jax.rl.evaluate import paired_difference

FIELDS = (("solved", "pass@1"), ("greedy", "greedy"), ("any", "pass@8"))
CURVES = (
    ("reward_mean", "rollout reward"),
    ("grad_norm", "grad norm"),
    ("response_len_mean", "response length"),
    ("entropy", "entropy (nats/token)"),
    ("kept_tokens", "tokens per optimiser step"),
)


def _load(path):
    return json.load(open(path)) if os.path.exists(path) else None


def _jsonl(path):
    return [json.loads(x) for x in open(path) if x.strip()] if os.path.exists(path) else []


def _fmt(r):
    return f"{r.value:+.3f} [{r.lo:+.3f}, {r.hi:+.3f}]"


def _mean(d, field):
    return float(np.mean([v[field] for v in d.values()]))


def _restrict(d, keys):
    return {k: d[k] for k in keys}


def _diff(a, b, field, fam=None):
    if fam:
        a = {k: v for k, v in a.items() if v["family"] == fam}
    return paired_difference(a, b, field)


def seed_runs(out, run, s):
    """{row name: per-prompt eval dict} for one seed (missing runs left out), all on their shared prompts."""
    files = {
        "SFT checkpoint": f"{run}/rl/eval_before_prompts.json",
        "+ C3PO (the main job)": f"{run}/rl/eval_after_prompts.json",
        "+ seq_mean (sample-level GRPO)": f"{out}/agg_seq_mean/s{s}/eval_after_prompts.json",
        "+ token_mean": f"{out}/agg_token_mean/s{s}/eval_after_prompts.json",
        "+ more SFT, C3PO's token count": f"{out}/sftmore_eval/s{s}/eval_init_prompts.json",
    }
    files.update({lever_name(d): f"{d}/s{s}/eval_after_prompts.json" for d in lever_dirs(out)})
    got = {k: _load(p) for k, p in files.items()}
    got = {k: v for k, v in got.items() if v is not None}
    if "SFT checkpoint" not in got:
        return {}, 0
    keys = set.intersection(*(set(v) for v in got.values()))
    return {k: _restrict(v, keys) for k, v in got.items()}, len(keys)


def lever_dirs(out):
    """evidence_runs.sh WHAT=levers folders: lever_<flag>_<value>[_<flag>_<value>...]."""
    return sorted(glob.glob(f"{out}/lever_*"))


def lever_name(d):
    """'lever_lr_2e-4_beta_0_alpha_ent_0' -> '+ C3PO, lr=2e-4 beta=0 alpha_ent=0' (flag names may hold '_')."""
    parts = os.path.basename(d)[len("lever_") :].split("_")
    out, key = [], []
    for p in parts:  # a value starts with a digit or a sign; everything before it is the flag name
        if p[:1].isdigit() or p[:1] in "+-.":
            out.append(f"{'_'.join(key)}={p}")
            key = []
        else:
            key.append(p)
    return "+ C3PO, " + " ".join(out)


def tokens_trained(out, run, s):
    rl = _jsonl(f"{run}/rl/metrics.jsonl")
    sm = _jsonl(f"{out}/sftmore/s{s}/metrics.jsonl")
    levers = {
        lever_name(d): sum(r["kept_tokens"] for r in _jsonl(f"{d}/s{s}/metrics.jsonl")) or None for d in lever_dirs(out)
    }
    return {
        **levers,
        "+ C3PO (the main job)": sum(r["kept_tokens"] for r in rl) if rl else None,
        "+ seq_mean (sample-level GRPO)": sum(
            r["kept_tokens"] for r in _jsonl(f"{out}/agg_seq_mean/s{s}/metrics.jsonl")
        )
        or None,
        "+ token_mean": sum(r["kept_tokens"] for r in _jsonl(f"{out}/agg_token_mean/s{s}/metrics.jsonl")) or None,
        "+ more SFT, C3PO's token count": sum(r["ce_tokens"] for r in sm) if sm else None,
    }


def main_table(out, runs):
    lines = [
        "## Held-out change against each seed's SFT checkpoint (paired, 95% intervals)",
        "",
        "| seed | run | prompts | trained tokens | pass@1 | greedy | pass@8 | chain_sum_1d pass@1 | "
        "countdown_15 pass@1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    means: dict = {}
    for s, run in enumerate(runs):
        got, n = seed_runs(out, run, s)
        if not got:
            continue
        base = got["SFT checkpoint"]
        toks = tokens_trained(out, run, s)
        lines.append(
            f"| {s} | SFT checkpoint (absolute) | {n} | - | "
            + " | ".join(f"{np.mean([v[f] for v in base.values()]):.3f}" for f, _ in FIELDS)
            + " | "
            + " | ".join(
                f"{np.mean([v['solved'] for v in base.values() if v['family'] == fam]):.3f}"
                for fam in ("chain_sum_1d", "countdown_15")
            )
            + " |"
        )
        for name, d in got.items():
            if name == "SFT checkpoint":
                continue
            cells = [_diff(base, d, f) for f, _ in FIELDS]
            fams = [_diff(base, d, "solved", fam) for fam in ("chain_sum_1d", "countdown_15")]
            t = toks.get(name)
            lines.append(
                f"| {s} | {name} | {n} | {'-' if t is None else f'{t / 1e3:.0f}k'} | "
                + " | ".join(_fmt(c) for c in cells)
                + " | "
                + " | ".join(f"{c.value:+.3f}" for c in fams)
                + " |"
            )
            means.setdefault(name, []).append([c.value for c in cells])
    lines += [
        "",
        "Mean over the seeds that ran (each seed's figure is a paired change; the interval is over seeds "
        "when there are 3 or more, a t interval, else none):",
        "",
        "| run | seeds | pass@1 | greedy | pass@8 |",
        "|---|---|---|---|---|",
    ]
    for name, vals in means.items():
        v = np.array(vals)
        cells = []
        for j in range(v.shape[1]):
            m = v[:, j].mean()
            if len(v) >= 3:
                half = {3: 4.303, 4: 3.182, 5: 2.776}.get(len(v), 2.571) * v[:, j].std(ddof=1) / np.sqrt(len(v))
                cells.append(f"{m:+.3f} [{m - half:+.3f}, {m + half:+.3f}]")
            else:
                cells.append(f"{m:+.3f}")
        lines.append(f"| {name} | {len(v)} | " + " | ".join(cells) + " |")
    return lines + [""]


def head_to_head(out, runs):
    """C3PO against each other row, paired on the same prompts (other - C3PO)."""
    lines = [
        "## Against C3PO on the same prompts (other minus C3PO, paired, 95% intervals)",
        "",
        "| seed | run | pass@1 | greedy | chain_sum_1d pass@1 | countdown_15 pass@1 |",
        "|---|---|---|---|---|---|",
    ]
    for s, run in enumerate(runs):
        got, _ = seed_runs(out, run, s)
        c3 = got.get("+ C3PO (the main job)")
        if c3 is None:
            continue
        for name, d in got.items():
            if name in ("SFT checkpoint", "+ C3PO (the main job)"):
                continue
            cells = [_diff(c3, d, "solved"), _diff(c3, d, "greedy")]
            fams = [_diff(c3, d, "solved", fam) for fam in ("chain_sum_1d", "countdown_15")]
            lines.append(f"| {s} | {name} | " + " | ".join(_fmt(c) for c in cells + fams) + " |")
    return lines + [""]


def stability(out, runs, to):
    """Item 5: per aggregation and seed, the spread of grad norm and tokens per optimiser step; curves PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [
        "## C3PO against seq_mean and token_mean: steadiness (45 steps, same rollouts per step)",
        "",
        "| aggregation | seed | grad norm mean | grad norm sd | sd / mean | tokens per step mean | tokens sd | "
        "sd / mean | rollout reward first 5 -> last 5 | entropy first -> last |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    logs = {}
    for s, run in enumerate(runs):
        for agg, path in (
            ("c3po", f"{run}/rl/metrics.jsonl"),
            ("seq_mean", f"{out}/agg_seq_mean/s{s}/metrics.jsonl"),
            ("token_mean", f"{out}/agg_token_mean/s{s}/metrics.jsonl"),
        ):
            recs = _jsonl(path)
            if not recs:
                continue
            logs[(agg, s)] = recs
            g = np.array([r["grad_norm"] for r in recs])
            t = np.array([r["kept_tokens"] for r in recs], float)
            rw = [r["reward_mean"] for r in recs]
            lines.append(
                f"| {agg} | {s} | {g.mean():.3f} | {g.std(ddof=1):.3f} | {g.std(ddof=1) / g.mean():.2f} | "
                f"{t.mean():.0f} | {t.std(ddof=1):.0f} | {t.std(ddof=1) / t.mean():.3f} | "
                f"{np.mean(rw[:5]):.3f} -> {np.mean(rw[-5:]):.3f} | "
                f"{recs[0]['entropy']:.3f} -> {recs[-1]['entropy']:.3f} |"
            )
    if not logs:
        return lines + ["(no runs)", ""]
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.3))
    colors = {"c3po": "#2a7ab0", "seq_mean": "#d95f02", "token_mean": "#1b9e77"}
    for agg in colors:
        runs_of = [recs for (a, _), recs in sorted(logs.items()) if a == agg]
        if not runs_of:
            continue
        for ax, (key, title) in zip(axes, CURVES):
            for recs in runs_of:  # each seed thin, the mean over seeds bold
                ax.plot([r["step"] for r in recs], [r[key] for r in recs], color=colors[agg], alpha=0.25, lw=0.8)
            n = min(len(r) for r in runs_of)
            ax.plot(
                range(1, n + 1),
                np.mean([[r[key] for r in recs[:n]] for recs in runs_of], axis=0),
                color=colors[agg],
                lw=2,
                label=f"{agg} (mean of {len(runs_of)} seeds)",
            )
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    png = os.path.join(to, "aggregation_curves.png")
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return lines + ["", f"![curves]({os.path.basename(png)})", ""]


def checkpoint_choice(out, runs):
    lines = ["## Choosing the SFT checkpoint by entropy (Ring-lite's rule)", ""]
    for s, run in enumerate(runs):
        rec = _load(f"{run}/sft/checkpoints.json")
        if rec is None:
            continue
        lo, hi = rec["entropy_band"]
        lines += [
            f"Seed {s}: entropy on {rec['prompts']} RL prompts x {rec['samples']} samples (T = 1):",
            "",
            "| checkpoint | SFT tokens | entropy | sampled -log p | mean length |",
            "|---|---|---|---|---|",
        ]
        for c in rec["checkpoints"]:
            mark = " (picked)" if c["name"] == rec["picked"] else ""
            lines.append(
                f"| {c['name']}{mark} | {c['sft_tokens'] / 1e3:.0f}k | {c['entropy']:.4f} | "
                f"{c['sampled_nll']:.4f} | {c['mean_length']:.1f} |"
            )
        lines += ["", f"Pick (band [{lo}, {hi}]): {rec['picked']}: {rec['rule']}.", ""]
        b, a = _load(f"{out}/picked/s{s}/eval_before_prompts.json"), _load(f"{out}/picked/s{s}/eval_after_prompts.json")
        last_b, last_a = _load(f"{run}/rl/eval_before_prompts.json"), _load(f"{run}/rl/eval_after_prompts.json")
        if a and b and last_a and last_b:
            keys = set(a) & set(b) & set(last_a) & set(last_b)
            a, b, la, lb = (_restrict(d, keys) for d in (a, b, last_a, last_b))
            lines += [
                "| RL start | pass@1 before | after | paired change | greedy after | paired change |",
                "|---|---|---|---|---|---|",
            ]
            for name, x, y in ((rec["picked"] + " (picked)", b, a), ("last (the main job)", lb, la)):
                lines.append(
                    f"| {name} | {_mean(x, 'solved'):.3f} | {_mean(y, 'solved'):.3f} | "
                    f"{_fmt(paired_difference(x, y, 'solved'))} | {_mean(y, 'greedy'):.3f} | "
                    f"{_fmt(paired_difference(x, y, 'greedy'))} |"
                )
            lines += [
                "",
                f"After the same RL budget, picked minus last: pass@1 "
                f"{_fmt(paired_difference(la, a, 'solved'))}, greedy {_fmt(paired_difference(la, a, 'greedy'))} "
                f"({len(keys)} prompts).",
                "",
            ]
    return lines


def truncated(out, runs):
    """The ablation row: the main job on the corpus with 30% of its solutions cut, beside seed 0's honest run."""
    rows = [
        ("complete corpus (the main job)", f"{runs[0]}/rl"),
        ("30% of solutions cut (--sft_truncated=0.3)", f"{out}/truncated/s0/rl"),
    ]
    lines = [
        "## Ablation: the truncated corpus, seed 0 (paired changes, 95% intervals)",
        "",
        "| SFT corpus | SFT pass@1 | SFT greedy | SFT unfinished | C3PO change pass@1 | greedy | unfinished |",
        "|---|---|---|---|---|---|---|",
    ]
    got = [(n, _load(f"{d}/eval_before_prompts.json"), _load(f"{d}/eval_after_prompts.json")) for n, d in rows]
    if not all(b and a for _, b, a in got):
        return []
    keys = set.intersection(*(set(b) & set(a) for _, b, a in got))
    for name, b, a in got:
        b, a = _restrict(b, keys), _restrict(a, keys)
        lines.append(
            f"| {name} | {_mean(b, 'solved'):.3f} | {_mean(b, 'greedy'):.3f} | {_mean(b, 'unfinished'):.3f} | "
            + " | ".join(_fmt(paired_difference(b, a, f)) for f in ("solved", "greedy", "unfinished"))
            + " |"
        )
    return lines + ["", f"({len(keys)} held-out prompts.)", ""]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--to", default="")
    args = ap.parse_args()
    to = args.to or args.out
    os.makedirs(to, exist_ok=True)
    runs = [os.path.abspath(r) for r in args.runs]
    lines = [
        "# Issue 16 evidence: C3PO against its baselines, more SFT and the entropy-picked checkpoint",
        "",
        f"Runs: {', '.join(runs)}; experiments: {os.path.abspath(args.out)} (experiments/evidence_runs.sh).",
        "",
    ]
    lines += main_table(args.out, runs) + head_to_head(args.out, runs) + stability(args.out, runs, to)
    lines += checkpoint_choice(args.out, runs) + truncated(args.out, runs)
    out = os.path.abspath(args.out)
    lines += ["## Commands", "", "```"] + [f"ring-jax-pipeline --out_dir={r} --seed={s}" for s, r in enumerate(runs)]
    lines += [
        f"experiments/evidence_runs.sh {out} {' '.join(runs)}",
        f"python experiments/evidence_report.py {out} {' '.join(runs)}",
        "```",
        "",
    ]
    path = os.path.join(to, "evidence.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
