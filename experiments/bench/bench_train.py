"""Training-step throughput: ring_jax (jitted forward + backward + AdamW) vs Hugging Face transformers' Qwen2-MoE
(forward + backward + torch AdamW), same MoE sizes, float32, CPU, in ONE invocation with interleaved timings.

    /work/venv/bin/python experiments/bench/bench_train.py --torch_python /work/refvenv/bin/python
    ... --tunix_python /work/tunixvenv/bin/python      # + Google Tunix's Qwen3-MoE PeftTrainer step, interleaved too

Workload (defaults): batch 8 x 256 tokens, vocab 1024, hidden 256, 4 layers, 8 heads / 2 KV heads (head_dim 32),
8 experts top-2 (norm_topk_prob), expert width 256, no shared expert (Qwen2-MoE: shared_expert_intermediate_size 0),
q/k/v biases on both sides (Qwen2 always has them), untied embeddings, RoPE theta 1e4.  Loss: next-token cross
entropy only (no router aux loss on either side).  Optimiser: AdamW(lr 1e-4, betas 0.9/0.95, wd 0.1) on both sides.

The torch side runs in a subprocess (``--torch_python``, script ``peers/torch_qwen2moe_step.py``) that waits on
stdin while JAX runs, so the two never compete for the cores.  ``--tunix_python`` (an interpreter with google-tunix)
adds a third implementation the same way: ``peers/tunix_qwen3moe_step.py``, Tunix's own jitted train step
(PeftTrainer.jit_train_and_eval_step) on a Tunix Qwen3-MoE of the same sizes (Qwen3: q/k norms, no q/k/v biases; on
CPU Tunix's MoE layer runs every expert on every token), same AdamW; the ratio ring_jax / Tunix is printed after the
table (median of paired rounds, as for transformers).  Each round times ``--steps`` steps of every
implementation in a rotating order.  Reported per implementation: median-round and best-round tokens/s (wall), a
CPU-normalised tokens/s (tokens / (process CPU seconds / cores): less sensitive to other processes' load on a shared
machine), MFU = tokens/s * flops_per_token / peak with the peak from ring_jax.train.metrics.measure_matmul_peak()
(jitted float32 2048^3 matmul) measured in the same run (torch.mm's peak printed for reference), and the speed-up
over transformers as the median over rounds of the paired (same-round) time ratios.

ring_jax's step (``--step``): ``auto`` (default) uses the project's step, ``ring_jax.train.step.make_train_step``
through ``train_adapter.bench_adapter`` beside this script (same loss and AdamW, plus its non-finite guard and
metrics), when importable, else the self-contained minimal step below (nnx.split + jax.jit + optax.adamw, params
and optimizer state donated);
``both`` adds the minimal step for the first impl.  ``--impls`` picks the MoE compute paths (cfg.moe_impl).
``--profile`` prints where the minimal step's time goes (XLA CPU thunk events of a jax.profiler trace attributed
to jax source lines); ``--breakdown`` times pieces (one MoE block, one attention, head + CE, forward only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# XLA's CPU backend: one device, intra-op parallelism over all (2) cores (must be set before jax is imported);
# --profile needs XLA's per-thunk trace events.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_cpu_multi_thread_eigen=true"
    + (" --xla_cpu_enable_xprof_traceme=true" if "--profile" in sys.argv else "")
).strip()

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from ring_jax.config import ModelConfig, human  # noqa: E402
from ring_jax.model import build_model  # noqa: E402
from ring_jax.train.metrics import flops_per_token, measure_matmul_peak  # noqa: E402

PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers", "torch_qwen2moe_step.py")
TUNIX_PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers", "tunix_qwen3moe_step.py")


def bench_config(a, impl: str) -> ModelConfig:
    return ModelConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.moe_ffn,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        head_dim=a.hidden // a.heads,
        use_qkv_bias=True,
        use_bias=False,
        max_position_embeddings=max(1024, a.seq),
        rope_theta=10000.0,
        num_experts=a.experts,
        num_shared_experts=None,
        num_experts_per_tok=a.topk,
        norm_topk_prob=True,
        moe_intermediate_size=a.moe_ffn,
        first_k_dense_replace=0,
        pad_token_id=0,
        eos_token_id=1,
        initializer_range=0.02,
        tie_word_embeddings=False,
        moe_impl=impl,
        dtype="float32",
        param_dtype="float32",
    )


def matmul_peak_cpu_norm(n: int = 2048, reps: int = 5) -> float:
    """Like measure_matmul_peak, but per process-CPU second x cores (the yardstick of the cpu-normalised MFU)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(f(a, a))
    best = float("inf")
    for _ in range(reps):
        c0 = time.process_time()
        jax.block_until_ready(f(a, a))
        best = min(best, time.process_time() - c0)
    return 2.0 * n**3 / (best / len(os.sched_getaffinity(0)))


