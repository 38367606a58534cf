"""Run every benchmark in experiments/bench/ and write one markdown table (the figures BUILD_NOTES.md quotes).

    python experiments/bench/run_all.py                      # everything, full sizes -> experiments/bench/RESULTS.md
    python -m experiments.bench.run_all --torch_python /path/to/python-with-torch-and-transformers
    python experiments/bench/run_all.py --tunix_python /work/tunixvenv/bin/python    # + Google Tunix peers
    python experiments/bench/run_all.py --quick --out /tmp/bench.md          # tiny sizes: checks the plumbing only
    python experiments/bench/run_all.py --only moe,rl --timeout 900

Each benchmark script runs as its own subprocess (so one crash, hang or out-of-memory does not take the others
down) with a timeout; its output is parsed into rows of

    | benchmark | ring_jax | peer | ratio | target | met? |

under a machine line (CPU model, cores, load, Python / jax / torch / transformers versions, date), followed by each
script's command and the tail of its output.  Peers: Hugging Face transformers on PyTorch, run by ``--torch_python``
(default: this interpreter when it can import both; or $RING_JAX_PEER_PYTHON).  Without them the ring_jax side still
runs and the peer cell says how to install them.  Tunix (google-tunix, in its own interpreter given by
``--tunix_python``) is a second peer of train, sampling and rl (peers/tunix_*.py, run side by side by those
scripts); without it, or when its run fails, the Tunix rows say so instead of giving a figure.  ``--quick`` shrinks
every workload so the whole run takes a few minutes; its figures mean nothing and "met?" reads "n/a (--quick)".
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PEER_PIP = "pip install torch==2.13.0 transformers==4.46.3"
PEER_MISSING = f"peer not installed ({PEER_PIP})"
TUNIX_MISSING = "Tunix: not measured (pass --tunix_python, an interpreter with pip install google-tunix)"
COLUMNS = ("benchmark", "ring_jax", "peer", "ratio", "target", "met")
HEADER = ("benchmark", "ring_jax", "peer", "ratio", "target", "met?")


class ParseError(ValueError):
    """A benchmark's output did not have the expected shape."""


@dataclasses.dataclass
class Row:
    benchmark: str
    ring_jax: str
    peer: str = "-"
    ratio: str = "-"
    target: str = "-"
    met: str = "-"


@dataclasses.dataclass
class Bench:
    name: str
    script: str
    title: str
    full: list
    quick: list
    parse: Callable  # (stdout, json_out or None, ctx) -> list[Row]
    peer: bool = False  # takes --torch_python
    tunix: bool = False  # takes --tunix_python
    json_out: bool = False  # takes --json_out PATH


def _yes(ok: bool) -> str:
    return "yes" if ok else "no"


def _f(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


# ------------------------------------------------------------------------------------------------ parsers
def parse_moe(out: str, _json, ctx) -> list[Row]:
    """bench_moe.py: its markdown table (one row per expert count; columns '<path> ms', 'dense / dispatch', ...)."""
    lines = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("|")]
    if len(lines) < 3:
        raise ParseError("no result table")
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = []
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if len(cells) != len(head):
            raise ParseError(f"table row with {len(cells)} cells, header has {len(head)}: {ln}")
        rows.append(dict(zip(head, cells)))
    if "dispatch ms" not in head:
        raise ParseError("the table has no 'dispatch ms' column")
    m = re.search(r"MoE layer fwd\+bwd, (\d+) tokens, hidden (\d+), expert width (\d+), top-(\d+)", out)
    shape = f"{m.group(1)} tokens, hidden {m.group(2)}, width {m.group(3)}, top-{m.group(4)}" if m else "?"
    lo, hi = rows[0], rows[-1]
    e_lo, e_hi = int(lo["experts"]), int(hi["experts"])
    d_lo, d_hi = float(lo["dispatch ms"]), float(hi["dispatch ms"])
    scale = d_hi / d_lo
    out_rows = [
        Row(
            f"MoE layer fwd+bwd ({shape}): dispatch time at {e_hi} experts / at {e_lo}",
            f"{d_hi:.1f} ms / {d_lo:.1f} ms",
            "-",
            f"{scale:.2f}x",
            "<= 1.3x (64 vs 8 experts)",
            _met(ctx, scale <= 1.3),
        )
    ]
    if "dense ms" in head:
        dense = float(hi["dense ms"])
        out_rows.append(
            Row(
                f"MoE layer fwd+bwd at {e_hi} experts: dispatch vs dense all-experts path",
                f"dispatch {d_hi:.1f} ms",
                f"dense {dense:.1f} ms",
                f"{dense / d_hi:.1f}x faster",
                ">= 20x",
                _met(ctx, dense / d_hi >= 20),
            )
        )
    return out_rows


