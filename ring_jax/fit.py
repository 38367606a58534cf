"""Will it fit: per-device memory of the compiled SFT step, the rollout (prefill + decode with the KV cache) and the
C3PO RL step (+ the reference log-probabilities) for a model on a mesh, from XLA's memory analysis of the programs
compiled against abstract arrays (``jax.ShapeDtypeStruct``: nothing is allocated, no accelerator is needed).

Each program is the library's own (``make_train_step`` with the SFT or RL loss, the sampling engine's
``device.prefill_body`` and ``device.decode_body``), jitted with explicit shardings from the rules table and compiled
under ``jax.set_mesh`` so the MoE block takes its expert-parallel path.  ``inputs`` are the per-device bytes of the
program's arguments by kind, exact from the shardings; ``resident`` are arrays that stay in device memory during the
program without being its arguments (the optimizer state and the reference model during rollout, ...); ``temp`` is
XLA's temporary allocation (activations, gradients, collective buffers).  ``peak = arguments + outputs - aliased +
temporaries + resident``.

The mesh may be fake CPU devices (``--xla_force_host_platform_device_count``; temporaries then reflect XLA:CPU's
fusion and layout, e.g. bf16 matmuls done in f32) or a TPU topology compiled deviceless by libtpu
(``jax.experimental.topologies``), which gives the TPU compiler's own figures.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from numpy.typing import DTypeLike

from ring_jax.config import ModelConfig
from ring_jax.model.transformer import KVCache, build_model
from ring_jax.rl.step import RLConfig, make_rl_train_step, policy_logprobs
from ring_jax.sampling import device
from ring_jax.sampling.types import DecodeState
from ring_jax.sharding import batch_sharding
from ring_jax.train.losses import LossConfig, sft_loss_fn
from ring_jax.train.optim import OptimConfig, decay_mask, make_optimizer
from ring_jax.train.step import (
    TrainState,
    abstract_train_state,
    data_parallel_size,
    make_train_step,
    split_model,
    train_state_shardings,
)

GIB = 2**30
NUM_STOP = device.MIN_STOP_BUCKET  # stop-id columns of the decode state (the engine's minimum bucket)


def _is_sharding(x):
    return isinstance(x, jax.sharding.Sharding)


def shard_bytes(tree: Any, shardings: Any) -> int:
    """Per-device bytes of the arrays of ``tree`` (abstract or concrete) placed by ``shardings`` (same structure)."""
    xs = jax.tree.leaves(tree)
    ss = jax.tree.leaves(shardings, is_leaf=_is_sharding)
    assert len(xs) == len(ss), (len(xs), len(ss))
    return sum(int(np.prod(s.shard_shape(tuple(x.shape)))) * np.dtype(x.dtype).itemsize for x, s in zip(xs, ss))


@dataclasses.dataclass
class Report:
    """Per-device bytes of one compiled program (see the module doc)."""

    name: str
    inputs: dict[str, int]
    resident: dict[str, int]
    argument: int
    output: int
    alias: int
    temp: int
    note: str = ""
    compile_s: float = 0.0  # seconds to lower and compile the program (this process, this machine)

    @property
    def peak(self) -> int:
        return self.argument + self.output - self.alias + self.temp + sum(self.resident.values())

    def lines(self, hbm_gib: dict[str, float] | None = None) -> list[str]:
        w = 40
        out = [f"{self.name}{'  (' + self.note + ')' if self.note else ''}"]
        for k, v in self.inputs.items():
            out.append(f"  {k + ':':<{w}}{fmt_bytes(v)}")
        other = self.argument - sum(self.inputs.values())
        if abs(other) >= 2**20:
            out.append(f"  {'other arguments:':<{w}}{fmt_bytes(other)}")
        for k, v in self.resident.items():
            out.append(f"  {k + ' (resident):':<{w}}{fmt_bytes(v)}")
        out.append(f"  {'outputs not aliased to inputs:':<{w}}{fmt_bytes(self.output - self.alias)}")
        out.append(f"  {'temporaries (XLA):':<{w}}{fmt_bytes(self.temp)}")
        fits = ""
        if hbm_gib:
            fits = "   " + ", ".join(
                f"{'fits' if self.peak <= v * GIB else 'does NOT fit'} {k} ({v:g} GiB)" for k, v in hbm_gib.items()
            )
        out.append(f"  {'peak:':<{w}}{fmt_bytes(self.peak)}{fits}")
        if self.compile_s:
            out.append(f"  {'compile (lower + compile):':<{w}}{self.compile_s:9.1f} s")
        return out


def fmt_bytes(x: int) -> str:
    for unit, div in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(x) >= div / 10 or unit == "KiB":
            return f"{x / div:9.2f} {unit}"
    return f"{x} B"


def extrapolate(r1: Report, r2: Report, layers: int) -> Report:
    """Report for ``layers`` layers from reports at 1 and 2 layers (every figure linear in the layer count: the
    per-layer parameters, optimizer moments, KV cache, saved layer inputs and gradients).  Kept for comparison only:
    with the layers scanned, temporaries are not linear in depth (the ling-lite SFT step: 10.2 GiB extrapolated,
    17.4 GiB compiled at 28 layers, BUILD_NOTES issue 17), and a full compile costs about as much as two small ones."""
    lin = lambda a, b: int(a + (layers - 1) * (b - a))  # noqa: E731
    # a forward-only program's temporaries do not grow with layers; a slightly smaller 2-layer figure is the
    # compiler's noise, not a trend to extrapolate
    temp = lin(r1.temp, r2.temp) if r2.temp >= r1.temp else r1.temp
    return Report(
        r1.name,
        {k: lin(r1.inputs[k], r2.inputs[k]) for k in r1.inputs},
        {k: lin(r1.resident[k], r2.resident[k]) for k in r1.resident},
        lin(r1.argument, r2.argument),
        lin(r1.output, r2.output),
        lin(r1.alias, r2.alias),
        temp,
        note=(r1.note + "; " if r1.note else "")
        + f"extrapolated from 1 and 2 layers: temporaries {fmt_bytes(r1.temp).strip()}, "
        f"{fmt_bytes(r2.temp).strip()}",
        compile_s=r1.compile_s + r2.compile_s,
    )


def _compile(jitted, *args):
    """(compiled program, seconds to lower and compile it)."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def _report(name, compiled, inputs, resident=None, note="") -> Report:
    compiled, seconds = compiled
    ma = compiled.memory_analysis()
    return Report(
        name,
        inputs,
        resident or {},
        int(ma.argument_size_in_bytes),
        int(ma.output_size_in_bytes),
        int(ma.alias_size_in_bytes),
        int(ma.temp_size_in_bytes),
        note,
        seconds,
    )