def ce_loss(logits, tokens):
    """Mean next-token cross entropy: logits[:, :-1] predict tokens[:, 1:] (as HF's labels=input_ids)."""
    lg = logits[:, :-1].astype(jnp.float32)
    tgt = tokens[:, 1:]
    lse = jax.nn.logsumexp(lg, axis=-1)
    picked = jnp.take_along_axis(lg, tgt[..., None], axis=-1)[..., 0]
    return jnp.mean(lse - picked)


def minimal_step(cfg: ModelConfig, seed: int = 0):
    """(step_fn, state): the self-contained jitted train step (params, opt_state donated)."""
    model = build_model(cfg, seed=seed)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.1)
    opt_state = tx.init(params)

    def loss_fn(p, tokens):
        out = nnx.merge(graphdef, p, rest)(tokens)
        return ce_loss(out.logits, tokens)

    def step(p, o, tokens):
        loss, g = jax.value_and_grad(loss_fn)(p, tokens)
        upd, o = tx.update(g, o, p)
        return optax.apply_updates(p, upd), o, loss

    step = jax.jit(step, donate_argnums=(0, 1))
    state = [params, opt_state]

    def run(tokens):
        state[0], state[1], loss = step(state[0], state[1], tokens)
        return loss

    run.jitted, run.state = step, state
    return run, (graphdef, params, rest)


def real_step(cfg: ModelConfig, seed: int = 0):
    """The project's train step (ring_jax.train.step.make_train_step via ``train_adapter.bench_adapter``: same loss,
    AdamW b2 0.95 / wd 0.1 on matrices only, no clipping, no aux loss, plus its non-finite guard and metrics)."""
    from train_adapter import bench_adapter  # this folder (the script's own, first on sys.path)

    return bench_adapter(cfg, seed)


def _hlo_sources(hlo: str) -> dict[str, tuple[str, str]]:
    """instruction name -> (function, "file:line primitive[ (bwd)]") from the compiled HLO text's metadata
    (op_name and the module's StackFrames / FileLocations tables)."""
    import re

    tables: dict[str, dict[int, str]] = {}
    section = None
    for line in hlo.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section, tables[line] = line, {}
            continue
        if section and re.match(r"^\d+ ", line):
            k, v = line.split(" ", 1)
            tables[section][int(k)] = v
            continue
        section = None
    files = {k: os.path.basename(v.strip('"')) for k, v in tables.get("FileNames", {}).items()}
    funcs = {k: v.strip('"') for k, v in tables.get("FunctionNames", {}).items()}
    locs = {}
    for k, v in tables.get("FileLocations", {}).items():
        m = re.search(r"file_name_id=(\d+) function_name_id=(\d+) line=(\d+)", v)
        locs[k] = (files.get(int(m.group(1)), "?"), funcs.get(int(m.group(2)), "?"), int(m.group(3)))
    frames = {
        k: int(re.search(r"file_location_id=(\d+)", v).group(1)) for k, v in tables.get("StackFrames", {}).items()
    }
    out = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = .*metadata=\{([^}]*)\}", line)
        if not m:
            continue
        meta = m.group(2)
        op = re.search(r'op_name="([^"]+)"', meta)
        sf = re.search(r"stack_frame_id=(\d+)", meta)
        prim = op.group(1).split("/")[-1] if op else "?"
        bwd = " (bwd)" if op and "transpose(" in op.group(1) else ""
        fn, where = "?", "?"
        if sf and int(sf.group(1)) in frames:
            f, fn, ln = locs.get(frames[int(sf.group(1))], ("?", "?", 0))
            where = f"{f}:{ln}"
        out[m.group(1)] = (fn, f"{fn} {where} {prim}{bwd}")
    return out