def parse_train(out: str, js, ctx) -> list[Row]:
    """bench_train.py --json_out: results[name] with tokens_per_s, tokens_per_s_cpu_norm, mfu_cpu_norm and, with the
    peer, x_transformers / x_transformers_cpu."""
    if not js or "results" not in js:
        raise ParseError("no --json_out results")
    res, args = js["results"], js.get("args", {})
    name = next((n for n in res if n.startswith("ring_jax[dispatch]")), None) or next(
        (n for n in res if n.startswith("ring_jax[")), None
    )
    if name is None:
        raise ParseError(f"no ring_jax result among {sorted(res)}")
    r = res[name]
    label = (
        f"train step fwd+bwd+AdamW, {args.get('batch', '?')} x {args.get('seq', '?')} tokens f32, "
        f"{name} vs HF transformers Qwen2-MoE"
    )
    mine = (
        f"{_f(r['tokens_per_s'])} tok/s (CPU-normalised {_f(r['tokens_per_s_cpu_norm'])}; MFU "
        f"{100 * r['mfu_cpu_norm']:.0f}% of the measured matmul peak)"
    )
    rows = []
    # met only when the wall AND the CPU-normalised ratio reach the target: the torch peer runs with passive OpenMP
    # waiting (spinning threads would steal the cores from the interleaved JAX rounds), which costs it wall time on an
    # idle machine, so its wall ratio alone flatters ring_jax (BUILD_NOTES.md, train-step section of session 5)
    if "transformers" in res:
        t = res["transformers"]
        ratio = r["x_transformers"]
        rows.append(
            Row(
                label,
                mine,
                f"{_f(t['tokens_per_s'])} tok/s (CPU-normalised {_f(t['tokens_per_s_cpu_norm'])})",
                f"{ratio:.2f}x (CPU-normalised {r['x_transformers_cpu']:.2f}x)",
                ">= 1.2x",
                _met(ctx, min(ratio, r["x_transformers_cpu"]) >= 1.2),
            )
        )
    else:
        rows.append(Row(label, mine, ctx["peer_missing"], "-", ">= 1.2x", "not measured"))
    for other in res:
        if other != name and other.startswith(("ring_jax[", "minimal[")):
            o = res[other]
            rows.append(
                Row(
                    f"train step: {other} vs {name}",
                    f"{_f(o['tokens_per_s'])} tok/s",
                    f"{name} {_f(r['tokens_per_s'])} tok/s",
                    f"{o['tokens_per_s'] / r['tokens_per_s']:.2f}x",
                    "-",
                    "-",
                )
            )
    label = f"train step vs Tunix (Qwen3 MoE of the same sizes, PeftTrainer step), {name}"
    if "tunix" in res and "x_tunix" in r:
        t = res["tunix"]
        rows.append(
            Row(
                label,
                mine,
                f"{_f(t['tokens_per_s'])} tok/s (CPU-normalised {_f(t['tokens_per_s_cpu_norm'])})",
                f"{r['x_tunix']:.2f}x (CPU-normalised {r['x_tunix_cpu']:.2f}x)",
                ">= 3x",
                _met(ctx, min(r["x_tunix"], r["x_tunix_cpu"]) >= 3),
            )
        )
    else:
        rows.append(Row(label, mine, _tunix_missing(ctx, js.get("tunix_error")), "-", ">= 3x", "not measured"))
    return rows


def _tunix_missing(ctx, error: str | None = None) -> str:
    """The Tunix peer cell when there is no figure: the run's error, or why it was not run."""
    if error:
        return f"Tunix run failed: {error}"[:300]
    return ctx.get("tunix_missing", TUNIX_MISSING)


def _results_line(out: str) -> dict:
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULTS ")]
    if not lines:
        raise ParseError("no 'RESULTS {json}' line")
    try:
        return json.loads(lines[-1][len("RESULTS ") :])
    except json.JSONDecodeError as e:
        raise ParseError(f"bad RESULTS json: {e}") from None