# ------------------------------------------------------------------------------------------------ set-up
@dataclasses.dataclass
class Setup:
    cfg: ModelConfig
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    optimizer: object
    schedule: Callable
    state: TrainState  # abstract
    shardings: TrainState

    @property
    def params_bytes(self) -> int:
        return shard_bytes(self.state.params, self.shardings.params)

    @property
    def opt_bytes(self) -> int:
        return shard_bytes(self.state.opt_state, self.shardings.opt_state)

    def rows(self, shape: tuple[int, ...], dtype: DTypeLike = jnp.int32) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype)

    def row_sharding(self, ndim: int = 2) -> NamedSharding:
        spec = tuple(batch_sharding(self.mesh, max(ndim, 2)).spec)[:ndim]
        return NamedSharding(self.mesh, P(*spec))


def make_setup(cfg: ModelConfig, mesh: Mesh, optim: OptimConfig = OptimConfig()) -> Setup:
    """Abstract model, AdamW state and their shardings on ``mesh`` (nothing allocated)."""
    graphdef, pvars, params = split_model(nnx.eval_shape(lambda: build_model(cfg)))
    optimizer, schedule = make_optimizer(optim, 1000, decay_mask(pvars))
    state = abstract_train_state(params, optimizer)
    return Setup(cfg, mesh, graphdef, optimizer, schedule, state, train_state_shardings(pvars, state, mesh))


def _batch_bytes(setup: Setup, batch) -> int:
    return sum(shard_bytes(x, setup.row_sharding(x.ndim)) for x in jax.tree.leaves(batch))