def profile_step(run, tokens, steps: int = 3, top: int = 25):
    """Where the minimal step's time goes: a jax.profiler trace of ``steps`` steps, every XLA CPU thunk event
    attributed to the jax source line (and function) in its HLO metadata.  Needs XLA_FLAGS
    --xla_cpu_enable_xprof_traceme=true (set by --profile).  Returns (by line, by function, total) in ms/step,
    thunk time summed over the worker threads."""
    import collections
    import glob
    import tempfile

    from jax._src.lib import _profile_data

    src = _hlo_sources(run.jitted.lower(*run.state, tokens).compile().as_text())
    jax.block_until_ready(run(tokens))
    d = tempfile.mkdtemp(prefix="rj_prof_")
    with jax.profiler.trace(d):
        for _ in range(steps):
            loss = run(tokens)
        jax.block_until_ready(loss)
    pd = _profile_data.ProfileData.from_file(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
    by_line, by_fn = collections.Counter(), collections.Counter()
    for plane in pd.planes:
        for ln in plane.lines:
            for ev in ln.events:
                if ev.name in src:
                    fn, label = src[ev.name]
                    by_line[label] += ev.duration_ns / steps / 1e6
                    by_fn[fn] += ev.duration_ns / steps / 1e6
    return by_line.most_common(top), by_fn.most_common(), sum(by_fn.values())


class Torch:
    def __init__(self, python: str, a):
        args = (
            [python, PEER]
            + [
                f"--{k}={getattr(a, k)}"
                for k in (
                    "vocab",
                    "hidden",
                    "layers",
                    "heads",
                    "kv_heads",
                    "experts",
                    "topk",
                    "moe_ffn",
                    "batch",
                    "seq",
                    "threads",
                )
            ]
            + ["--shared_ffn=0", f"--attn={a.torch_attn}"]
        )
        env = dict(os.environ)
        if a.torch_omp_wait_policy:
            env["OMP_WAIT_POLICY"] = a.torch_omp_wait_policy
        self.p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env)
        self.info = self._recv()

    def _recv(self):
        line = self.p.stdout.readline()
        while line and not line.startswith("{"):  # a library's stray print: not part of the protocol
            line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"{type(self).__name__.lower()} peer exited (rc {self.p.wait()})")
        return json.loads(line)

    def ask(self, **cmd):
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        return self._recv()

    def time(self, steps: int) -> tuple[float, float]:
        """(wall seconds, process CPU seconds) per step."""
        r = self.ask(cmd="time", steps=steps)
        self.last_loss = r["loss"]
        return sum(r["seconds"]) / steps, r["cpu_seconds"] / steps

    def close(self):
        try:
            self.p.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.p.stdin.close()
        finally:
            self.p.wait(timeout=30)


class Tunix(Torch):
    """The Tunix peer (``peers/tunix_qwen3moe_step.py`` run by ``--tunix_python``): the torch peer's protocol."""

    def __init__(self, python: str, a):
        args = [python, TUNIX_PEER] + [
            f"--{k}={getattr(a, k)}"
            for k in ("vocab", "hidden", "layers", "heads", "kv_heads", "experts", "topk", "moe_ffn", "batch", "seq")
        ]
        self.p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.info = self._recv()
        if "error" in self.info:
            self.p.wait(timeout=30)
            raise RuntimeError(self.info["error"])


