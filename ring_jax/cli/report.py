"""The pipeline's run report: report.md plus PNG plots (SFT loss, RL reward, response length, held-out pass@1)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence


def _plot_eval(evals, out_png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    tags = [e["tag"] for e in evals]
    ax.bar(range(len(evals)), [e["pass_at_1"] for e in evals], color=["#999999"] + ["#2a7ab0"] * (len(evals) - 1))
    ax.set_xticks(range(len(evals)), tags)
    ax.set_ylabel("held-out pass@1")
    ax.set_ylim(0, 1)
    for i, e in enumerate(evals):
        ax.text(i, e["pass_at_1"] + 0.02, f"{e['pass_at_1']:.3f}", ha="center")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def _rate(d: dict | None) -> str:
    return "-" if not d else f"{d['value']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}]"


def held_out_table(rl_dir: str, evals: list[dict]) -> list[str]:
    """Markdown: per family and evaluation, pass@1 / pass@n / greedy with 95% intervals, length, unfinished; then
    the paired after - before differences over the same prompts (from ``eval_<tag>_prompts.json``)."""
    from ring_jax.rl.evaluate import paired_difference

    if not evals or "families" not in evals[0]:  # an eval.jsonl of an older run: pass@1 only
        out = ["## Held-out pass@1 (temperature 1.0, top-p 0.95)", "", "| when | pass@1 | per task |", "|---|---|---|"]
        out += [
            f"| {e['tag']} | {e['pass_at_1']:.3f} | {', '.join(f'{k} {v:.3f}' for k, v in e['per_task'].items())} |"
            for e in evals
        ]
        return out + [""]
    n = evals[0].get("n", 1)
    out = [
        f"## Held-out set (distinct problems disjoint from SFT and RL; pass@1 = {n} samples per prompt at "
        "temperature 1.0, top-p 0.95; 95% intervals over prompts)",
        "",
        f"| when | family | prompts | pass@1 | pass@{n} | greedy | mean length | unfinished |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in evals:
        for fam, m in [*sorted(e["families"].items()), ("all", e["overall"])]:
            out.append(
                f"| {e['tag']} | {fam} | {m['num_prompts']} | {_rate(m['pass_at_1'])} | "
                f"{_rate(m['pass_at_k'])} | {_rate(m['greedy'])} | {m['response_len']:.1f} | "
                f"{m['unfinished']['value']:.3f} |"
            )
    out.append("")
    first, last = evals[0]["tag"], evals[-1]["tag"]
    pa, pb = (os.path.join(rl_dir, f"eval_{t}_prompts.json") for t in (first, last))
    if first != last and os.path.exists(pa) and os.path.exists(pb):
        a, b = json.load(open(pa)), json.load(open(pb))
        fams = sorted({v["family"] for v in a.values()})
        out += [
            f"Change {first} -> {last}, paired over the same prompts (95% interval of the per-prompt differences):",
            "",
            f"| family | pass@1 | pass@{n} | greedy | unfinished |",
            "|---|---|---|---|---|",
        ]
        for fam in [*fams, "all"]:
            sa = {k: v for k, v in a.items() if fam == "all" or v["family"] == fam}
            have_greedy = all(v.get("greedy") is not None for v in [*sa.values(), *b.values()])
            cells = [
                paired_difference(sa, b, f) if f != "greedy" or have_greedy else None
                for f in ("solved", "any", "greedy", "unfinished")
            ]
            out.append(
                f"| {fam} | "
                + " | ".join("-" if c is None else f"{c.value:+.3f} [{c.lo:+.3f}, {c.hi:+.3f}]" for c in cells)
                + " |"
            )
        out.append("")
    return out


def sft_checkpoint_table(rec: dict) -> list[str]:
    """Markdown: each SFT checkpoint's entropy on the RL prompts and the pick (ring-jax-sft-entropy's JSON)."""
    lo, hi = rec["entropy_band"]
    out = [
        f"## SFT checkpoints: entropy on {rec['prompts']} RL prompts x {rec['samples']} samples (T = 1)",
        "",
        "| checkpoint | SFT tokens | entropy (nats/token) | sampled -log p | mean length |",
        "|---|---|---|---|---|",
    ]
    for c in rec["checkpoints"]:
        mark = " (picked)" if c["name"] == rec["picked"] else ""
        out.append(
            f"| {c['name']}{mark} | {c['sft_tokens']:.0f} | {c['entropy']:.4f} | {c['sampled_nll']:.4f} | "
            f"{c['mean_length']:.1f} |"
        )
    return out + ["", f"Pick by Ring-lite's entropy rule (band [{lo}, {hi}]): {rec['picked']}: {rec['rule']}.", ""]


def write_report(run_dir: str, elapsed_s: float | None = None, commands: Sequence[tuple[str, str, str]] = ()) -> str:
    """report.md in ``run_dir`` from what its stages wrote; ``commands``: (stage, command line, note) to list."""
    from ring_jax.cli.plot import plot_runs
    from ring_jax.train.metrics import read_jsonl

    lines = ["# ring_jax pipeline report", ""]
    if elapsed_s is not None:
        lines += [f"Wall time: {elapsed_s / 60:.1f} min.", ""]
    sft_m, rl_m = os.path.join(run_dir, "sft", "metrics.jsonl"), os.path.join(run_dir, "rl", "metrics.jsonl")
    if os.path.exists(sft_m):
        plot_runs([sft_m], os.path.join(run_dir, "sft_loss.png"), keys=["loss"], smooth=0.8, title="SFT loss")
        recs = read_jsonl(sft_m)
        lines += [
            "## SFT",
            "",
            f"{len(recs)} steps; loss {recs[0]['loss']:.3f} -> {recs[-1]['loss']:.3f}.",
            "",
            "![SFT loss](sft_loss.png)",
            "",
        ]
    ent = os.path.join(run_dir, "sft", "checkpoints.json")
    if os.path.exists(ent):
        lines += sft_checkpoint_table(json.load(open(ent)))
    if os.path.exists(rl_m):
        plot_runs(
            [rl_m],
            os.path.join(run_dir, "rl_curves.png"),
            keys=["reward_mean", "response_len_mean", "entropy", "kept_tokens"],
            smooth=0.6,
            title="C3PO RL",
        )
        recs = read_jsonl(rl_m)
        lines += [
            "## C3PO RL",
            "",
            f"{len(recs)} steps; rollout reward {recs[0]['reward_mean']:.3f} -> {recs[-1]['reward_mean']:.3f}; "
            f"tokens per optimiser step: {sorted({int(r['kept_tokens']) for r in recs})}.",
            "",
            "![RL curves](rl_curves.png)",
            "",
        ]
        times = {k: sum(r.get(f"time/{k}_s", 0.0) for r in recs) for k in ("rollout", "reward", "reference", "train")}
        total = sum(times.values()) or 1.0
        lines += [
            "Step time split: " + ", ".join(f"{k} {v:.0f}s ({100 * v / total:.0f}%)" for k, v in times.items()),
            "",
        ]
    ev = os.path.join(run_dir, "rl", "eval.jsonl")
    if os.path.exists(ev):
        evals = [json.loads(x) for x in open(ev) if x.strip()]
        _plot_eval(evals, os.path.join(run_dir, "pass_at_1.png"))
        lines += held_out_table(os.path.join(run_dir, "rl"), evals)
        lines += ["![pass@1](pass_at_1.png)", ""]
        if evals and evals[-1].get("samples"):
            lines += ["Samples after RL:", ""]
            for p, r, rew in evals[-1]["samples"][:3]:
                lines += [f"- `{p}` -> `{r.strip()[:200]}` (reward {rew:.2f})"]
            lines.append("")
    sp = os.path.join(run_dir, "samples.jsonl")
    if os.path.exists(sp):
        lines += ["## Reloaded from the Hugging Face export (greedy)", ""]
        for x in (json.loads(y) for y in open(sp) if y.strip()):
            lines.append(f"- `{x.get('prompt', '')}` -> `{x.get('text', '').strip()[:200]}` ({x.get('finish_reason')})")
        lines.append("")
    if commands:
        lines += ["## Commands", ""]
        for name, cmd, note in commands:
            lines += [f"{name}" + (f" ({note})" if note else "") + ":", "", "```", cmd, "```", ""]
    path = os.path.join(run_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path
