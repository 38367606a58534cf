"""Device half of the sampling engine: the jitted functions over ``(graphdef, state)`` that prefill prompts, insert
them into slots of the decode state and run the chunked decode loop, the placement of that state on a mesh, and the
shape buckets they compile for.  The host half (which prompt goes to which slot, when, and what comes back) is
:class:`ring_jax.sampling.engine.SamplingEngine`.

Public functions: :func:`prefill`, :func:`insert`, :func:`decode` and :func:`empty_state` are jitted (static:
graphdef or config, shape buckets, sharding rules); :func:`prefill_body`, :func:`insert_body`,
:func:`decode_body` and :func:`empty_state_body` are the same functions unjitted, for a caller that jits them its own
way (the memory planner ``ring_jax.fit``, with explicit shardings).  They are module-level, so engines over equal
models (a new engine per RL step, a reloaded checkpoint) share their compilations (:func:`compile_counts`).

Shape buckets (:func:`prompt_bucket`, :func:`cache_bucket`, :func:`stop_bucket`): every length is padded to a power
of two, at least ``MIN_PROMPT_BUCKET`` prompt positions, ``MIN_CACHE_BUCKET`` cache positions and
``MIN_STOP_BUCKET`` stop ids, so a new prompt length rarely compiles anything new.

Cache layout: one KV cache of ``num_slots`` rows x ``S`` slots (``S`` = cache length bucket), every layer's stacked
on a leading axis (``transformer.KVCache``).  Prompts are
left-aligned: a row's prompt occupies slots [0, L) with positions 0..L-1, generated token g goes to slot/position
L + g (``write_idx`` = ``pos``, per row).  Prefill runs on a fresh small cache (one row per distinct prompt,
right-padded with segment 0 to a power-of-two length bucket) and its rows are then copied into free slots of the big
cache, ``n`` times for ``n`` samples (one prefill per prompt).  Copying a whole row also clears whatever the previous
occupant left (its segment ids become those of the fresh row: 0 past the prompt).

Decode: ``decode`` runs up to ``chunk`` steps inside one ``lax.while_loop`` (sample from the carried logits ->
record -> stop check -> feed the token); it leaves the loop early when fewer than ``min_active`` rows are still
generating, so the host can refill freed slots (continuous batching) without waiting for the whole chunk.  Finished
and empty rows feed segment-0 tokens at their current slot, which their masks ignore.

Parameters are never copied: every call takes the state the caller holds (the trainer's).

Placement: when the state's parameters are sharded over a mesh of several devices (the trainer's), the engine runs
under that mesh (``jax.set_mesh``: the MoE block takes its expert-parallel path) and these functions place the decode
state by a sharding-rules table (:func:`decode_state_specs`, ``rules``; default ``ring_jax.sharding.DEFAULT_RULES``):
the KV cache, its segment ids / positions and the logits are split over the slots by the batch axes (kv heads over
tensor); the per-slot scalars the host loop reads (active, ngen, stop ids, ...) and the sampled tokens are
replicated, so every process of a multi-host mesh can read them.
"""

from __future__ import annotations

import functools
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

from ring_jax.config import ModelConfig
from ring_jax.model.attention import CACHE_AXES, K_CACHE_AXES
from ring_jax.model.moe import routing_dtype
from ring_jax.model.transformer import BailingMoeForCausalLM, KVCache, abstract_model, init_cache
from ring_jax.sampling import rules as sampling_rules
from ring_jax.sampling.types import DecodeState, pow2_bucket
from ring_jax.sharding import DEFAULT_RULES, ShardingRules

T = TypeVar("T")


# ------------------------------------------------------------------------------------------------ shape buckets
MIN_PROMPT_BUCKET = 16  # smallest prefill length P (SamplingEngine.min_prompt_bucket's default)
MIN_CACHE_BUCKET = 64  # smallest cache length S (SamplingEngine.min_cache_bucket's default)
MIN_STOP_BUCKET = 8  # smallest number of stop-id columns of the decode state
PREFILL_CHUNK = 512  # prompt positions per prefill step (SamplingEngine.prefill_chunk's default)


