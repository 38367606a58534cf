"""Training metrics: a progress bar, TensorBoard events and a crash-safe JSONL log from one ``write`` call.

    with MetricsWriter("runs/sft", total_steps=1000, flops_per_token=flops_per_token(cfg, 2048),
                       peak_flops=measure_matmul_peak()) as mw:
        for step in range(1, 1001):
            ...
            mw.write(step, {"loss": loss, "tokens": n_tokens, "expert_load": load})

Per ``write(step, scalars)``:
- ``metrics.jsonl`` in ``log_dir`` gets one line ``{"step": step, "time": seconds since the writer was created,
  **scalars}``, flushed (and fsync'ed) at once, so a crash loses nothing already written.  Arrays of more than one
  element are written as (nested) lists; non-finite floats as ``null`` (strict JSON).
- TensorBoard (tensorboardX) gets ``add_scalar`` for scalars and ``add_histogram`` for arrays (e.g. the per-expert
  load: its spread across experts shows the imbalance).
- ``tokens`` (tokens processed since the previous write) turns into ``tokens_per_s`` = tokens / wall seconds since
  the previous write (the first write counts from the writer's creation, or from the last ``reset_clock()``: call
  it after compilation to keep compile time out), and, when ``flops_per_token`` and ``peak_flops`` are set, into
  ``mfu`` = tokens_per_s * flops_per_token / peak_flops.  Both are logged like any other scalar.
- the tqdm bar (stderr) moves to ``step`` (steps completed, 1-based: the last write is ``total_steps``) and shows
  loss, tokens/s, MFU and the ETA.

``is_chief=False`` (every process but 0 in a multi-host run) makes every method a no-op: no directory, no file,
no bar.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ring_jax.config import ModelConfig

JSONL_NAME = "metrics.jsonl"


# ------------------------------------------------------------------------------------------------ value handling
def _to_numpy(v) -> np.ndarray:
    return np.asarray(v)  # jax arrays, python numbers and numpy values alike (a device->host copy for jax)


def _json_value(a: np.ndarray):
    """A numpy value as strict JSON: number or nested list; non-finite floats become None."""
    if a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer):
        return a.tolist()

    def fix(x):
        if isinstance(x, list):
            return [fix(y) for y in x]
        return x if math.isfinite(x) else None

    return fix(a.astype(np.float64).tolist())


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl``.  A truncated last line (a crash mid-write) is skipped; a bad line elsewhere
    raises ``ValueError`` naming the line."""
    with open(path) as f:
        lines = f.read().splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON object ({e.msg})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{i + 1}: not a JSON object")
        out.append(rec)
    return out