def parse_sampling(out: str, _json, ctx) -> list[Row]:
    """bench_sampling.py: the last line 'RESULTS {json}' (ring_jax_tokens_per_s, hf_tokens_per_s,
    continuous_over_static, ...)."""
    r = _results_line(out)
    if "ring_jax_tokens_per_s" not in r:
        raise ParseError("RESULTS has no ring_jax_tokens_per_s (section 'main' not run?)")
    m = re.search(r"batch (\d+), prompt (\d+), (\d+) new tokens", out)
    shape = f"batch {m.group(1)}, prompt {m.group(2)}, {m.group(3)} new tokens" if m else "?"
    mine = f"{_f(r['ring_jax_tokens_per_s'])} tok/s"
    rows = []
    label = f"sampling, greedy, {shape}: ring_jax engine vs HF transformers generate"
    if "hf_tokens_per_s" in r:
        ratio = r["ring_jax_tokens_per_s"] / r["hf_tokens_per_s"]
        rows.append(
            Row(label, mine, f"{_f(r['hf_tokens_per_s'])} tok/s", f"{ratio:.2f}x", ">= 5x", _met(ctx, ratio >= 5))
        )
    else:
        rows.append(
            Row(
                label,
                mine,
                ctx["peer_missing"] if not ctx["peer"] else "peer run failed (see details)",
                "-",
                ">= 5x",
                "not measured",
            )
        )
    if "continuous_over_static" in r:
        rows.append(
            Row(
                "sampling, length-skewed requests: continuous vs static batching (waves of the slot count)",
                f"continuous {r['continuous_over_static']:.2f}x faster",
                "static waves (ring_jax)",
                f"{r['continuous_over_static']:.2f}x",
                "-",
                "-",
            )
        )
    label = "sampling vs Tunix vanilla Sampler (greedy, same shapes, Qwen3 MoE without the shared expert)"
    if "tunix_tokens_per_s" in r and "ring_jax_noshared_tokens_per_s" in r:
        ratio = r["ring_jax_noshared_tokens_per_s"] / r["tunix_tokens_per_s"]
        cpu = (
            f" (CPU {r['tunix_cpu_s'] / r['ring_jax_noshared_cpu_s']:.2f}x)"
            if r.get("ring_jax_noshared_cpu_s") and "tunix_cpu_s" in r
            else ""
        )
        rows.append(
            Row(
                label,
                f"{_f(r['ring_jax_noshared_tokens_per_s'])} tok/s on the same model ({mine} with the shared expert)",
                f"{_f(r['tunix_tokens_per_s'])} tok/s",
                f"{ratio:.2f}x{cpu}",
                ">= 5x",
                _met(ctx, ratio >= 5),
            )
        )
    else:
        fail = re.search(r"^\[tunix\] failed \(exit \S+\): (.*)$", out, flags=re.M)
        rows.append(
            Row(label, mine, _tunix_missing(ctx, fail.group(1) if fail else None), "-", ">= 5x", "not measured")
        )
    return rows


def parse_gmm(out: str, _json, ctx) -> list[Row]:
    """bench_gmm.py: 'backend=...' then one line per implementation '<name>: <ms> ms ...'."""
    m = re.search(r"backend=(\w+)", out)
    if not m:
        raise ParseError("no 'backend=' line")
    backend = m.group(1)
    ms = {k: float(v) for k, v in re.findall(r"^\s*(\w+): +([\d.]+) ms", out, flags=re.M)}
    if "pallas_gmm" not in ms:
        fail = re.search(r"pallas_gmm: FAILED (.*)", out)
        raise ParseError(f"pallas_gmm did not run: {fail.group(1) if fail else 'no timing line'}")
    err = re.search(r"max \|pallas - ragged_dot\| = (\S+)", out)
    peer = f"ragged_dot {ms['ragged_dot']:.3f} ms" if "ragged_dot" in ms else "ragged_dot failed"
    ratio = f"{ms['ragged_dot'] / ms['pallas_gmm']:.2f}x" if "ragged_dot" in ms else "-"
    met = "n/a (CPU: Pallas interpret mode)" if backend == "cpu" else ("n/a (--quick)" if ctx["quick"] else "-")
    return [
        Row(
            f"grouped matmul ({backend}): Pallas gmm vs lax.ragged_dot",
            f"pallas_gmm {ms['pallas_gmm']:.3f} ms" + (f" (max abs diff {err.group(1)})" if err else ""),
            peer,
            ratio,
            "GPU/TPU figure (vs ragged_dot and the bf16 peak)",
            met,
        )
    ]


