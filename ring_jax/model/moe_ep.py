"""Expert parallelism for the routed experts: tokens stay sharded over the batch axes, each token goes to the devices
holding its experts over the ``expert`` mesh axis, and the results come back.

Used by ``MoEBlock`` when the active mesh (``jax.set_mesh``) has an ``expert`` axis of size > 1.  Routing (router
matmul, softmax, top-k, statistics) happens outside, on the globally sharded arrays; only the routed SwiGLU is done
here, inside one ``jax.shard_map`` over the whole mesh:

- tokens ``x [N, H]``, their ``weights/ids [N, k]``: sharded over the batch axes (the rules' ``batch`` entry, by
  default data, fsdp, expert); replicated over ``tensor``.
- expert weights: ``E`` over ``expert``, the expert width ``F`` over ``tensor`` (when it divides), the embed dim whole:
  the in_specs leave it unsharded, so shard_map all-gathers the fsdp-sharded storage (and reduce-scatters its grads).
- with ``F`` sharded the down projection gives partial sums; the combined float32 output is ``psum``-ed over tensor.

Two dispatch paths (``impl``):

``capacity`` (every backend; the only one on CPU, where ``ragged_all_to_all`` is not implemented): each device puts
its (token, slot) assignments into a static buffer ``[E, C, H]`` (C = slots per source device and expert), one
``all_to_all`` over ``expert`` sends every expert's slots to the device that holds it, a batched einsum computes the
local experts on ``[E_local, expert_size * C, H]``, a second ``all_to_all`` brings the rows back, and a float32
weighted combine adds them up.  Priority within a (device, expert) bucket is slot-major: every token's first choice
before any second choice, then token order.  Assignments past C are dropped (they add zero; their weight is lost,
no renormalisation) and counted.  ``C = ceil(capacity_factor * n_local * k / E)`` clipped to ``[1, n_local]``; with
``capacity_factor=None`` C = n_local, the dropless bound (an expert appears at most once among a token's k).

``ragged`` (GPU/TPU, dropless only): sort the assignments by expert, exchange per-expert counts, send exactly the
routed rows with ``jax.lax.ragged_all_to_all``, group them by local expert, ``jax.lax.ragged_dot``, send them back.
UNTESTED on real hardware (no multi-device GPU/TPU here).  Its offset bookkeeping, values and gradients are tested on
CPU with :func:`ragged_all_to_all_emulated` standing in for the collective.  ``impl='auto'`` picks it on gpu/tpu
when no capacity factor is set (``auto_ragged=False`` turns that off; ``platform`` names the backend to decide for,
e.g. a TPU compiled for from a CPU host), else the capacity path.  The MoE block passes its config's ``ep_platform``
and ``ep_auto_ragged`` and the rules of :func:`ring_jax.sharding.active_rules`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh
from jax.sharding import PartitionSpec as P

from ring_jax.model.grouping import group_metadata
from ring_jax.sharding import DEFAULT_RULES, ShardingRules
from ring_jax.utils import log_once

EXPERT_AXIS = "expert"
TENSOR_AXIS = "tensor"
RAGGED_PLATFORMS = ("gpu", "cuda", "rocm", "tpu")  # where impl='auto' may pick the ragged_all_to_all path


# ------------------------------------------------------------------------------------------------- mesh helpers
def active_mesh() -> AbstractMesh | None:
    """The mesh set with ``jax.set_mesh`` (abstract inside jit), or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def _size(mesh, axis) -> int:
    return int(dict(mesh.shape).get(axis, 1))


def expert_parallel_mesh(
    num_experts: int | None, mesh: Mesh | AbstractMesh | None = None
) -> Mesh | AbstractMesh | None:
    """The active mesh when expert parallelism applies to ``num_experts`` experts (``expert`` axis > 1 dividing
    it), else None."""
    mesh = mesh if mesh is not None else active_mesh()
    if mesh is None or not num_experts:
        return None
    x = _size(mesh, EXPERT_AXIS)
    if x <= 1:
        return None
    if num_experts % x:
        log_once(
            f"num_experts={num_experts} is not divisible by the expert mesh axis ({x}); "
            "the MoE block runs without expert parallelism"
        )
        return None
    return mesh


def token_axes(
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh, rules: ShardingRules = DEFAULT_RULES
) -> tuple[str, ...]:
    """Mesh axes the tokens are sharded over inside the EP block: the axes of ``rules``' 'batch' entry that the mesh
    has, always incl. expert."""
    rule = rules.rules.get("batch")
    axes = (rule,) if isinstance(rule, str) else tuple(rule or ())
    axes = tuple(a for a in axes if a in mesh.axis_names)
    return axes if EXPERT_AXIS in axes else axes + (EXPERT_AXIS,)


