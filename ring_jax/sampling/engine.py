"""Host half of the sampling engine: :class:`SamplingEngine` checks the requests, picks the shape buckets and
schedules the requests over the slots of one decode state, calling the jitted functions of
:mod:`ring_jax.sampling.device` (prefill, insert, decode).

Scheduling: continuous batching (a freed slot is refilled by the next waiting sample before the next decode chunk)
or static batching (fill every slot, run until all rows end, repeat), over the same device functions.  Each distinct
prompt is prefilled once; its cache row stays on device until all of its ``n`` samples have been copied into slots
(possibly across several refills).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from ring_jax.config import ModelConfig
from ring_jax.model.transformer import BailingMoeForCausalLM
from ring_jax.sampling import device
from ring_jax.sampling.types import (
    FINISH_LENGTH,
    FINISH_STOP,
    Completion,
    DecodeState,
    SamplingError,
    SamplingParams,
    pow2_bucket,
)
from ring_jax.sharding import DEFAULT_RULES, ShardingRules, use_rules


def to_numpy(x: Any) -> np.ndarray | tuple | list | dict:
    """device_get of an array or a pytree of arrays, as NumPy (same structure)."""
    return jax.tree.map(np.asarray, jax.device_get(x))


def _key_data(key) -> np.ndarray:
    if isinstance(key, (int, np.integer)):
        key = jax.random.key(int(key))
    elif not jax.dtypes.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)  # a raw uint32[2] (jax.random.PRNGKey) key
    return to_numpy(jax.random.key_data(key)).astype(np.uint32)


@dataclasses.dataclass
class _Seq:
    req: int
    copy: int
    ids: list
    lps: list
    raws: list
    routes: list = dataclasses.field(default_factory=list)  # [tokens, L, k] blocks: prompt, then each chunk's


@dataclasses.dataclass
class _Group:
    cache: object
    logits: object
    rows: dict  # prompt index -> row in this prefill batch
    remaining: int  # samples of these prompts not yet placed in a slot
    routing: np.ndarray | None = None  # [rows, P, L, k] prompt positions' experts (record_routing)


@dataclasses.dataclass
class _Call:
    """One ``generate`` call: its requests, the decode state and the host's view of the slots."""

    prompts: list[list[int]]
    params: list[SamplingParams]
    state: object  # the model parameters the device functions read
    cache_len: int  # S
    num_stop: int  # stop-id columns
    stop_rows: np.ndarray  # [prompts, num_stop] int32, padded with -1
    max_new: list[int]
    base_key: np.ndarray
    ds: DecodeState
    pending: collections.deque  # (prompt index, sample index) not yet in a slot
    slots: list  # _Seq | None per slot
    groups: dict = dataclasses.field(default_factory=dict)  # prefill id -> _Group
    where: dict = dataclasses.field(default_factory=dict)  # prompt index -> prefill id
    done: list = dataclasses.field(default_factory=list)
    stats: collections.Counter = dataclasses.field(default_factory=collections.Counter)