def parse_rl(out: str, _json, ctx) -> list[Row]:
    """bench_rl.py: the last line 'RESULTS {json}' with per-aggregation tokens_* and *_s entries and the budget."""
    r = _results_line(out)
    if "c3po" not in r:
        raise ParseError("RESULTS has no c3po entry")
    c, phi = r["c3po"], r["budget"]

    def spread(x):
        return f"{x['tokens_mean']:.0f} +- {x['tokens_std']:.1f} ({x['tokens_min']:.0f}-{x['tokens_max']:.0f})"

    base = next((k for k in ("seq_mean", "token_mean") if k in r), None)
    exact = c["tokens_std"] == 0 and c["tokens_min"] == c["tokens_max"] == phi
    rows = [
        Row(
            f"RL tokens per optimiser step, Phi = {phi}: C3PO vs sample-level batching ({base or '-'})",
            f"c3po {spread(c)}",
            f"{base} {spread(r[base])}" if base else "-",
            f"std {c['tokens_std']:.1f} vs {r[base]['tokens_std']:.1f}" if base else "-",
            "C3PO: exactly Phi every step (std 0)",
            _yes(exact),
        )
    ]
    m = re.search(r"(\d+) prompts x (\d+) samples x <= (\d+) new tokens", out)
    shape = f"{m.group(1)} prompts x {m.group(2)} samples x <= {m.group(3)} tokens" if m else "?"
    split = ", ".join(f"{p} {c[p + '_s']:.2f}" for p in ("rollout", "reward", "reference", "train"))
    label = f"RL step ({shape}), c3po, after compilation"
    target = ">= 4x faster than Tunix GRPO (issue 6 quotes ~1.5 s/step)"
    if "tunix_grpo" in r:
        t = r["tunix_grpo"]
        ratio = t["step_s_median"] / c["step_s"]
        rows.append(
            Row(
                label + " vs Tunix GRPOLearner",
                f"{c['step_s']:.2f} s/step ({split})",
                f"Tunix GRPO {t['step_s_median']:.2f} s/step (median; mean {t['step_s_mean']:.2f}) over "
                f"{len(t['step_s']) - 1} steps, {t['rows_per_step']} responses trained/step",
                f"{ratio:.2f}x faster",
                target,
                _met(ctx, ratio >= 4),
            )
        )
    else:
        rows.append(
            Row(
                label,
                f"{c['step_s']:.2f} s/step ({split})",
                _tunix_missing(ctx, r.get("tunix_error")).replace("Tunix", "Tunix GRPO", 1),
                "-",
                target,
                "not measured",
            )
        )
    return rows


def parse_decode_scaling(out: str, _json, ctx) -> list[Row]:
    """bench_decode_scaling.py: the last line 'RESULTS {json}' (limits, per-rows engine / peer figures, scaling,
    the RL step at the main job's shape)."""
    r = _results_line(out)
    eng = r.get("engine") or {}
    if not eng:
        raise ParseError("RESULTS has no engine figures")
    m = re.search(r"prompt (\d+), (\d+) new tokens", out)
    shape = f"prompt {m.group(1)}, {m.group(2)} new" if m else "?"
    rows = []
    for n in r["rows"]:
        e = eng.get(str(n), {})
        if "tok_s" not in e:
            continue
        frac = f", {e['frac']:.0%} of the limit ({r[f'limit_ms_{n}']:.1f} ms)" if "frac" in e else ""
        mine = f"{_f(e['tok_s'])} tok/s, {e['ms_step']:.1f} ms/step{frac}"
        hf = e.get("hf_tok_s")
        ok = hf is not None and e["tok_s"] >= 2 * hf and e.get("frac", 0) >= 0.5
        rows.append(
            Row(
                f"decode, greedy, {n} rows ({shape}): ring_jax vs HF transformers generate",
                mine,
                f"{_f(hf)} tok/s" if hf else (ctx["peer_missing"] if not ctx["peer"] else "peer run failed"),
                f"{e['tok_s'] / hf:.2f}x" if hf else "-",
                ">= 2x HF and >= 50% of the limit",
                _met(ctx, ok) if hf else "not measured",
            )
        )
        tx = e.get("tunix_tok_s")
        if tx and "noshared_tok_s" in e:
            ratio = e["noshared_tok_s"] / tx
            rows.append(
                Row(
                    f"decode, greedy, {n} rows: ring_jax vs Tunix Sampler (same model, no shared expert)",
                    f"{_f(e['noshared_tok_s'])} tok/s",
                    f"{_f(tx)} tok/s",
                    f"{ratio:.2f}x",
                    ">= 2x",
                    _met(ctx, ratio >= 2),
                )
            )
        else:
            rows.append(
                Row(
                    f"decode, greedy, {n} rows: ring_jax vs Tunix Sampler",
                    mine,
                    _tunix_missing(ctx, e.get("tunix_error")),
                    "-",
                    ">= 2x",
                    "not measured",
                )
            )
    if "scaling" in r:
        lo, hi = r["rows"][0], r["rows"][-1]
        rows.append(
            Row(
                f"decode tok/s at {hi} rows / at {lo} rows",
                f"{r['scaling']:.2f}x",
                "-",
                "-",
                ">= 6x",
                _met(ctx, r["scaling"] >= 6),
            )
        )
    if r.get("rl"):
        c = r["rl"]
        split = ", ".join(f"{p} {c[p + '_s']:.2f}" for p in ("rollout", "reward", "reference", "train"))
        rows.append(
            Row(
                "RL step at the main job's shape (16 prompts x 8 samples x <= 128 tokens), c3po",
                f"{c['step_s']:.2f} s/step ({split})",
                "-",
                "-",
                "-",
                "-",
            )
        )
    return rows