def capacity(n_local: int, k: int, num_experts: int, capacity_factor: float | None) -> int:
    """Slots per (source device, expert): ceil(cf * n_local * k / E) in [1, n_local]; None -> n_local (dropless)."""
    if capacity_factor is None:
        return max(1, n_local)
    return int(min(max(1, n_local), max(1, math.ceil(capacity_factor * n_local * k / num_experts))))


def _varying_like(z, like):
    """``z`` typed as varying over every manual mesh axis ``like`` varies over (shard_map's vma typing)."""
    try:
        missing = tuple(sorted(jax.typeof(like).mat.varying - jax.typeof(z).mat.varying))
    except AttributeError:  # older/newer aval layout: nothing to do
        return z
    return jax.lax.pcast(z, missing, to="varying") if missing else z


def _swiglu_grouped(xb, wg, wu, wd):
    """xb [G, R, H] through expert g's weights for group g: [G, R, H] (partial over F when F is sharded)."""
    g = jnp.einsum("grh,ghf->grf", xb, wg)
    u = jnp.einsum("grh,ghf->grf", xb, wu)
    return jnp.einsum("grf,gfh->grh", jax.nn.silu(g) * u, wd)


# ------------------------------------------------------------------------------------------------- capacity path
def _capacity_local(x, weights, ids, valid, wg, wu, wd, *, num_experts, cap, tensor_sharded, t_axes):
    """Per-device body of the capacity path.  x [n,H], weights/ids [n,k], valid [n], w* local expert shards."""
    n, h = x.shape
    k = ids.shape[1]
    e, c = num_experts, cap
    xs = jax.lax.axis_size(EXPERT_AXIS)
    e_loc = e // xs
    # slot-major assignment a = j * n + i  (token i, slot j): first choices get the slots first
    ids_sm = ids.T.reshape(-1)
    valid_sm = jnp.tile(valid, k)
    key = jnp.where(valid_sm, ids_sm, e)  # group e: the invalid (padding) assignments
    meta = group_metadata(key, e + 1)
    pos = meta.inv - meta.starts[key]  # rank of each assignment within its (device, expert) bucket
    kept = valid_sm & (pos < c)
    dest = jnp.where(kept, ids_sm * c + pos, e * c)  # e*c: out of range, dropped by the scatter
    tok = jnp.tile(jnp.arange(n, dtype=jnp.int32), k)
    buf = jnp.zeros((e * c, h), x.dtype).at[dest].add(x[tok], mode="drop")
    buf = _varying_like(buf, x)
    # [dest shard, E_local, C, H] -> all_to_all -> [source shard, E_local, C, H]
    recv = jax.lax.all_to_all(buf.reshape(xs, e_loc, c, h), EXPERT_AXIS, 0, 0)
    xb = recv.transpose(1, 0, 2, 3).reshape(e_loc, xs * c, h)
    yb = _swiglu_grouped(xb, wg, wu, wd).astype(x.dtype)
    yb = yb.reshape(e_loc, xs, c, h).transpose(1, 0, 2, 3)
    back = jax.lax.all_to_all(yb, EXPERT_AXIS, 0, 0).reshape(e * c, h)  # [E*C, H] in this device's layout
    back = jnp.concatenate([back, jnp.zeros((1, h), back.dtype)], axis=0)
    y_sm = back[dest].reshape(k, n, h)  # dropped / invalid -> the zero row
    y = jnp.einsum("knh,nk->nh", y_sm.astype(jnp.float32), weights.astype(jnp.float32))
    if tensor_sharded:
        y = jax.lax.psum(y, TENSOR_AXIS)
    dropped = jax.lax.psum(jnp.sum(valid_sm & ~kept).astype(jnp.int32), t_axes)
    return y, dropped