def prompt_bucket(prompt_len: int, minimum: int = MIN_PROMPT_BUCKET) -> int:
    """Padded length P of a prefill over prompts of up to ``prompt_len`` tokens: the power of two >= both."""
    return pow2_bucket(prompt_len, minimum)


def cache_bucket(positions: int, context: int | None = None, minimum: int = MIN_CACHE_BUCKET) -> int:
    """Cache length S for ``positions`` = prompt bucket + max_new_tokens: the power of two >= both ``positions`` and
    ``minimum``, capped at ``context`` (max_position_embeddings) when given."""
    s = pow2_bucket(positions, minimum)
    return s if context is None else min(s, context)


def stop_bucket(num_stop: int, minimum: int = MIN_STOP_BUCKET) -> int:
    """Stop-id columns of the decode state for requests with up to ``num_stop`` stop ids."""
    return pow2_bucket(num_stop, minimum)


# ------------------------------------------------------------------------------------------------ MoE path
@functools.lru_cache(maxsize=16)
def graphdef_of(cfg: ModelConfig) -> nnx.GraphDef:
    """The model's graphdef for ``cfg``, built once per config: RL makes an engine per step, and tracing the model
    abstractly costs ~0.15 s for ``small`` and ~1.2 s for ling-lite-1.5 on the CPU host."""
    return nnx.split(abstract_model(cfg))[0]


CAPACITY_DECODE_MAX_GROUP = 32  # measured crossover on CPU (bench MoE, 8 experts top-2): see decode_moe_impl


def decode_moe_impl(cfg: ModelConfig, num_slots: int, backend: str | None = None) -> str:
    """MoE compute path for decoding ``num_slots`` rows (one token each per step) when the caller names none.

    On CPU a decode step has few (token, slot) assignments: the dispatch path's per-expert loop is then mostly
    fixed cost, and the all-experts ``dense`` path runs E/k times the routed work.  The ``capacity`` path
    (``moe.moe_capacity``: every expert's rows in one [E, C, H] block, C = 1.5x the mean group, three batched
    matmuls; exact, with a fallback when a group outgrows C) beat both on the bench MoE (8 experts top-2) up to 128
    rows, a mean group of 32 (``CAPACITY_DECODE_MAX_GROUP``); from 256 rows dispatch is faster (BUILD_NOTES.md,
    "Rollouts at RL batch sizes").  With fewer assignments than experts (a row or two), dispatch reads only the
    experts in use.  Other backends and dense-MLP models keep the configured path."""
    backend = backend or jax.default_backend()
    e, k = cfg.num_experts or 0, cfg.num_experts_per_tok
    if backend == "cpu" and e and e <= num_slots * k <= CAPACITY_DECODE_MAX_GROUP * e:
        return "capacity"
    return cfg.moe_impl


# ------------------------------------------------------------------------------------------------ placement
def mesh_of(state: nnx.State | dict[str, Any]) -> jax.sharding.Mesh | None:
    """The mesh the arrays of ``state`` are sharded over when it has more than one device, else None."""
    for x in jax.tree.leaves(state):
        sh = getattr(x, "sharding", None)
        if isinstance(sh, jax.sharding.NamedSharding) and sh.mesh.size > 1:
            return sh.mesh
    return None


def decode_state_specs(
    tree: DecodeState | KVCache | dict[str, jax.Array],
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh,
    rules: ShardingRules = DEFAULT_RULES,
) -> DecodeState | KVCache | dict[str, jax.sharding.PartitionSpec]:
    """PartitionSpecs for a DecodeState or a KVCache (see the module doc): k [layers, slots, kv_heads, head_dim, S]
    and v [layers, slots, kv_heads, S, head_dim] by the rules for their logical axes (``layers`` +
    ``attention.K_CACHE_AXES`` / ``CACHE_AXES``), the cache's segment ids and positions [slots, S] and the logits
    [slots, V] over the slots, everything else replicated."""

    def one(path, x):
        names = {getattr(k, "name", getattr(k, "key", None)) for k in path}
        if x.ndim == 5:
            return rules.spec(("layers",) + (K_CACHE_AXES if "k" in names else CACHE_AXES), x.shape, mesh)
        if names & {"logits", "segment_ids", "positions"}:
            return rules.spec(("batch",) + (None,) * (x.ndim - 1), x.shape, mesh)
        return jax.sharding.PartitionSpec()

    return jax.tree_util.tree_map_with_path(one, tree)