def _met(ctx, ok: bool) -> str:
    return "n/a (--quick)" if ctx["quick"] else _yes(ok)


# ------------------------------------------------------------------------------------------------ the benchmarks
BENCHES = [
    Bench(
        "moe",
        "bench_moe.py",
        "MoE dispatch scaling (8-64 experts) and dispatch vs dense",
        full=[],
        quick=[
            "--tokens",
            "256",
            "--hidden",
            "64",
            "--width",
            "64",
            "--experts",
            "4,8",
            "--paths",
            "dispatch,dense",
            "--reps",
            "2",
            "--gap",
            "0",
        ],
        parse=parse_moe,
    ),
    Bench(
        "train",
        "bench_train.py",
        "train step vs HF transformers",
        full=[],
        quick=[
            "--impls",
            "dispatch",
            "--rounds",
            "1",
            "--steps",
            "1",
            "--layers",
            "1",
            "--hidden",
            "64",
            "--heads",
            "4",
            "--kv_heads",
            "2",
            "--experts",
            "4",
            "--moe_ffn",
            "64",
            "--batch",
            "2",
            "--seq",
            "32",
            "--vocab",
            "256",
        ],
        parse=parse_train,
        peer=True,
        json_out=True,
        tunix=True,
    ),
    Bench(
        "sampling",
        "bench_sampling.py",
        "sampling engine vs HF generate",
        full=[],
        quick=[
            "--sections",
            "main,batching,torch",
            "--batch",
            "4",
            "--prompt_len",
            "8",
            "--new_tokens",
            "16",
            "--repeats",
            "1",
            "--requests",
            "8",
            "--threads",
            "1",
        ],
        parse=parse_sampling,
        peer=True,
        tunix=True,
    ),
    Bench(
        "decode",
        "bench_decode_scaling.py",
        "decode throughput at 16-256 rows vs HF and Tunix; the limit",
        full=["--sections", "limits,engine,torch,tunix,rl"],
        quick=["--sections", "limits,engine,torch,tunix", "--rows", "4,8", "--new_tokens", "8", "--repeats", "1"],
        parse=parse_decode_scaling,
        peer=True,
        tunix=True,
    ),
    Bench(
        "gmm", "bench_gmm.py", "Pallas grouped matmul vs ragged_dot", full=[], quick=["--iters", "1"], parse=parse_gmm
    ),
    Bench(
        "rl",
        "bench_rl.py",
        "C3PO vs sample-level batching; RL step time",
        full=[],
        quick=[
            "--preset",
            "tiny",
            "--steps",
            "3",
            "--max_new_tokens",
            "8",
            "--prompts_per_step",
            "2",
            "--responses_per_step",
            "4",
            "--stop_tokens",
            "8",
            "--seq_len",
            "64",
        ],
        parse=parse_rl,
        tunix=True,
    ),
]
BY_NAME = {b.name: b for b in BENCHES}