# ------------------------------------------------------------------------------------------------ programs
def sft_step(
    setup: Setup, seq_len: int, global_batch: int, micro_batches: int = 1, loss: LossConfig = LossConfig()
) -> Report:
    """The SFT train step (``make_train_step`` + ``sft_loss_fn``) on a [global_batch, seq_len] batch."""
    step = make_train_step(
        setup.graphdef,
        sft_loss_fn(loss),
        setup.optimizer,
        setup.mesh,
        setup.shardings,
        micro_batches,
        schedule=setup.schedule,
    )
    batch = {
        k: setup.rows((global_batch, seq_len)) for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions")
    }
    compiled = _compile(step, setup.state, batch)
    return _report(
        f"SFT train step: {global_batch} x {seq_len} tokens, {micro_batches} micro-batch(es)",
        compiled,
        {"params": setup.params_bytes, "optimizer state": setup.opt_bytes, "batch": _batch_bytes(setup, batch)},
    )


def rl_step(setup: Setup, rl: RLConfig, rows: int, seq_len: int, micro_batches: int = 1) -> Report:
    """The RL train step (``make_rl_train_step``) on [rows, seq_len] packed rows; the frozen
    reference parameters are resident when ``rl.policy.beta`` > 0."""
    step = make_rl_train_step(
        setup.graphdef,
        rl,
        setup.optimizer,
        setup.mesh,
        setup.shardings,
        schedule=setup.schedule,
        num_micro=micro_batches,
    )
    batch = {k: setup.rows((rows, seq_len)) for k in ("tokens", "targets", "positions", "segment_ids")}
    keys = ("weights", "old_logp", "advantages", "tis") + (("ref_logp",) if rl.policy.beta else ())
    batch.update({k: setup.rows((rows, seq_len), jnp.float32) for k in keys})
    compiled = _compile(step, setup.state, batch, jax.ShapeDtypeStruct((), jnp.float32))
    resident = {"reference params": setup.params_bytes} if rl.policy.beta else {}
    return _report(
        f"RL train step: {rows} x {seq_len} packed rows, {micro_batches} micro-batch(es)",
        compiled,
        {"params": setup.params_bytes, "optimizer state": setup.opt_bytes, "batch": _batch_bytes(setup, batch)},
        resident,
    )


def ref_logp(setup: Setup, rows: int, seq_len: int, logit_chunk: int = 0) -> Report:
    """log pi_ref(targets) of the packed rows under the frozen reference (the KL term's input)."""

    def fn(params, tokens, positions, segment_ids, targets):
        return policy_logprobs(nnx.merge(setup.graphdef, params), tokens, positions, segment_ids, targets, logit_chunk)[
            0
        ]

    rsh = setup.row_sharding(2)
    args = [setup.rows((rows, seq_len)) for _ in range(4)]
    with jax.set_mesh(setup.mesh):
        compiled = _compile(
            jax.jit(fn, in_shardings=(setup.shardings.params, *[rsh] * 4), out_shardings=rsh), setup.state.params, *args
        )
    return _report(
        f"reference log-probs: {rows} x {seq_len}",
        compiled,
        {"reference params": setup.params_bytes, "rows": 4 * _batch_bytes(setup, args[0])},
        {"params": setup.params_bytes, "optimizer state": setup.opt_bytes},
    )


def decode_state_shardings(ds: DecodeState | KVCache, mesh: Mesh) -> DecodeState | KVCache:
    """NamedShardings of a DecodeState / KVCache as the sampling engine places it (``device.decode_state_specs``:
    cache and logits over the slots, per-slot scalars replicated)."""
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec), device.decode_state_specs(ds, mesh), is_leaf=lambda x: isinstance(x, P)
    )


def kv_cache_bytes(cfg: ModelConfig, slots: int, cache_len: int, dtype: DTypeLike | None = None) -> int:
    """Global bytes of the KV cache: layers x 2 (k, v) x slots x cache_len x kv_heads x head_dim x itemsize."""
    item = np.dtype(dtype or cfg.dtype).itemsize
    return cfg.num_hidden_layers * 2 * slots * cache_len * cfg.kv_heads * cfg.head_size * item


def cache_len_for(cfg: ModelConfig, prompt_len: int, max_new_tokens: int) -> tuple[int, int]:
    """(prompt bucket, cache length S) as the sampling engine picks them (``device.prompt_bucket`` /
    ``device.cache_bucket`` at their default minimums: powers of two, S capped at the context)."""
    pb = device.prompt_bucket(prompt_len)
    return pb, device.cache_bucket(pb + max_new_tokens, cfg.max_position_embeddings)