def place(tree: T, rules: ShardingRules = DEFAULT_RULES) -> T:
    """Constrain a DecodeState / KVCache (or a dict of logits) to :func:`decode_state_specs` by ``rules`` under the
    active mesh (none: unchanged).  Called inside the jitted functions."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return tree
    return jax.lax.with_sharding_constraint(tree, decode_state_specs(tree, mesh, rules))


def _replicated(x):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec())


# ------------------------------------------------------------------------------------------------ jitted bodies
def prefill_body(
    graphdef: nnx.GraphDef,
    state: nnx.State | dict[str, Any],
    tokens: jax.Array,
    lengths: jax.Array,
    *,
    cache_len: int,
    chunk: int = 0,
    rules: ShardingRules = DEFAULT_RULES,
    record_routing: bool = False,
) -> tuple[KVCache, jax.Array] | tuple[KVCache, jax.Array, jax.Array]:
    """tokens [K, P] right-padded, lengths [K] (0 = dummy row) -> (cache [K, cache_len, ...], last logits [K, V]).
    ``chunk`` < P (both powers of two): the prompts go through the model ``chunk`` positions at a time (one
    ``lax.scan`` over the chunks, the cache carried), so attention over the cache reads only the blocks written so
    far and no [K, P, P]-sized scores exist at once.  ``record_routing``: a third output, every prompt position's
    top-k experts per MoE layer [K, P, L, k] (``moe.routing_dtype``), for rollout routing replay."""
    model = nnx.merge(graphdef, state)
    k, p = tokens.shape
    ar = jnp.arange(p, dtype=jnp.int32)
    positions = jnp.broadcast_to(ar, (k, p))
    segment_ids = (ar[None, :] < lengths[:, None]).astype(jnp.int32)
    cache = place(init_cache(model.config, k, cache_len), rules)
    if chunk and chunk < p:
        n = p // chunk

        def one(cache, xs):
            tok, pos, seg, start = xs
            out = model(
                tok,
                pos,
                seg,
                cache=cache,
                write_idx=jnp.full((k,), start, jnp.int32),
                compute_logits=False,
                return_hidden=True,
                return_routing=record_routing,
            )
            return place(out.cache, rules), (out.hidden, routing_record(out.routing, model.config))

        split = lambda a: a.reshape(k, n, chunk).swapaxes(0, 1)  # noqa: E731
        cache, (hidden, routing) = jax.lax.scan(
            one, cache, (split(tokens), split(positions), split(segment_ids), jnp.arange(n, dtype=jnp.int32) * chunk)
        )
        hidden = hidden.swapaxes(0, 1).reshape(k, p, -1)
        if routing is not None:
            routing = routing.swapaxes(0, 1).reshape(k, p, *routing.shape[3:])
        out_cache = cache
    else:
        out = model(
            tokens,
            positions,
            segment_ids,
            cache=cache,
            write_idx=jnp.zeros((k,), jnp.int32),
            compute_logits=False,
            return_hidden=True,
            return_routing=record_routing,
        )
        hidden, out_cache, routing = out.hidden, out.cache, routing_record(out.routing, model.config)
    h_last = hidden[jnp.arange(k), jnp.maximum(lengths - 1, 0)]
    logits = project(h_last, model.head_weight())
    result = (place(out_cache, rules), place({"logits": logits}, rules)["logits"])
    return result + (_replicated(routing),) if record_routing else result


def routing_record(routing: jax.Array | None, cfg: ModelConfig) -> jax.Array | None:
    """``Output.routing`` (int32) in its storage type ``moe.routing_dtype(num_experts)``; None stays None."""
    return None if routing is None else routing.astype(routing_dtype(cfg.num_experts))


def empty_state_body(
    cfg: ModelConfig, num_slots: int, cache_len: int, num_stop: int, rules: ShardingRules = DEFAULT_RULES
) -> DecodeState:
    """A decode state of ``num_slots`` empty rows (none active), a cache of ``cache_len`` positions each and
    ``num_stop`` stop-id columns."""
    b = num_slots
    zi = jnp.zeros((b,), jnp.int32)
    return place(
        DecodeState(
            cache=init_cache(cfg, b, cache_len),
            logits=jnp.zeros((b, cfg.vocab_size), jnp.float32),
            keys=jnp.zeros((b, 2), jnp.uint32),
            pos=zi,
            ngen=zi,
            max_new=zi,
            active=jnp.zeros((b,), bool),
            stop_hit=jnp.zeros((b,), bool),
            temperature=jnp.ones((b,), jnp.float32),
            top_p=jnp.ones((b,), jnp.float32),
            top_k=zi,
            stop_ids=jnp.full((b, num_stop), -1, jnp.int32),
        ),
        rules,
    )


def insert_body(
    ds: DecodeState,
    src_cache: KVCache,
    src_logits: jax.Array,
    src_rows: jax.Array,
    dst: jax.Array,
    lengths: jax.Array,
    base_key: jax.Array,
    req_ids: jax.Array,
    copy_ids: jax.Array,
    max_new: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    top_k: jax.Array,
    stop_ids: jax.Array,
    *,
    rules: ShardingRules = DEFAULT_RULES,
) -> DecodeState:
    """Copy prefilled rows ``src_rows`` of (src_cache, src_logits) into slots ``dst`` (dst == num_slots: dummy,
    dropped) and set those rows' sampling parameters; their sequences start now (active, ngen 0, pos = length).

    ``src_cache`` holds P <= S positions (the prompt bucket): only the first P positions of each slot's keys and values
    are written, so admitting a prompt costs its own length, not the cache's.  The slot's segment ids and positions
    are rewritten whole (0 past P), which masks whatever the slot's previous sequence left in its keys and values
    there until decode overwrites it."""
    p = src_cache.segment_ids.shape[1]

    def put(big, small):
        return big.at[dst].set(small[src_rows].astype(big.dtype), mode="drop")

    def put_row(big, small):  # [slots, S] from [rows, P]: the rest of the row is emptied
        full = jnp.zeros((small.shape[0], big.shape[1]), big.dtype).at[:, :p].set(small.astype(big.dtype))
        return put(big, full)

    def put_kv(big, small, axis):  # [L, slots, ...]: the slots are the second axis, positions at ``axis``
        idx = (slice(None), dst) + (slice(None),) * (axis - 2) + (slice(0, p),)
        return big.at[idx].set(small[:, src_rows].astype(big.dtype), mode="drop")

    base = jax.random.wrap_key_data(base_key)
    seq_keys = jax.vmap(lambda r, c: jax.random.fold_in(jax.random.fold_in(base, r), c))(req_ids, copy_ids)
    ones = jnp.ones(dst.shape, bool)
    return place(
        DecodeState(
            cache=ds.cache._replace(
                k=put_kv(ds.cache.k, src_cache.k, 4),
                v=put_kv(ds.cache.v, src_cache.v, 3),
                segment_ids=put_row(ds.cache.segment_ids, src_cache.segment_ids),
                positions=put_row(ds.cache.positions, src_cache.positions),
            ),
            logits=put(ds.logits, src_logits),
            keys=ds.keys.at[dst].set(jax.random.key_data(seq_keys), mode="drop"),
            pos=ds.pos.at[dst].set(lengths, mode="drop"),
            ngen=ds.ngen.at[dst].set(0, mode="drop"),
            max_new=ds.max_new.at[dst].set(max_new, mode="drop"),
            active=ds.active.at[dst].set(ones, mode="drop"),
            stop_hit=ds.stop_hit.at[dst].set(~ones, mode="drop"),
            temperature=ds.temperature.at[dst].set(temperature, mode="drop"),
            top_p=ds.top_p.at[dst].set(top_p, mode="drop"),
            top_k=ds.top_k.at[dst].set(top_k, mode="drop"),
            stop_ids=ds.stop_ids.at[dst].set(stop_ids, mode="drop"),
        ),
        rules,
    )


def project(hidden: jax.Array, head: jax.Array) -> jax.Array:
    """Logits [B, V] float32 of final hidden states [B, H] under the output projection ``head`` [H, V]."""
    return jnp.einsum("bh,hv->bv", hidden, head, preferred_element_type=jnp.float32)


def decode_step(
    model: BailingMoeForCausalLM,
    ds: DecodeState,
    *,
    filtered: bool,
    head: jax.Array | None = None,
    record_routing: bool = False,
) -> tuple[DecodeState, jax.Array, ...]:
    """One step for every row: sample from ds.logits, stop check, feed the token.  Returns (new state, token,
    sampling logprob, raw logprob); rows inactive at entry return token -1.  ``head``: the model's
    ``head_weight()``, computed once by the caller for many steps (with norm_head it is a pass over [H, V]).
    ``record_routing``: a fifth output, the fed token's top-k experts per MoE layer [B, L, k]."""
    step_keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(ds.keys), ds.ngen)
    tok, lp, raw = sampling_rules.sample_tokens(
        ds.logits, step_keys, ds.temperature, ds.top_k, ds.top_p, filtered=filtered
    )
    tok = jnp.where(ds.active, tok, -1)
    ngen = ds.ngen + ds.active.astype(jnp.int32)
    hit = ds.active & jnp.any(tok[:, None] == ds.stop_ids, axis=-1)
    still = ds.active & ~hit & (ngen < ds.max_new)
    feed = jnp.maximum(tok, 0)[:, None]
    out = model(
        feed,
        ds.pos[:, None],
        still.astype(jnp.int32)[:, None],
        cache=ds.cache,
        write_idx=ds.pos,
        compute_logits=False,
        return_hidden=True,
        return_routing=record_routing,
    )
    logits = project(out.hidden[:, 0], model.head_weight() if head is None else head)
    ds = ds._replace(
        cache=out.cache,
        logits=logits,
        pos=ds.pos + still.astype(jnp.int32),
        ngen=ngen,
        active=still,
        stop_hit=ds.stop_hit | hit,
    )
    if record_routing:
        return ds, tok, lp, raw, routing_record(out.routing[:, 0], model.config)
    return ds, tok, lp, raw