def time_jax(run, tokens, steps: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per step (the step is compiled and warm already)."""
    t0, c0 = time.perf_counter(), time.process_time()
    loss = None
    for _ in range(steps):
        loss = run(tokens)
    jax.block_until_ready(loss)
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


def breakdown(cfg: ModelConfig, tokens, reps: int = 5):
    """fwd+bwd seconds of the pieces of the ring_jax step, each jitted alone."""
    from ring_jax.model.attention import Attention
    from ring_jax.model.layers import rope_cos_sin
    from ring_jax.model.moe import MoEBlock

    b, t = tokens.shape
    x = jax.random.normal(jax.random.key(1), (b, t, cfg.hidden_size), jnp.float32)
    seg = jnp.ones((b, t), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cos, sin = rope_cos_sin(cfg, pos)
    out = {}

    def timeit(f, *args):
        f = jax.jit(f)
        jax.block_until_ready(f(*args))
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            best = min(best, time.perf_counter() - t0)
        return best

    def grad_of(module, call):
        gd, p = nnx.split(module)

        def f(p, x):
            return jax.grad(lambda p, x: jnp.sum(call(nnx.merge(gd, p), x)), argnums=(0, 1))(p, x)

        return f, p

    moe = MoEBlock(cfg, nnx.Rngs(params=0))
    f, p = grad_of(moe, lambda m, x: m(x, seg != 0)[0])
    out["moe_block_fwd_bwd"] = timeit(f, p, x)
    att = Attention(cfg, nnx.Rngs(params=0))
    f, p = grad_of(att, lambda m, x: m(x, cos, sin, seg, pos)[0])
    out["attention_fwd_bwd"] = timeit(f, p, x)
    w = jax.random.normal(jax.random.key(2), (cfg.hidden_size, cfg.vocab_size)) * 0.02
    out["head_ce_fwd_bwd"] = timeit(
        jax.grad(lambda w, x: ce_loss(jnp.einsum("bth,hv->btv", x, w), tokens), argnums=(0, 1)), w, x
    )
    model = build_model(cfg)
    gd, params, rest = nnx.split(model, nnx.Param, ...)
    out["model_fwd"] = timeit(lambda p, tk: ce_loss(nnx.merge(gd, p, rest)(tk).logits, tk), params, tokens)
    out["model_fwd_bwd"] = timeit(
        jax.grad(lambda p, tk: ce_loss(nnx.merge(gd, p, rest)(tk).logits, tk)), params, tokens
    )
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--torch_python", default="", help="interpreter with torch + transformers ('' = skip the peer)")
    p.add_argument("--impls", default="dispatch,dense,ragged", help="ring_jax cfg.moe_impl values to time")
    p.add_argument(
        "--step",
        choices=("auto", "minimal", "real", "both"),
        default="auto",
        help="auto: the project's step (ring_jax.train.step) when importable, else the minimal one; "
        "both: the project's step for every impl plus the minimal step for the first impl",
    )
    p.add_argument("--profile", action="store_true", help="print where the minimal step's time goes (first impl)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=4, help="steps per timed round")
    p.add_argument("--tunix_python", default="", help="interpreter with google-tunix ('' = skip the Tunix peer)")
    p.add_argument("--torch_attn", default="sdpa")
    p.add_argument(
        "--torch_omp_wait_policy",
        default="PASSIVE",
        help="OMP_WAIT_POLICY of the torch peer ('' = torch's default).  PASSIVE: on a shared, "
        "oversubscribed machine torch's spinning OpenMP threads otherwise lose 5-10x (measured); "
        "on an idle machine ACTIVE (the default) can be a little faster",
    )
    p.add_argument("--breakdown", action="store_true")
    p.add_argument("--json_out", default="", help="also write the results here")
    for name, default in (
        ("vocab", 1024),
        ("hidden", 256),
        ("layers", 4),
        ("heads", 8),
        ("kv_heads", 2),
        ("experts", 8),
        ("topk", 2),
        ("moe_ffn", 256),
        ("batch", 8),
        ("seq", 256),
        ("threads", 2),
    ):
        p.add_argument(f"--{name}", type=int, default=default)
    a = p.parse_args(argv)
    impls = [s for s in a.impls.split(",") if s]
    tokens_per_step = a.batch * a.seq

    cfg0 = bench_config(a, impls[0])
    fpt = flops_per_token(cfg0, a.seq)
    counts = cfg0.param_counts()
    print(
        f"machine: {os.cpu_count()} CPU cores, jax {jax.__version__} ({jax.default_backend()}), "
        f"{jax.device_count()} device(s)"
    )
    print(
        f"workload: {a.batch} x {a.seq} tokens, float32; ring_jax params {human(counts['total'])} total / "
        f"{human(counts['active'])} active; {fpt / 1e6:.2f} MFLOP/token (fwd+bwd)"
    )
    peak0 = measure_matmul_peak("float32", 2048, 5)

    torch = Torch(a.torch_python, a) if a.torch_python else None
    if torch is not None:
        i = torch.info
        print(
            f"peer: transformers {i['transformers']} Qwen2-MoE, torch {i['torch']}, {i['threads']} threads, "
            f"OMP_WAIT_POLICY={a.torch_omp_wait_policy or 'default'}, attn {i['attn']}, "
            f"params {human(i['params'])} total / {human(i['active_params'])} active"
        )

    tunix, tunix_error = None, None
    if a.tunix_python:
        try:
            tunix = Tunix(a.tunix_python, a)
            i = tunix.info
            print(
                f"peer: Tunix {i['tunix']} Qwen3-MoE, {i['step']}, jax {i['jax']}, flax {i['flax']}, "
                f"{i['moe_path']}, params {human(i['params'])} total / {human(i['active_params'])} active"
            )
        except (RuntimeError, OSError, json.JSONDecodeError) as e:
            tunix_error = f"{type(e).__name__}: {e}"
            print(f"Tunix peer failed to start: {tunix_error}")

    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, a.vocab, (a.batch, a.seq)), jnp.int32)
    mode = a.step
    if mode == "auto":
        try:
            import ring_jax.train.step  # noqa: F401

            mode = "real"
        except ImportError as e:
            print(f"ring_jax.train.step not importable ({e}); using the minimal step")
            mode = "minimal"
    builds = [(f"ring_jax[{impl}]", impl, "real" if mode in ("real", "both") else "minimal") for impl in impls]
    if mode == "both":
        builds.append((f"minimal[{impls[0]}]", impls[0], "minimal"))
    runners = {}
    for name, impl, kind in builds:
        cfg = bench_config(a, impl)
        t0 = time.perf_counter()
        run = real_step(cfg) if kind == "real" else minimal_step(cfg)[0]
        jax.block_until_ready(run(tokens))
        runners[name] = run
        print(
            f"compiled {name} ({'ring_jax.train.step.make_train_step' if kind == 'real' else 'minimal step'})"
            f" in {time.perf_counter() - t0:.1f}s"
        )

    names = list(runners) + (["transformers"] if torch else []) + (["tunix"] if tunix else [])
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    load0 = os.getloadavg()[0]
    for r in range(a.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            peer = {"transformers": torch, "tunix": tunix}.get(n)
            w, c = peer.time(a.steps) if peer is not None else time_jax(runners[n], tokens, a.steps)
            wall[n].append(w)
            cpu[n].append(c)
    load1 = os.getloadavg()[0]
    peak1 = measure_matmul_peak("float32", 2048, 5)
    peak = max(peak0, peak1)
    peak_cpu = matmul_peak_cpu_norm()
    torch_peak = torch.ask(cmd="peak", n=2048, reps=5)["flops"] if torch else None

    ncores = len(os.sched_getaffinity(0))
    print(f"\nload average (1 min) before / after the timed rounds: {load0:.1f} / {load1:.1f} on {ncores} cores")
    print(
        f"matmul peak (jax, f32 2048^3, best of 5): {peak0 / 1e9:.1f} / {peak1 / 1e9:.1f} GFLOP/s "
        f"(start / end; MFU uses the larger, {peak / 1e9:.1f})"
        + (f"; torch.mm peak {torch_peak / 1e9:.1f} GFLOP/s" if torch_peak else "")
        + f"; cpu-normalised jax peak {peak_cpu / 1e9:.1f} GFLOP/s (for 'MFU cpu')"
    )
    print(
        f"{a.rounds} rounds x {a.steps} steps, rotating order.  tok/s: median round; best: fastest round; "
        f"cpu-norm: tokens / (process CPU s / {ncores}), less sensitive to other load"
    )
    hdr = (
        f"{'implementation':<20}{'ms/step':>9}{'tok/s':>9}{'best':>9}{'cpu-norm':>10}{'MFU':>7}{'MFU best':>9}"
        f"{'MFU cpu':>8}"
    )
    print(hdr + f"{'x HF (median of paired rounds)':>32}")
    res = {}
    for n in names:
        med, best, cmed = statistics.median(wall[n]), min(wall[n]), statistics.median(cpu[n])
        res[n] = {
            "ms_per_step": 1e3 * med,
            "tokens_per_s": tokens_per_step / med,
            "tokens_per_s_best": tokens_per_step / best,
            "tokens_per_s_cpu_norm": tokens_per_step / (cmed / ncores),
            "mfu": tokens_per_step / med * fpt / peak,
            "mfu_best": tokens_per_step / best * fpt / peak,
            "mfu_cpu_norm": tokens_per_step / (cmed / ncores) * fpt / peak_cpu,
            "wall_s": wall[n],
            "cpu_s": cpu[n],
        }
        if torch is not None and n not in ("transformers", "tunix"):
            res[n]["x_transformers"] = statistics.median(t / j for t, j in zip(wall["transformers"], wall[n]))
            res[n]["x_transformers_cpu"] = statistics.median(t / j for t, j in zip(cpu["transformers"], cpu[n]))
        if tunix is not None and n not in ("transformers", "tunix"):
            res[n]["x_tunix"] = statistics.median(t / j for t, j in zip(wall["tunix"], wall[n]))
            res[n]["x_tunix_cpu"] = statistics.median(t / j for t, j in zip(cpu["tunix"], cpu[n]))
    for n, v in res.items():
        ratio = f"{v['x_transformers']:.2f}x (cpu {v['x_transformers_cpu']:.2f}x)" if "x_transformers" in v else "-"
        print(
            f"{n:<20}{v['ms_per_step']:>9.0f}{v['tokens_per_s']:>9,.0f}{v['tokens_per_s_best']:>9,.0f}"
            f"{v['tokens_per_s_cpu_norm']:>10,.0f}{100 * v['mfu']:>6.1f}%{100 * v['mfu_best']:>8.1f}%"
            f"{100 * v['mfu_cpu_norm']:>7.1f}%{ratio:>32}"
        )
    for n, v in res.items():
        if "x_tunix" in v:
            print(f"{n} / Tunix (median of paired rounds): {v['x_tunix']:.2f}x wall, {v['x_tunix_cpu']:.2f}x CPU")
    print(
        "MFU: ring_jax's flops_per_token for every side (Qwen2-MoE's zero-width shared expert and 256x1 "
        "shared-expert gate add no counted FLOPs; Tunix's CPU MoE computes all experts, counted as top-k).  "
        + (
            "Tunix: compared (Qwen3-MoE, PeftTrainer step)."
            if tunix
            else f"Tunix: failed ({tunix_error})."
            if tunix_error
            else "Tunix: not installed, not compared."
        )
    )
    if a.profile:
        run, _ = minimal_step(bench_config(a, impls[0]))
        by_line, by_fn, total = profile_step(run, tokens)
        print(
            f"\nprofile: minimal step, ring_jax[{impls[0]}]: {total:.0f} ms/step of XLA thunk time (summed over "
            f"threads); by function:"
        )
        for k, v in by_fn:
            if v >= 0.5:
                print(f"  {v:8.1f} ms {100 * v / total:5.1f}%  {k}")
        print("  top source lines:")
        for k, v in by_line:
            print(f"  {v:8.1f} ms {100 * v / total:5.1f}%  {k}")
        res["profile_ms"] = {"by_function": dict(by_fn), "by_line": dict(by_line), "total": total}
    if a.breakdown:
        bd = breakdown(bench_config(a, impls[0]), tokens)
        print(f"\nbreakdown ring_jax[{impls[0]}] (jitted alone, best of 5, ms):")
        for k, v in bd.items():
            print(f"  {k:<22}{1e3 * v:8.1f}")
        res["breakdown_ms"] = {k: 1e3 * v for k, v in bd.items()}
    if torch is not None:
        torch.close()
    if tunix is not None:
        tunix.close()
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(
                {
                    "args": vars(a),
                    "peak_flops": peak,
                    "torch_peak_flops": torch_peak,
                    "results": res,
                    "flops_per_token": fpt,
                    "loadavg": [load0, load1],
                    "peak_flops_cpu_norm": peak_cpu,
                    "tunix_info": tunix.info if tunix else None,
                    "tunix_error": tunix_error,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
