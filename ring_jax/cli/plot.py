"""ring-jax-plot: plot the scalars of one or more ``metrics.jsonl`` runs, one subplot per key, runs overlaid.

    ring-jax-plot --jsonl runs/sft/metrics.jsonl --out sft.png
    ring-jax-plot --jsonl runs/a/metrics.jsonl --jsonl runs/b/metrics.jsonl --keys loss,reward_mean --smooth 0.9

``--keys`` defaults to every numeric scalar found in any run (array metrics such as the expert load are skipped).
``--smooth`` is TensorBoard-style exponential smoothing (0 = off, 0.9 = heavy; the raw curve stays, faded).
``--x`` picks the x axis: ``step`` (default), ``time``, or any other numeric key; ``--x tokens`` plots against the
cumulative sum of the per-write ``tokens``.
"""

from __future__ import annotations

import math
import os
import sys

from absl import app, flags

from ring_jax.train.metrics import is_number, numeric_keys, read_jsonl


class PlotError(ValueError):
    """A user error (missing file, unknown key): printed as one line by the CLI."""


def ema(values: list[float], weight: float) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing), skipping non-finite values."""
    if not 0 <= weight < 1:
        raise PlotError(f"--smooth must be in [0, 1), got {weight}")
    out, acc, norm = [], 0.0, 0.0
    for v in values:
        if v is None or not math.isfinite(v):
            out.append(float("nan"))
            continue
        acc = weight * acc + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(acc / norm)
    return out


def load_runs(paths: list[str]) -> dict[str, list[dict]]:
    if not paths:
        raise PlotError("no --jsonl given")
    runs = {}
    for p in paths:
        if not os.path.isfile(p):
            raise PlotError(f"no such file: {p}")
        recs = read_jsonl(p)
        if not recs:
            raise PlotError(f"no records in {p}")
        runs[_label(p, runs)] = recs
    return runs


def _label(path: str, taken) -> str:
    """A short legend label: the run directory's name (metrics.jsonl) or the file stem; made unique."""
    base = os.path.basename(path)
    name = (
        os.path.basename(os.path.dirname(os.path.abspath(path)))
        if base == "metrics.jsonl"
        else os.path.splitext(base)[0]
    )
    label, i = name, 2
    while label in taken:
        label, i = f"{name} ({i})", i + 1
    return label


def _xy(recs: list[dict], key: str, x: str):
    xs, ys, cum = [], [], 0.0
    for r in recs:
        if x == "tokens":
            cum += r.get("tokens") or 0
            xv = cum
        else:
            xv = r.get(x)
        v = r.get(key, "missing")
        if v == "missing" or not is_number(xv):
            continue
        xs.append(xv)
        ys.append(float(v) if is_number(v) else float("nan"))  # None (non-finite when logged) -> a gap
    return xs, ys


def plot_runs(
    paths: list[str],
    out: str,
    keys: list[str] | None = None,
    smooth: float = 0.0,
    x: str = "step",
    title: str | None = None,
) -> str:
    """Plot ``keys`` (default: all numeric scalars) of the JSONL runs at ``paths`` into ``out`` (PNG/PDF/SVG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load_runs(paths)
    known = numeric_keys(r for recs in runs.values() for r in recs)
    if keys:
        unknown = [k for k in keys if k not in known]
        if unknown:
            raise PlotError(
                f"unknown key(s) {', '.join(unknown)}; numeric keys in the run(s): {', '.join(known) or '(none)'}"
            )
    else:
        keys = [k for k in known if k != x]
    if not keys:
        raise PlotError("no numeric scalars to plot")
    if x not in ("step", "time", "tokens") and x not in known:
        raise PlotError(f"unknown --x {x!r}; use step, time, tokens or one of: {', '.join(known)}")

    ncols = 1 if len(keys) == 1 else 2
    nrows = -(-len(keys) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.0 * ncols, 3.2 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes.flat, keys):
        for i, (label, recs) in enumerate(runs.items()):
            xs, ys = _xy(recs, key, x)
            if not xs:
                continue
            c = colors[i % len(colors)]
            if smooth > 0:
                ax.plot(xs, ys, color=c, alpha=0.25, linewidth=0.8)
                ax.plot(xs, ema(ys, smooth), color=c, label=label, linewidth=1.4)
            else:
                ax.plot(xs, ys, color=c, label=label, linewidth=1.2, marker="." if len(xs) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ------------------------------------------------------------------------------------------------ CLI
def _define_flags():
    # Defined on first use (not at import) so that importing this module never clashes with another CLI's flags.
    if "jsonl" in flags.FLAGS:
        return
    flags.DEFINE_multi_string("jsonl", [], "a metrics.jsonl to plot (repeat to overlay runs)")
    flags.DEFINE_list("keys", [], "comma-separated metric names (default: every numeric scalar)")
    flags.DEFINE_string("out", "metrics.png", "output image (.png, .pdf, .svg)")
    flags.DEFINE_float("smooth", 0.0, "exponential smoothing weight in [0, 1); 0 = off")
    flags.DEFINE_string("x", "step", "x axis: step, time, tokens (cumulative) or a numeric key")
    flags.DEFINE_string("title", None, "figure title")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {' '.join(argv[1:])}")
    F = flags.FLAGS
    try:
        out = plot_runs(F.jsonl, F.out, F.keys or None, F.smooth, F.x, F.title)
    except (PlotError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out}")


def run() -> None:
    _define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