def decode_body(
    graphdef: nnx.GraphDef,
    state: nnx.State | dict[str, Any],
    ds: DecodeState,
    min_active: jax.Array,
    *,
    chunk: int,
    filtered: bool,
    rules: ShardingRules = DEFAULT_RULES,
    record_routing: bool = False,
) -> tuple[jax.Array, ...]:
    """Up to ``chunk`` decode steps; stops early once fewer than max(min_active, 1) rows are active.
    Returns (state, tokens [B, chunk], logprobs [B, chunk], raw logprobs [B, chunk], steps run), and with
    ``record_routing`` the fed tokens' experts [B, chunk, L, k] (``moe.routing_dtype``) after them."""
    model = nnx.merge(graphdef, state)
    head = model.head_weight()  # once per call, outside the loop
    b = ds.pos.shape[0]
    bufs = (jnp.full((b, chunk), -1, jnp.int32), jnp.zeros((b, chunk), jnp.float32), jnp.zeros((b, chunk), jnp.float32))
    if record_routing:
        cfg = model.config
        n_moe = cfg.num_hidden_layers - cfg.num_first_layers
        rdt = routing_dtype(cfg.num_experts)
        bufs = bufs + (jnp.full((b, chunk, n_moe, cfg.num_experts_per_tok), -1, rdt),)
    floor = jnp.maximum(min_active, 1)

    def cond(c):
        i, d, _ = c
        return (i < chunk) & (jnp.sum(d.active.astype(jnp.int32)) >= floor)

    def body(c):
        i, d, bufs = c
        d, tok, lp, raw, *rt = decode_step(model, d, filtered=filtered, head=head, record_routing=record_routing)
        new = tuple(buf.at[:, i].set(v) for buf, v in zip(bufs, (tok, lp, raw, *rt)))
        return i + 1, d, new

    steps, ds, bufs = jax.lax.while_loop(cond, body, (jnp.int32(0), ds, bufs))
    return (place(ds, rules), *(_replicated(x) for x in bufs[:3]), _replicated(steps), *map(_replicated, bufs[3:]))