def decode_state_bytes(setup: Setup, num_slots: int, cache_len: int) -> tuple[int, int]:
    """(KV cache, whole decode state) bytes per device for ``num_slots`` x ``cache_len`` (exact, no compile)."""
    ds = jax.eval_shape(functools.partial(device.empty_state_body, setup.cfg, num_slots, cache_len, NUM_STOP))
    ds_sh = decode_state_shardings(ds, setup.mesh)
    return shard_bytes(ds.cache, ds_sh.cache), shard_bytes(ds, ds_sh)


def rollout(
    setup: Setup,
    num_slots: int,
    prompt_len: int,
    max_new_tokens: int,
    prefill_batch: int = 0,
    chunk: int = 32,
    resident_ref: bool = True,
) -> tuple[Report, Report]:
    """(prefill, decode) of the sampling engine with ``num_slots`` sequences generated concurrently (the decode
    batch) and a cache of S = the engine's bucket of prompt_len + max_new_tokens slots each.  Prefill takes
    ``prefill_batch`` prompts (default num_slots) and writes a fresh [prefill_batch, P] cache (P: the prompt bucket)
    that the engine then copies into the first P positions of slots of the decode state; during prefill the decode
    state is resident.  The trainer's optimizer state (and
    the reference model with ``resident_ref``) stay resident throughout the rollout."""
    cfg, mesh = setup.cfg, setup.mesh
    pb, s = cache_len_for(cfg, prompt_len, max_new_tokens)
    k = prefill_batch or num_slots
    ds = jax.eval_shape(functools.partial(device.empty_state_body, cfg, num_slots, s, NUM_STOP))
    ds_sh = decode_state_shardings(ds, mesh)
    p_sh = setup.shardings.params
    resident = {"optimizer state": setup.opt_bytes}
    if resident_ref:
        resident["reference params"] = setup.params_bytes
    rsh1, rsh2 = setup.row_sharding(1), setup.row_sharding(2)
    with jax.set_mesh(mesh):
        prefill = functools.partial(device.prefill_body, setup.graphdef, cache_len=pb, chunk=device.PREFILL_CHUNK)
        cache_abs, logits_abs = jax.eval_shape(prefill, setup.state.params, setup.rows((k, pb)), setup.rows((k,)))
        cache_sh = decode_state_shardings(cache_abs, mesh)
        pre = _compile(
            jax.jit(prefill, in_shardings=(p_sh, rsh2, rsh1), out_shardings=(cache_sh, rsh2)),
            setup.state.params,
            setup.rows((k, pb)),
            setup.rows((k,)),
        )
        dec = _compile(
            jax.jit(
                functools.partial(device.decode_body, setup.graphdef, chunk=chunk, filtered=True),
                in_shardings=(p_sh, ds_sh, NamedSharding(mesh, P())),
                out_shardings=(ds_sh, *[NamedSharding(mesh, P())] * 4),
                donate_argnums=(1,),
            ),
            setup.state.params,
            ds,
            jax.ShapeDtypeStruct((), jnp.int32),
        )
    cache_bytes, ds_bytes = decode_state_bytes(setup, num_slots, s)
    pre_r = _report(
        f"rollout prefill: {k} prompts x {pb} tokens into a {k} x {pb} cache",
        pre,
        {
            "params": setup.params_bytes,
            "prompts": 2 * _batch_bytes(setup, setup.rows((k,))) + _batch_bytes(setup, setup.rows((k, pb))),
        },
        {**resident, "decode state (KV cache of all slots)": ds_bytes},
    )
    dec_r = _report(
        f"rollout decode: {num_slots} slots x {s} cache positions, {chunk} steps per call",
        dec,
        {
            "params": setup.params_bytes,
            "KV cache": cache_bytes,
            "rest of the decode state (logits, ...)": ds_bytes - cache_bytes,
        },
        resident,
    )
    return pre_r, dec_r


def data_parallel(setup: Setup) -> int:
    return data_parallel_size(setup.mesh)


__all__ = [
    "GIB",
    "Report",
    "Setup",
    "cache_len_for",
    "decode_state_bytes",
    "decode_state_shardings",
    "extrapolate",
    "kv_cache_bytes",
    "make_setup",
    "ref_logp",
    "rl_step",
    "rollout",
    "sft_step",
    "shard_bytes",
]