# ------------------------------------------------------------------------------------------------- ragged path
def ragged_all_to_all_emulated(
    operand: jax.Array,
    output: jax.Array,
    input_offsets: jax.Array,
    send_sizes: jax.Array,
    output_offsets: jax.Array,
    recv_sizes: jax.Array,
    *,
    axis_name: str | tuple[str, ...],
) -> jax.Array:
    """Same contract as ``jax.lax.ragged_all_to_all`` (one slice per peer), built from ``all_gather``: runs on CPU,
    so the ragged path's bookkeeping can be tested there.  Memory O(axis_size * rows); for tests only."""
    xs = jax.lax.axis_size(axis_name)
    me = jax.lax.axis_index(axis_name)
    m = operand.shape[0]
    ops = jax.lax.all_gather(operand, axis_name)  # [src, M, ...]
    io, ss, oo = (jax.lax.all_gather(a, axis_name)[:, me] for a in (input_offsets, send_sizes, output_offsets))
    r = jnp.arange(m)
    src_rows = jnp.clip(io[:, None] + r[None], 0, m - 1)
    data = ops[jnp.arange(xs)[:, None], src_rows]  # [src, M, ...]
    tgt = jnp.where(r[None] < ss[:, None], oo[:, None] + r[None], output.shape[0])
    return output.at[tgt.reshape(-1)].set(data.reshape(-1, *operand.shape[1:]), mode="drop")