# ------------------------------------------------------------------------------------------------ jitted
_PREFILL = jax.jit(prefill_body, static_argnums=(0,), static_argnames=("cache_len", "chunk", "rules", "record_routing"))
_INSERT = jax.jit(insert_body, static_argnames=("rules",), donate_argnums=(0,))
_DECODE = jax.jit(
    decode_body,
    static_argnums=(0,),
    static_argnames=("chunk", "filtered", "rules", "record_routing"),
    donate_argnums=(2,),
)
_EMPTY = jax.jit(empty_state_body, static_argnums=(0, 1, 2, 3), static_argnames=("rules",))


def prefill(
    graphdef: nnx.GraphDef,
    state: nnx.State | dict[str, Any],
    tokens: ArrayLike,
    lengths: ArrayLike,
    *,
    cache_len: int,
    chunk: int = 0,
    rules: ShardingRules = DEFAULT_RULES,
    record_routing: bool = False,
) -> tuple[KVCache, jax.Array] | tuple[KVCache, jax.Array, jax.Array]:
    """Jitted :func:`prefill_body` (one compilation per graphdef, prompt and cache bucket, chunk and rules)."""
    return _PREFILL(
        graphdef, state, tokens, lengths, cache_len=cache_len, chunk=chunk, rules=rules, record_routing=record_routing
    )