# ------------------------------------------------------------------------------------------------ machine, peers
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


PEER_PROBE = "import json, torch, transformers; print(json.dumps([torch.__version__, transformers.__version__]))"


def find_peer(torch_python: str) -> tuple[str | None, str]:
    """(interpreter with torch + transformers or None, versions or the reason)."""
    candidates = [torch_python] if torch_python else [os.environ.get("RING_JAX_PEER_PYTHON", ""), sys.executable]
    reasons = []
    for py in filter(None, candidates):
        try:
            r = subprocess.run([py, "-c", PEER_PROBE], capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            reasons.append(f"{py}: {type(e).__name__}")
            continue
        if r.returncode == 0:
            t, tr = json.loads(r.stdout.strip().splitlines()[-1])
            return py, f"torch {t}, transformers {tr} ({py})"
        reasons.append(f"{py}: {(r.stderr.strip().splitlines() or ['failed'])[-1]}")
    return None, "; ".join(reasons) or "no interpreter given"


TUNIX_PROBE = (
    "import json, importlib.metadata as m, tunix, jax, flax; "
    "print(json.dumps([m.version('google-tunix'), jax.__version__, flax.__version__]))"
)


def find_tunix(tunix_python: str) -> tuple[str | None, str]:
    """(interpreter that imports tunix or None, versions or the reason)."""
    if not tunix_python:
        return None, "not given (--tunix_python)"
    try:
        r = subprocess.run([tunix_python, "-c", TUNIX_PROBE], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{tunix_python}: {type(e).__name__}: {e}"
    if r.returncode:
        return None, f"{tunix_python}: {(r.stderr.strip().splitlines() or ['failed'])[-1]}"
    t, j, f = json.loads(r.stdout.strip().splitlines()[-1])
    return tunix_python, f"google-tunix {t}, jax {j}, flax {f} ({tunix_python})"


def machine_line(peer_info: str, tunix_info: str = "") -> str:
    cores = os.cpu_count()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = cores
    jax_v = _version("jax") or "not installed"
    jaxlib_v = _version("jaxlib") or "?"
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"{cpu_model()}, {cores} cores ({usable} usable), load average {os.getloadavg()[0]:.1f} at start; "
        f"Python {platform.python_version()}; jax {jax_v} / jaxlib {jaxlib_v}, flax {_version('flax') or '?'}; "
        f"peer: {peer_info}; " + (f"Tunix: {tunix_info}; " if tunix_info else "") + now
    )


# ------------------------------------------------------------------------------------------------ running
@dataclasses.dataclass
class Outcome:
    cmd: list
    rc: int | None  # None: timed out
    seconds: float
    stdout: str
    stderr: str
    json: dict | None = None


def run_bench(
    bench: Bench, quick: bool, peer: str | None, timeout: float, extra: list | None = None, tunix: str | None = None
) -> Outcome:
    cmd = [sys.executable, os.path.join(HERE, bench.script), *(bench.quick if quick else bench.full), *(extra or [])]
    if bench.peer and peer:
        cmd += ["--torch_python", peer]
    if bench.tunix and tunix:
        cmd += ["--tunix_python", tunix]
    json_path = None
    if bench.json_out:
        fd, json_path = tempfile.mkstemp(prefix=f"bench_{bench.name}_", suffix=".json")
        os.close(fd)
        cmd += ["--json_out", json_path]
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.time()
    p = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )  # its own process group: a timeout kills the peers it started too
    try:
        out, err = p.communicate(timeout=timeout)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        rc = None
    js = None
    if json_path:
        try:
            with open(json_path) as f:
                js = json.load(f) if os.path.getsize(json_path) else None
        except (OSError, json.JSONDecodeError):
            js = None
        os.unlink(json_path)
    return Outcome(cmd, rc, time.time() - t0, out, err, js)


def rows_for(bench: Bench, o: Outcome, ctx: dict) -> list[Row]:
    if o.rc is None:
        return [Row(bench.title, f"timed out after {o.seconds:.0f} s", met="error")]
    if o.rc != 0:
        last = (o.stderr.strip().splitlines() or o.stdout.strip().splitlines() or ["no output"])[-1]
        return [Row(bench.title, f"failed (exit {o.rc}): {last[:160]}", met="error")]
    try:
        return bench.parse(o.stdout, o.json, ctx)
    except (ParseError, KeyError, ValueError, TypeError, ZeroDivisionError) as e:
        return [Row(bench.title, f"output not understood: {e}", met="error")]