def _ragged_local(x, weights, ids, valid, wg, wu, wd, *, num_experts, tensor_sharded, t_axes, a2a):
    n, h = x.shape
    k = ids.shape[1]
    e = num_experts
    xs = jax.lax.axis_size(EXPERT_AXIS)
    e_loc = e // xs
    m = n * k
    me = jax.lax.axis_index(EXPERT_AXIS)
    key = jnp.where(jnp.repeat(valid, k), ids.reshape(-1), e)
    meta = group_metadata(key, e + 1)
    order = meta.order
    x_sorted = x[order // k]  # rows grouped by destination shard, then local expert; invalid rows last
    counts = meta.sizes[:e]
    send_sizes = counts.reshape(xs, e_loc).sum(1)
    input_offsets = jnp.cumsum(send_sizes) - send_sizes
    recv_counts = jax.lax.all_to_all(counts.reshape(xs, e_loc), EXPERT_AXIS, 0, 0, tiled=True)  # [src, E_loc]
    recv_sizes = recv_counts.sum(1)
    sent = jax.lax.all_gather(send_sizes, EXPERT_AXIS)  # [src, dst]
    output_offsets = (jnp.cumsum(sent, axis=0) - sent)[me]  # where my slice lands on each receiver
    rows = xs * n * min(k, e_loc)  # worst case: every source sends all its tokens' assignments here
    recv = a2a(
        x_sorted,
        _varying_like(jnp.zeros((rows, h), x.dtype), x_sorted),
        input_offsets,
        send_sizes,
        output_offsets,
        recv_sizes,
        axis_name=EXPERT_AXIS,
    )
    # received layout: [source 0: local expert 0.., source 1: ...]; regroup by local expert for ragged_dot
    recv_end = jnp.cumsum(recv_sizes)
    recv_off = recv_end - recv_sizes
    r = jnp.arange(rows)
    src = jnp.searchsorted(recv_end, r, side="right")
    src_c = jnp.minimum(src, xs - 1)
    within = r - recv_off[src_c]
    lexp = jnp.sum(within[:, None] >= jnp.cumsum(recv_counts, axis=1)[src_c], axis=1)
    lkey = jnp.where(src < xs, lexp, e_loc)
    order2 = group_metadata(lkey, e_loc + 1).order
    group_sizes = recv_counts.sum(0)
    xr = recv[order2]
    g = jax.lax.ragged_dot(xr, wg, group_sizes)
    u = jax.lax.ragged_dot(xr, wu, group_sizes)
    yr = jax.lax.ragged_dot(jax.nn.silu(g) * u, wd, group_sizes)
    yr = jnp.where((r < recv_end[-1])[:, None], yr, 0).astype(x.dtype)
    y_recv = jnp.zeros_like(yr).at[order2].set(yr)
    back_offsets = jax.lax.all_to_all(input_offsets, EXPERT_AXIS, 0, 0, tiled=True)
    ys = a2a(
        y_recv,
        _varying_like(jnp.zeros((m, h), x.dtype), y_recv),
        recv_off,
        recv_sizes,
        back_offsets,
        send_sizes,
        axis_name=EXPERT_AXIS,
    )
    y_flat = jnp.zeros_like(ys).at[order].set(ys)  # token-major [n*k, H]; invalid rows stay zero
    y = jnp.einsum("nkh,nk->nh", y_flat.reshape(n, k, h).astype(jnp.float32), weights.astype(jnp.float32))
    if tensor_sharded:
        y = jax.lax.psum(y, TENSOR_AXIS)
    return y, jnp.zeros((), jnp.int32)


# ------------------------------------------------------------------------------------------------- entry point
def choose_impl(impl: str, capacity_factor: float | None, platform: str | None = None, auto_ragged: bool = True) -> str:
    """The dispatch path to run: ``impl`` checked, or for ``impl='auto'`` the ragged path when ``auto_ragged``, no
    capacity factor and ``platform`` (None: ``jax.default_backend()``) is one of ``RAGGED_PLATFORMS``, else
    capacity."""
    if impl == "auto":
        platform = platform or jax.default_backend()
        ok = auto_ragged and capacity_factor is None and platform in RAGGED_PLATFORMS
        return "ragged" if ok else "capacity"
    if impl not in ("capacity", "ragged"):
        raise ValueError(f"expert-parallel impl {impl!r}: one of auto, capacity, ragged")
    if impl == "ragged" and capacity_factor is not None:
        raise ValueError("the ragged expert-parallel path is dropless; it takes no capacity_factor")
    return impl


def moe_expert_parallel(
    x: jax.Array,
    weights: jax.Array,
    ids: jax.Array,
    wg: jax.Array,
    wu: jax.Array,
    wd: jax.Array,
    *,
    mesh: Mesh | AbstractMesh | None = None,
    capacity_factor: float | None = None,
    impl: str = "auto",
    ragged_a2a: Callable | None = None,
    rules: ShardingRules = DEFAULT_RULES,
    platform: str | None = None,
    auto_ragged: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Routed-expert output ``[N, H]`` float32 and the number of dropped (token, slot) assignments (int32, over the
    whole mesh), with experts sharded over the mesh's ``expert`` axis.

    x [N, H]; weights [N, k] float; ids [N, k] int; wg/wu [E, H, F], wd [E, F, H] (global arrays).  ``mesh``
    defaults to the active one (``jax.set_mesh``).  ``ragged_a2a`` replaces ``jax.lax.ragged_all_to_all`` (tests).
    ``rules``: the tokens are sharded over the mesh axes of its 'batch' entry (:func:`token_axes`).  ``platform``,
    ``auto_ragged``: what ``impl='auto'`` decides for (:func:`choose_impl`)."""
    mesh = mesh if mesh is not None else active_mesh()
    if mesh is None or _size(mesh, EXPERT_AXIS) <= 1:
        raise ValueError("moe_expert_parallel needs a mesh with an 'expert' axis of size > 1 (jax.set_mesh)")
    n, _ = x.shape
    e, _, f = wg.shape
    xsz = _size(mesh, EXPERT_AXIS)
    if e % xsz:
        raise ValueError(f"num_experts={e} is not divisible by the expert mesh axis ({xsz})")
    impl = choose_impl(impl, capacity_factor, platform, auto_ragged)
    t_axes = token_axes(mesh, rules)
    d = int(math.prod(_size(mesh, a) for a in t_axes))
    pad = -n % d
    valid = jnp.ones((n,), jnp.bool_)
    if pad:  # rows added so the token dim divides over the token axes; never dispatched, never counted
        x = jnp.pad(x, ((0, pad), (0, 0)))
        weights = jnp.pad(weights, ((0, pad), (0, 0)))
        ids = jnp.pad(ids, ((0, pad), (0, 0)))
        valid = jnp.pad(valid, (0, pad))
    n_local = (n + pad) // d
    tsz = _size(mesh, TENSOR_AXIS)
    tensor_sharded = tsz > 1 and f % tsz == 0
    tf = TENSOR_AXIS if tensor_sharded else None
    if tsz > 1 and not tensor_sharded:
        log_once(
            f"moe_intermediate_size={f} is not divisible by the tensor mesh axis ({tsz}); expert weights "
            "are replicated over it inside the expert-parallel block"
        )
    tok = P(t_axes)
    specs_in = (
        P(t_axes, None),
        tok,
        tok,
        tok,
        P(EXPERT_AXIS, None, tf),
        P(EXPERT_AXIS, None, tf),
        P(EXPERT_AXIS, tf, None),
    )
    if impl == "capacity":
        body = lambda *a: _capacity_local(
            *a,
            num_experts=e,
            cap=capacity(n_local, ids.shape[1], e, capacity_factor),
            tensor_sharded=tensor_sharded,
            t_axes=t_axes,
        )
    else:
        a2a = ragged_a2a or jax.lax.ragged_all_to_all
        body = lambda *a: _ragged_local(*a, num_experts=e, tensor_sharded=tensor_sharded, t_axes=t_axes, a2a=a2a)
    fn = jax.shard_map(body, mesh=mesh, in_specs=specs_in, out_specs=(P(t_axes, None), P()), check_vma=True)
    y, dropped = fn(x, weights, ids.astype(jnp.int32), valid, wg, wu, wd)
    return (y[:n] if pad else y), dropped