def insert(
    ds: DecodeState,
    src_cache: KVCache,
    src_logits: jax.Array,
    src_rows: ArrayLike,
    dst: ArrayLike,
    lengths: ArrayLike,
    base_key: ArrayLike,
    req_ids: ArrayLike,
    copy_ids: ArrayLike,
    max_new: ArrayLike,
    temperature: ArrayLike,
    top_p: ArrayLike,
    top_k: ArrayLike,
    stop_ids: ArrayLike,
    *,
    rules: ShardingRules = DEFAULT_RULES,
) -> DecodeState:
    """Jitted :func:`insert_body`; ``ds`` is donated (do not use it afterwards)."""
    return _INSERT(
        ds,
        src_cache,
        src_logits,
        src_rows,
        dst,
        lengths,
        base_key,
        req_ids,
        copy_ids,
        max_new,
        temperature,
        top_p,
        top_k,
        stop_ids,
        rules=rules,
    )


def decode(
    graphdef: nnx.GraphDef,
    state: nnx.State | dict[str, Any],
    ds: DecodeState,
    min_active: ArrayLike,
    *,
    chunk: int,
    filtered: bool,
    rules: ShardingRules = DEFAULT_RULES,
    record_routing: bool = False,
) -> tuple[jax.Array, ...]:
    """Jitted :func:`decode_body`; ``ds`` is donated (do not use it afterwards)."""
    return _DECODE(
        graphdef, state, ds, min_active, chunk=chunk, filtered=filtered, rules=rules, record_routing=record_routing
    )


def empty_state(
    cfg: ModelConfig, num_slots: int, cache_len: int, num_stop: int, *, rules: ShardingRules = DEFAULT_RULES
) -> DecodeState:
    """Jitted :func:`empty_state_body`."""
    return _EMPTY(cfg, num_slots, cache_len, num_stop, rules=rules)


def compile_counts() -> dict[str, int]:
    """Compiled variants of each jitted function (one per shape bucket, model and rules), over all engines."""
    return {
        name: fn._cache_size()
        for name, fn in (("prefill", _PREFILL), ("insert", _INSERT), ("decode", _DECODE), ("empty", _EMPTY))
    }