def is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ------------------------------------------------------------------------------------------------ the writer
class MetricsWriter:
    """Progress bar + TensorBoard + JSONL.  See the module docstring.

    ``clock`` (seconds, monotonic) is injectable for tests; ``show_bar=False`` keeps the terminal quiet;
    ``tensorboard=False`` skips the event files.
    """

    def __init__(
        self,
        log_dir: str,
        total_steps: int,
        peak_flops: float | None = None,
        flops_per_token: float | None = None,
        is_chief: bool = True,
        desc: str = "train",
        *,
        clock: Callable[[], float] = time.perf_counter,
        show_bar: bool = True,
        tensorboard: bool = True,
    ):
        self.log_dir = log_dir
        self.total_steps = int(total_steps)
        self.peak_flops = peak_flops
        self.flops_per_token = flops_per_token
        self.is_chief = bool(is_chief)
        self._clock = clock
        self._t0 = self._last = clock()
        self._bar = self._tb = self._f = None
        self._closed = False
        self.last: dict[str, Any] = {}  # the last record written (also on non-chief processes, for logging)
        if not self.is_chief:
            return
        os.makedirs(log_dir, exist_ok=True)
        self.jsonl_path = os.path.join(log_dir, JSONL_NAME)
        self._f = open(self.jsonl_path, "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=log_dir, flush_secs=10)
        if show_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total_steps, desc=desc, unit="step", dynamic_ncols=True)

    # -------------------------------------------------------------------- API
    def reset_clock(self) -> None:
        """Restart the interval of the next ``tokens_per_s`` (e.g. after the first, compiling, step)."""
        self._last = self._clock()

    def write(self, step: int, scalars: dict[str, Any]) -> dict[str, Any]:
        """Log ``scalars`` for ``step``; returns the record (with derived ``tokens_per_s``/``mfu``)."""
        now = self._clock()
        dt, self._last = now - self._last, now
        step = int(step)
        rec: dict[str, Any] = {"step": step, "time": round(now - self._t0, 6)}
        arrays: dict[str, np.ndarray] = {}
        for k, v in scalars.items():
            if k in ("step", "time"):
                raise ValueError(f"metric name {k!r} is reserved")
            a = _to_numpy(v)
            if a.size == 1 and a.ndim <= 1:
                a = a.reshape(())
            if a.ndim:
                arrays[k] = a
            rec[k] = _json_value(a)
        if "tokens" in rec and is_number(rec["tokens"]) and "tokens_per_s" not in scalars:
            tps = rec["tokens"] / dt if dt > 0 else float("nan")
            rec["tokens_per_s"] = tps if math.isfinite(tps) else None
            if self.flops_per_token and self.peak_flops and rec["tokens_per_s"] is not None:
                rec["mfu"] = tps * self.flops_per_token / self.peak_flops
        self.last = rec
        if not self.is_chief or self._closed:
            return rec
        self._f.write(json.dumps(rec, allow_nan=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        if self._tb is not None:
            for k, v in rec.items():
                if k in ("step", "time") or k in arrays:
                    continue
                if is_number(v):
                    self._tb.add_scalar(k, v, step)
            for k, a in arrays.items():
                finite = a[np.isfinite(a)] if np.issubdtype(a.dtype, np.floating) else a
                if finite.size:
                    self._tb.add_histogram(k, finite.reshape(-1).astype(np.float64), step)
        if self._bar is not None:
            self._bar.n = max(0, min(step, self.total_steps))
            self._bar.set_postfix_str(self._postfix(rec), refresh=False)
            self._bar.refresh()
        return rec

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._f is not None:
            self._f.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------------- helpers
    @staticmethod
    def _postfix(rec: dict[str, Any]) -> str:
        parts = [f"step={rec['step']}"]
        if is_number(rec.get("loss")):
            parts.append(f"loss={rec['loss']:.4f}")
        if is_number(rec.get("tokens_per_s")):
            parts.append(f"tok/s={rec['tokens_per_s']:,.0f}")
        if is_number(rec.get("mfu")):
            parts.append(f"mfu={100 * rec['mfu']:.1f}%")
        return " ".join(parts)


# ------------------------------------------------------------------------------------------------ FLOPs and peak
def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token of a BailingMoe ``cfg`` at sequence length ``seq_len``:

        6 * (N_active - N_lookup) + 12 * L * n_heads * head_dim * seq_len

    ``N_active`` = ``cfg.param_counts()['active']`` (top-k routed + shared experts, router, attention, dense MLPs,
    norms, embedding and lm_head); ``N_lookup`` = vocab * hidden, the input embedding table, a gather rather than a
    matmul (0 when the embeddings are tied: the table then is the lm_head matmul).  6 = 2 FLOPs per multiply-add
    * (1 forward + 2 backward).  The attention term is the score and value matmuls (2 * 2 * seq_len * head_dim per
    head, layer and token, forward) times 3, counted over the full seq_len as is usual (PaLM's MFU convention;
    a causal kernel may skip half of it).
    """
    n_active = cfg.param_counts()["active"]
    lookup = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    attn = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_size * seq_len
    return float(6 * (n_active - lookup) + attn)


def measure_matmul_peak(dtype: str = "float32", n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of a jitted ``[n, n] @ [n, n]`` on the default JAX device, best of ``reps`` timed calls (after a
    compiling warm-up): the achievable dense-matmul peak of this machine right now, to state MFU against."""
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(f(a, b))
    best = float("inf")
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, b))
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def numeric_keys(records: Iterable[dict]) -> list[str]:
    """Keys (first-seen order) whose values are numbers in at least one record (not step/time)."""
    keys: dict[str, None] = {}
    for r in records:
        for k, v in r.items():
            if k not in ("step", "time") and is_number(v):
                keys.setdefault(k)
    return list(keys)


__all__ = [
    "JSONL_NAME",
    "MetricsWriter",
    "flops_per_token",
    "is_number",
    "measure_matmul_peak",
    "numeric_keys",
    "read_jsonl",
]
