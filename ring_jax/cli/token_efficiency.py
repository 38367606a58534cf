"""ring-jax-token-efficiency: compare SFT checkpoints as starting points for RL (Ring-lite's selection rule).

Ring-lite starts RL from the SFT checkpoint whose entropy lies in a band (0.3-0.5 by default) and compares
checkpoints by token efficiency = RL training tokens / SFT training tokens.  The input lists checkpoints, as a JSON
list (or ``{"checkpoints": [...]}``) or JSONL, one object each:

    {"name": "sft-ep3", "sft_tokens": 1.2e9, "entropy": 0.41, "rl_jsonl": "runs/rl-ep3/metrics.jsonl"}

``entropy`` and ``rl_jsonl`` are optional; a relative ``rl_jsonl`` is resolved against the input file's folder.
From an RL run's ``metrics.jsonl``: RL tokens = the sum of its per-step ``tokens``; final reward = the last value
of ``--reward_key`` (default: the first of reward_mean, reward, rewards/mean, reward/mean present).

    ring-jax-token-efficiency --input ckpts.json --out_md table.md --out_png reward_vs_tokens.png
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterable
from typing import Any, NamedTuple

from absl import app, flags

from ring_jax.train.metrics import is_number, read_jsonl

REWARD_KEYS = ("reward_mean", "reward", "rewards/mean", "reward/mean")


class TokenEffError(ValueError):
    """A user error in the input: printed as one line by the CLI."""


class Row(NamedTuple):
    name: str
    sft_tokens: float
    entropy: float | None
    in_band: bool | None  # None when the entropy is unknown
    rl_tokens: float | None
    token_efficiency: float | None  # rl_tokens / sft_tokens
    final_reward: float | None
    curve: tuple  # ((cumulative RL tokens, reward), ...) for the plot


def load_checkpoints(path: str) -> list[dict[str, Any]]:
    if not os.path.isfile(path):
        raise TokenEffError(f"no such file: {path}")
    with open(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise TokenEffError(f"{path}: neither JSON nor JSONL ({e.msg})") from None
    if isinstance(data, dict):
        data = data.get("checkpoints", [data] if "name" in data else None)
    if not isinstance(data, list) or not data:
        raise TokenEffError(f"{path}: expected a non-empty list of checkpoints")
    for i, c in enumerate(data):
        if not isinstance(c, dict):
            raise TokenEffError(f"{path}: entry {i} is not an object")
        for k in ("name", "sft_tokens"):
            if k not in c:
                raise TokenEffError(f"{path}: entry {i} lacks {k!r}")
        if not is_number(c["sft_tokens"]) or c["sft_tokens"] <= 0:
            raise TokenEffError(f"{path}: entry {c['name']!r}: sft_tokens must be a positive number")
        if c.get("entropy") is not None and not is_number(c["entropy"]):
            raise TokenEffError(f"{path}: entry {c['name']!r}: entropy must be a number")
    return data


def rl_curve(path: str, reward_key: str | None = None) -> tuple[float, float | None, list[tuple[float, float]]]:
    """(total RL tokens, final reward, [(cumulative tokens, reward) per step that logged a reward])."""
    if not os.path.isfile(path):
        raise TokenEffError(f"no such RL log: {path}")
    recs = read_jsonl(path)
    if not any(is_number(r.get("tokens")) for r in recs):
        raise TokenEffError(f"{path}: no per-step 'tokens' in the RL log")
    if reward_key is None:
        reward_key = next((k for k in REWARD_KEYS if any(is_number(r.get(k)) for r in recs)), None)
    elif not any(is_number(r.get(reward_key)) for r in recs):
        raise TokenEffError(f"{path}: no {reward_key!r} in the RL log")
    cum, curve, final = 0.0, [], None
    for r in sorted(recs, key=lambda r: r.get("step", 0)):
        if is_number(r.get("tokens")):
            cum += r["tokens"]
        if reward_key is not None and is_number(r.get(reward_key)):
            final = float(r[reward_key])
            curve.append((cum, final))
    return cum, final, curve


def compute(path: str, entropy_band: tuple[float, float] = (0.3, 0.5), reward_key: str | None = None) -> list[Row]:
    lo, hi = entropy_band
    base = os.path.dirname(os.path.abspath(path))
    rows = []
    for c in load_checkpoints(path):
        ent = c.get("entropy")
        rl_tokens = final = None
        curve: list = []
        if c.get("rl_jsonl"):
            rp = c["rl_jsonl"] if os.path.isabs(c["rl_jsonl"]) else os.path.join(base, c["rl_jsonl"])
            rl_tokens, final, curve = rl_curve(rp, reward_key)
        eff = rl_tokens / c["sft_tokens"] if rl_tokens is not None else None
        rows.append(
            Row(
                str(c["name"]),
                float(c["sft_tokens"]),
                None if ent is None else float(ent),
                None if ent is None else bool(lo <= ent <= hi),
                rl_tokens,
                eff,
                final,
                tuple(curve),
            )
        )
    return rows


def pick_checkpoint(
    checkpoints: Iterable[dict | Row], entropy_band: tuple[float, float] = (0.3, 0.5)
) -> tuple[dict, str]:
    """Ring-lite's rule for the RL start point, as ring_jax reads it: among the checkpoints whose entropy on the RL
    prompts lies in the band, the one trained on the most SFT tokens (the most distilled that still explores); when
    none is in the band, the one nearest to it (ties: more SFT tokens).  ``checkpoints``: mappings (or Rows) with
    name, sft_tokens and entropy.  Returns (the checkpoint, the reason in words)."""
    lo, hi = entropy_band
    cands = [c if isinstance(c, dict) else c._asdict() for c in checkpoints]
    cands = [c for c in cands if is_number(c.get("entropy"))]
    if not cands:
        raise TokenEffError("no checkpoint has an entropy to choose by")
    inside = [c for c in cands if lo <= c["entropy"] <= hi]
    if inside:
        best = max(inside, key=lambda c: c["sft_tokens"])
        return best, (
            f"entropy {best['entropy']:.3f} in the band [{lo}, {hi}], the most SFT tokens of the {len(inside)} in it"
        )

    def gap(c):
        return lo - c["entropy"] if c["entropy"] < lo else c["entropy"] - hi

    best = min(cands, key=lambda c: (gap(c), -c["sft_tokens"]))
    side = "below" if best["entropy"] < lo else "above"
    return best, (
        f"no checkpoint in the band [{lo}, {hi}]; entropy {best['entropy']:.3f} is the nearest ({side} "
        f"it by {gap(best):.3f})"
    )


def _fmt_tokens(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown_table(rows: list[Row], entropy_band: tuple[float, float] = (0.3, 0.5)) -> str:
    lo, hi = entropy_band
    head = [
        "checkpoint",
        "SFT tokens",
        "entropy",
        f"in band [{lo}, {hi}]",
        "RL tokens",
        "token efficiency (RL/SFT)",
        "final reward",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        band = "-" if r.in_band is None else ("yes" if r.in_band else "no")
        lines.append(
            "| "
            + " | ".join(
                [
                    r.name,
                    _fmt_tokens(r.sft_tokens),
                    _fmt(r.entropy, ".3f"),
                    band,
                    _fmt_tokens(r.rl_tokens),
                    _fmt(r.token_efficiency, ".4g"),
                    _fmt(r.final_reward, ".4f"),
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def plot_rows(rows: list[Row], out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = [r for r in rows if r.curve]
    if not drawn:
        raise TokenEffError("no checkpoint has an RL log with rewards to plot")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in drawn:
        xs, ys = zip(*r.curve)
        ent = "" if r.entropy is None else f", entropy {r.entropy:.2f}" + ("" if r.in_band else " (out of band)")
        ax.plot(xs, ys, label=f"{r.name}{ent}", linestyle="-" if r.in_band is not False else "--")
    ax.set_xlabel("RL training tokens")
    ax.set_ylabel("reward")
    ax.set_title("RL reward vs RL tokens, per SFT checkpoint")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ------------------------------------------------------------------------------------------------ CLI
def _define_flags():
    if "input" in flags.FLAGS:
        return
    flags.DEFINE_string("input", None, "JSON/JSONL list of checkpoints {name, sft_tokens, entropy?, rl_jsonl?}")
    flags.DEFINE_string("out_md", None, "also write the markdown table here")
    flags.DEFINE_string("out_png", None, "plot reward vs RL tokens per checkpoint here")
    flags.DEFINE_string(
        "reward_key", None, f"reward metric in the RL logs (default: first of {', '.join(REWARD_KEYS)})"
    )
    flags.DEFINE_float("entropy_low", 0.3, "lower edge of the entropy band")
    flags.DEFINE_float("entropy_high", 0.5, "upper edge of the entropy band")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {' '.join(argv[1:])}")
    F = flags.FLAGS
    if not F.input:
        sys.exit("error: --input is required")
    band = (F.entropy_low, F.entropy_high)
    try:
        rows = compute(F.input, band, F.reward_key)
        table = markdown_table(rows, band)
        if any(r.entropy is not None for r in rows):
            picked, why = pick_checkpoint(rows, band)
            table += f"\nRL start point by entropy: **{picked['name']}** ({why}).\n"
        print(table, end="")
        if F.out_md:
            os.makedirs(os.path.dirname(os.path.abspath(F.out_md)), exist_ok=True)
            with open(F.out_md, "w") as f:
                f.write(table)
        if F.out_png:
            print(f"wrote {plot_rows(rows, F.out_png)}")
    except (TokenEffError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")


def run() -> None:
    _define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