def _cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(_cell(getattr(r, c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def parse_table(text: str) -> list[dict]:
    """The rows of the first results table in ``text`` (a RESULTS.md), as dicts keyed by the column names."""
    lines = text.splitlines()
    want = "| " + " | ".join(HEADER) + " |"
    start = lines.index(want)
    out = []
    for ln in lines[start + 2 :]:
        if not ln.startswith("|"):
            break
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", ln.strip())[1:-1]]
        if len(cells) != len(HEADER):
            raise ParseError(f"row with {len(cells)} cells: {ln}")
        out.append(dict(zip(COLUMNS, cells)))
    return out


def report(rows: list[Row], outcomes: dict, machine: str, argv: list, quick: bool) -> str:
    parts = [
        "# Benchmarks",
        "",
        f"Written by `python experiments/bench/run_all.py {' '.join(argv)}`".replace(" `", "`")
        + (" (--quick: tiny sizes, the figures mean nothing)" if quick else ""),
        "",
        f"Machine: {machine}",
        "",
        markdown_table(rows),
        "",
        "## Runs",
        "",
    ]
    for name, o in outcomes.items():
        status = "timed out" if o.rc is None else f"exit {o.rc}"
        cmd = " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in o.cmd[1:])
        cmd = re.sub(r"--json_out \S+", "--json_out <temporary file>", cmd)
        parts += [f"### {name}: `python {cmd}` ({status}, {o.seconds:.0f} s)", "", "```"]
        tail = o.stdout.strip().splitlines()[-40:]
        if o.rc != 0:
            tail += ["--- stderr (tail) ---"] + o.stderr.strip().splitlines()[-15:]
        parts += tail + ["```", ""]
    return "\n".join(parts)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(BY_NAME)}")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a plumbing check; the figures mean nothing)")
    ap.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    ap.add_argument("--timeout", type=float, default=0, help="seconds per benchmark (default 2400, --quick 600)")
    ap.add_argument("--torch_python", default="", help="interpreter with torch + transformers for the peers")
    ap.add_argument(
        "--tunix_python",
        default="",
        help="interpreter with google-tunix for the Tunix peers "
        "(train, sampling, rl); '' = Tunix rows say not measured",
    )
    a = ap.parse_args(argv)
    names = [n for n in a.only.split(",") if n] or list(BY_NAME)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; known: {', '.join(BY_NAME)}")
    timeout = a.timeout or (600 if a.quick else 2400)

    needs_peer = any(BY_NAME[n].peer for n in names)
    peer, peer_info = find_peer(a.torch_python) if needs_peer else (None, "not needed")
    if needs_peer and peer is None:
        peer_info = f"not installed ({peer_info}); {PEER_PIP}"
    tunix, tunix_info = (None, "")
    if a.tunix_python and any(BY_NAME[n].tunix for n in names):
        tunix, tunix_info = find_tunix(a.tunix_python)
        if tunix is None:
            tunix_info = f"not importable ({tunix_info})"
    machine = machine_line(peer_info, tunix_info)
    print(f"machine: {machine}", flush=True)
    ctx = {
        "quick": a.quick,
        "peer": peer,
        "peer_missing": PEER_MISSING,
        "tunix": tunix,
        "tunix_missing": f"Tunix: not measured ({tunix_info})" if a.tunix_python and tunix is None else TUNIX_MISSING,
    }
    rows, outcomes = [], {}
    for n in names:
        b = BY_NAME[n]
        print(f"== {n}: {b.title} (timeout {timeout:.0f} s)", flush=True)
        o = run_bench(b, a.quick, peer, timeout, tunix=tunix)
        outcomes[n] = o
        new = rows_for(b, o, ctx)
        rows += new
        print(f"== {n}: {'timed out' if o.rc is None else f'exit {o.rc}'} in {o.seconds:.0f} s", flush=True)
        for r in new:
            print(f"   {r.benchmark}: {r.ring_jax} | {r.peer} | {r.ratio} | {r.target} | {r.met}", flush=True)
    text = report(rows, outcomes, machine, argv, a.quick)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        f.write(text)
    print("\n" + markdown_table(rows) + f"\n\nwritten to {a.out}", flush=True)
    return 0 if all(r.met != "error" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