class SamplingEngine:
    """Batched generation with a KV cache and continuous batching.

    Args:
      graphdef, state: ``nnx.split(model)``; ``state`` is used as is (no copy).
      num_slots: rows of the decode batch (sequences generated concurrently).
      chunk: max decode steps per jitted call (the host streams and refills slots between calls).
      prefill_batch: max distinct prompts per prefill call (default num_slots).
      cache_len: fixed cache length S (one decode compilation for every call); default: the power-of-two bucket of
        (prompt bucket + max_new_tokens) per call, at least ``min_cache_bucket``, capped at max_position_embeddings.
      min_prompt_bucket: smallest prompt-length bucket (buckets are powers of two).
      prefill_chunk: prompts longer than this are prefilled this many positions at a time (a power of two; 0: in one
        call); with the blocked cache attention each chunk reads only the cache blocks written before it.
      moe_impl: MoE compute path for prefill and decode (same parameters, another graphdef).  None (default):
        prefill takes the model's configured path and decode the one :func:`device.decode_moe_impl` picks for
        ``num_slots`` rows (on CPU the "capacity" path up to a mean expert group of 32 rows).
      mesh: the mesh to run under (default: the one ``state`` is sharded over, if any).
      rules: the sharding-rules table that places the decode state on that mesh (:func:`device.decode_state_specs`).
      dtype: compute dtype of prefill and decode (None: the model's ``ModelConfig.dtype``), from the same parameters
        (another graphdef, as ``moe_impl``): a bfloat16 sampler beside a float32 trainer.
      record_routing: (None: on for a MoE model) each completion carries ``routing`` [prompt + response tokens,
        MoE layers, top-k]: the experts every token was routed to when it went through the model (prompt tokens in
        prefill, response tokens when fed back in decode; the last response token is never fed: -1), for rollout
        routing replay and the trainer/sampler mismatch metrics.  Storage ``moe.routing_dtype``: 1 byte per
        (token, layer, slot) up to 127 experts.

    After each :meth:`generate`, ``last_stats`` holds that call's counters: ``prefill_calls``, ``prefill_tokens``,
    ``inserts``, ``decode_calls``, ``decode_steps``, ``row_steps`` (decode steps x slots), ``generated_tokens``,
    ``admit_seconds``, ``decode_seconds``, ``seconds`` and ``cache_len`` (S).
    """

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        state: nnx.State | dict[str, Any],
        *,
        num_slots: int = 16,
        chunk: int = 32,
        prefill_batch: int | None = None,
        cache_len: int | None = None,
        min_prompt_bucket: int = device.MIN_PROMPT_BUCKET,
        min_cache_bucket: int = device.MIN_CACHE_BUCKET,
        moe_impl: str | None = None,
        mesh: jax.sharding.Mesh | None = None,
        prefill_chunk: int = device.PREFILL_CHUNK,
        rules: ShardingRules = DEFAULT_RULES,
        record_routing: bool | None = False,
        dtype: str | None = None,
    ):
        cfg: ModelConfig = nnx.merge(graphdef, state).config
        self.mesh = mesh if mesh is not None else device.mesh_of(state)
        self.rules = rules
        if dtype is not None and dtype != cfg.dtype:  # the same parameters, computed in another dtype
            cfg = cfg.replace(dtype=dtype)
            graphdef = device.graphdef_of(cfg)
        if moe_impl is not None and moe_impl != cfg.moe_impl:
            cfg = cfg.replace(moe_impl=moe_impl)
            graphdef = device.graphdef_of(cfg)
        self.cfg, self.graphdef, self.state = cfg, graphdef, state
        self.decode_graphdef, self.decode_moe_impl = graphdef, cfg.moe_impl
        if moe_impl is None:
            impl = device.decode_moe_impl(cfg, int(num_slots))
            if impl != cfg.moe_impl:
                self.decode_graphdef = device.graphdef_of(cfg.replace(moe_impl=impl))
                self.decode_moe_impl = impl
        self.num_slots, self.chunk = int(num_slots), int(chunk)
        self.prefill_batch = int(prefill_batch or num_slots)
        self.cache_len, self.min_prompt_bucket, self.min_cache_bucket = cache_len, min_prompt_bucket, min_cache_bucket
        self.last_stats: dict = {}
        if prefill_chunk < 0 or prefill_chunk & (prefill_chunk - 1):
            raise ValueError(f"prefill_chunk={prefill_chunk}: 0 or a power of two")
        self.prefill_chunk = int(prefill_chunk)
        if record_routing is None:  # auto: record where there is routing to record
            record_routing = bool(cfg.num_experts)
        if record_routing and not cfg.num_experts:
            raise ValueError("record_routing: the model has no MoE layer")
        self.record_routing = bool(record_routing)

    @classmethod
    def from_model(cls, model: BailingMoeForCausalLM, **kw: Any) -> SamplingEngine:
        graphdef, state = nnx.split(model)
        return cls(graphdef, state, **kw)

    def update_params(self, state: nnx.State | dict[str, Any]) -> None:
        """Use ``state`` (same structure as at construction, e.g. the trainer's updated parameters) from now on."""
        self.state = state

    @staticmethod
    def compile_counts() -> dict[str, int]:
        """Compiled variants of each jitted function (one per shape bucket and model), over all engines."""
        return device.compile_counts()

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams] = SamplingParams(),
        *,
        key: int | jax.Array | np.ndarray = 0,
        state: nnx.State | dict[str, Any] | None = None,
        mode: str = "continuous",
        on_tokens: Callable[[int, int, list[int], bool], None] | None = None,
    ) -> list[Completion]:
        """Generate for every prompt (``params.n`` samples each).  Returns completions ordered by (prompt, sample);
        the call's counters are in ``last_stats`` afterwards.

        key: an int seed or a PRNG key; sample j of prompt i uses fold_in(fold_in(key, i), j), and its step-g draw
          fold_in(that, g), so results do not depend on batching or slot assignment.
        mode: "continuous" (refill a slot as soon as its sequence ends) or "static" (fill all slots, run until every
          row ends, repeat).
        on_tokens: optional callback ``(prompt_index, sample_index, new_token_ids, finished)`` after each chunk."""
        # the model's MoE block reads the rules when traced (sharding.active_rules): the engine's table, as placement
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext(), use_rules(self.rules):
            return self._run(
                prompts, params, key=key, state=self.state if state is None else state, mode=mode, on_tokens=on_tokens
            )

    def validate(self, prompts: list[list[int]], params_list: list[SamplingParams]) -> int:
        """Checks every request; returns the cache length S for this call."""
        cfg = self.cfg
        if not prompts:
            raise SamplingError("no prompts given")
        context = cfg.max_position_embeddings
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise SamplingError(f"prompt {i} is empty")
            if min(p) < 0 or max(p) >= cfg.vocab_size:
                raise SamplingError(f"prompt {i} has token ids outside [0, vocab_size={cfg.vocab_size})")
            if len(p) >= context:
                raise SamplingError(
                    f"prompt {i} has {len(p)} tokens: no room left in the context of {context} "
                    f"(max_position_embeddings)"
                )
        if self.cache_len is not None:
            s = self.cache_len
        else:
            need = max(
                device.prompt_bucket(len(p), self.min_prompt_bucket) + sp.max_new_tokens
                for p, sp in zip(prompts, params_list)
            )
            s = device.cache_bucket(need, context, self.min_cache_bucket)
        for i, p in enumerate(prompts):
            if len(p) >= s:
                raise SamplingError(f"prompt {i} has {len(p)} tokens: no room left in the cache of {s} slots")
        return s

    # -------------------------------------------------------------------------------------------- scheduling
    def _run(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams],
        *,
        key,
        state,
        mode: str,
        on_tokens,
    ) -> list[Completion]:
        if mode not in ("continuous", "static"):
            raise SamplingError(f"mode {mode!r}: 'continuous' or 'static'")
        prompts = [list(map(int, p)) for p in prompts]
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise SamplingError(f"{len(params_list)} SamplingParams for {len(prompts)} prompts")
        s = self.validate(prompts, params_list)
        b = self.num_slots
        stops = [
            tuple(dict.fromkeys((() if sp.ignore_eos else self.cfg.eos_ids) + tuple(sp.stop_token_ids)))
            for sp in params_list
        ]
        ns = device.stop_bucket(max(len(x) for x in stops))
        stop_rows = np.full((len(prompts), ns), -1, np.int32)
        for i, x in enumerate(stops):
            stop_rows[i, : len(x)] = x
        max_new = [min(sp.max_new_tokens, s - len(p)) for p, sp in zip(prompts, params_list)]
        filtered = any(sp.filtered for sp in params_list)
        base_key = _key_data(key)

        t0 = time.perf_counter()
        call = _Call(
            prompts=prompts,
            params=params_list,
            state=state,
            cache_len=s,
            num_stop=ns,
            stop_rows=stop_rows,
            max_new=max_new,
            base_key=base_key,
            ds=device.empty_state(self.cfg, b, s, ns, rules=self.rules),
            pending=collections.deque((i, j) for i, sp in enumerate(params_list) for j in range(sp.n)),
            slots=[None] * b,
        )
        stats = call.stats
        while call.pending or any(x is not None for x in call.slots):
            free = [i for i, x in enumerate(call.slots) if x is None]
            if call.pending and free and (mode == "continuous" or len(free) == b):
                ta = time.perf_counter()
                self._admit(call, free)
                jax.block_until_ready(call.ds)  # prefill + insert finish here, so decode_seconds times decode alone
                stats["admit_seconds"] += time.perf_counter() - ta
            n_active = sum(x is not None for x in call.slots)
            self._decode_chunk(call, n_active if (mode == "continuous" and call.pending) else 1, filtered, on_tokens)
        stats["seconds"] = time.perf_counter() - t0
        stats["cache_len"] = s
        self.last_stats = dict(stats)
        call.done.sort(key=lambda c: (c.prompt_index, c.sample_index))
        return call.done

    def _prefill_group(self, call: _Call, reqs: list[int]) -> None:
        """Prefill the distinct prompts ``reqs`` in one call; their cache rows wait in a new group."""
        prompts, stats = call.prompts, call.stats
        kb = pow2_bucket(len(reqs))
        pb = min(device.prompt_bucket(max(len(prompts[r]) for r in reqs), self.min_prompt_bucket), call.cache_len)
        toks = np.zeros((kb, pb), np.int32)
        lens = np.zeros((kb,), np.int32)
        for row, r in enumerate(reqs):
            toks[row, : len(prompts[r])] = prompts[r]
            lens[row] = len(prompts[r])
        # a [kb, pb] cache: insert copies these P positions
        cache, logits, *routing = device.prefill(
            self.graphdef,
            call.state,
            toks,
            lens,
            cache_len=pb,
            chunk=self.prefill_chunk,
            rules=self.rules,
            record_routing=self.record_routing,
        )
        gid = stats["prefill_calls"]
        call.groups[gid] = _Group(
            cache,
            logits,
            {r: row for row, r in enumerate(reqs)},
            sum(call.params[r].n for r in reqs),
            to_numpy(routing[0]) if routing else None,
        )
        for r in reqs:
            call.where[r] = gid
        stats["prefill_calls"] += 1
        stats["prefill_tokens"] += int(lens.sum())

    def _admit(self, call: _Call, free: list[int]) -> None:
        """Fill the ``free`` slots with the next waiting samples, prefilling the prompts not prefilled yet."""
        pending, where, b, ns = call.pending, call.where, self.num_slots, call.num_stop
        take = [pending.popleft() for _ in range(min(len(free), len(pending)))]
        new = list(dict.fromkeys(r for r, _ in take if r not in where))
        if new:  # prefill ahead: fill the last prefill batch with the next waiting prompts (fewer, larger calls)
            target = -(-len(new) // self.prefill_batch) * self.prefill_batch
            for r, _ in pending:
                if len(new) >= target:
                    break
                if r not in where and r not in new:
                    new.append(r)
        for k in range(0, len(new), self.prefill_batch):
            self._prefill_group(call, new[k : k + self.prefill_batch])
        by_group = collections.defaultdict(list)
        for (r, c), slot in zip(take, free):
            by_group[where[r]].append((r, c, slot))
            seq = _Seq(r, c, [], [], [])
            g = call.groups[where[r]]
            if g.routing is not None:  # the prompt's own positions of its prefill row
                seq.routes = [g.routing[g.rows[r], : len(call.prompts[r])]]
            call.slots[slot] = seq
        for gid, items in by_group.items():
            g = call.groups[gid]
            rb = pow2_bucket(len(items))
            arr = lambda dt, fill=0: np.full((rb,), fill, dt)  # noqa: B023 (called in this iteration)
            src, dst, lens, reqs, copies, mx = (
                arr(np.int32),
                arr(np.int32, b),
                arr(np.int32),
                arr(np.int32),
                arr(np.int32),
                arr(np.int32, 1),
            )
            temp, topp, topk = arr(np.float32, 1.0), arr(np.float32, 1.0), arr(np.int32)
            stop = np.full((rb, ns), -1, np.int32)
            for k, (r, c, slot) in enumerate(items):
                sp = call.params[r]
                src[k], dst[k], lens[k], reqs[k], copies[k], mx[k] = (
                    g.rows[r],
                    slot,
                    len(call.prompts[r]),
                    r,
                    c,
                    call.max_new[r],
                )
                temp[k], topp[k], topk[k], stop[k] = sp.temperature, sp.top_p, sp.top_k, call.stop_rows[r]
            call.ds = device.insert(
                call.ds,
                g.cache,
                g.logits,
                src,
                dst,
                lens,
                call.base_key,
                reqs,
                copies,
                mx,
                temp,
                topp,
                topk,
                stop,
                rules=self.rules,
            )
            g.remaining -= len(items)
            if g.remaining == 0:
                del call.groups[gid]
                for r in g.rows:
                    where.pop(r, None)
        call.stats["inserts"] += 1

    @staticmethod
    def _routing(seq: _Seq) -> np.ndarray:
        """[prompt + response tokens, L, k]: the recorded experts, the last response token's (never fed) -1."""
        r = np.concatenate(seq.routes)
        r[-1] = -1
        return r

    def _decode_chunk(
        self,
        call: _Call,
        min_active: int,
        filtered: bool,
        on_tokens: Callable[[int, int, list[int], bool], None] | None,
    ) -> None:
        """One decode call (up to ``chunk`` steps, fewer once under ``min_active`` rows are active); streams the new
        tokens and moves the finished sequences to ``call.done``, freeing their slots."""
        stats = call.stats
        td = time.perf_counter()
        call.ds, bt, bl, br, steps, *rt = device.decode(
            self.decode_graphdef,
            call.state,
            call.ds,
            np.int32(min_active),
            chunk=self.chunk,
            filtered=filtered,
            rules=self.rules,
            record_routing=self.record_routing,
        )
        ds = call.ds
        active, ngen, hit, bt, bl, br, steps, rt = to_numpy((ds.active, ds.ngen, ds.stop_hit, bt, bl, br, steps, rt))
        stats["decode_seconds"] += time.perf_counter() - td
        stats["decode_calls"] += 1
        stats["decode_steps"] += int(steps)
        stats["row_steps"] += int(steps) * self.num_slots
        for slot, seq in enumerate(call.slots):
            if seq is None:
                continue
            cnt = int(ngen[slot]) - len(seq.ids)
            seq.ids.extend(bt[slot, :cnt].tolist())
            seq.lps.extend(bl[slot, :cnt].tolist())
            seq.raws.extend(br[slot, :cnt].tolist())
            if rt:
                seq.routes.append(rt[0][slot, :cnt])
            finished = not bool(active[slot])
            if on_tokens is not None and (cnt or finished):
                on_tokens(seq.req, seq.copy, bt[slot, :cnt].tolist(), finished)
            if finished:
                call.done.append(
                    Completion(
                        seq.req,
                        seq.copy,
                        call.prompts[seq.req],
                        np.asarray(seq.ids, np.int32),
                        np.asarray(seq.lps, np.float32),
                        np.asarray(seq.raws, np.float32),
                        FINISH_STOP if bool(hit[slot]) else FINISH_LENGTH,
                        self._routing(seq) if rt else None,
                    )
                )
                stats["generated_tokens"] += len(seq.ids)
                call.slots[slot] = None
