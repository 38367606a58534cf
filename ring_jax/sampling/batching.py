"""Host-side scheduling: continuous batching (a freed slot is refilled by the next waiting sample before the next
decode chunk) and static batching (fill every slot, run until all rows end, repeat), over the same device functions.

Each distinct prompt is prefilled once; its cache row stays on device until all of its ``n`` samples have been
copied into slots (possibly across several refills).
"""

from __future__ import annotations

import collections
import dataclasses
import time

import jax
import numpy as np

from ring_jax.sampling.engine import SamplingEngine, to_numpy
from ring_jax.sampling.types import (FINISH_LENGTH, FINISH_STOP, Completion, SamplingError, SamplingParams,
                                     pow2_bucket)


@dataclasses.dataclass
class _Seq:
    req: int
    copy: int
    ids: list
    lps: list
    raws: list


@dataclasses.dataclass
class _Group:
    cache: object
    logits: object
    rows: dict  # prompt index -> row in this prefill batch
    remaining: int  # samples of these prompts not yet placed in a slot


def _key_data(key) -> np.ndarray:
    if isinstance(key, (int, np.integer)):
        key = jax.random.key(int(key))
    elif not jax.dtypes.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)  # a raw uint32[2] (jax.random.PRNGKey) key
    return to_numpy(jax.random.key_data(key)).astype(np.uint32)


def validate(engine: SamplingEngine, prompts, params_list) -> int:
    """Checks every request; returns the cache length S for this call."""
    cfg = engine.cfg
    if not prompts:
        raise SamplingError("no prompts given")
    context = cfg.max_position_embeddings
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise SamplingError(f"prompt {i} is empty")
        if min(p) < 0 or max(p) >= cfg.vocab_size:
            raise SamplingError(f"prompt {i} has token ids outside [0, vocab_size={cfg.vocab_size})")
        if len(p) >= context:
            raise SamplingError(f"prompt {i} has {len(p)} tokens: no room left in the context of {context} "
                                f"(max_position_embeddings)")
    if engine.cache_len is not None:
        s = engine.cache_len
    else:
        need = max(pow2_bucket(len(p), engine.min_prompt_bucket) + sp.max_new_tokens
                   for p, sp in zip(prompts, params_list))
        s = min(pow2_bucket(need, engine.min_cache_bucket), context)
    for i, p in enumerate(prompts):
        if len(p) >= s:
            raise SamplingError(f"prompt {i} has {len(p)} tokens: no room left in the cache of {s} slots")
    return s


def run(engine: SamplingEngine, prompts, params, *, key, state, mode, on_tokens) -> list[Completion]:
    if mode not in ("continuous", "static"):
        raise SamplingError(f"mode {mode!r}: 'continuous' or 'static'")
    prompts = [list(map(int, p)) for p in prompts]
    params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
    if len(params_list) != len(prompts):
        raise SamplingError(f"{len(params_list)} SamplingParams for {len(prompts)} prompts")
    cfg = engine.cfg
    s = validate(engine, prompts, params_list)
    b = engine.num_slots
    stops = [tuple(dict.fromkeys((() if sp.ignore_eos else cfg.eos_ids) + tuple(sp.stop_token_ids)))
             for sp in params_list]
    ns = pow2_bucket(max(len(x) for x in stops), 8)
    stop_rows = np.full((len(prompts), ns), -1, np.int32)
    for i, x in enumerate(stops):
        stop_rows[i, :len(x)] = x
    max_new = [min(sp.max_new_tokens, s - len(p)) for p, sp in zip(prompts, params_list)]
    filtered = any(sp.filtered for sp in params_list)
    base_key = _key_data(key)

    t0 = time.perf_counter()
    stats = collections.Counter()
    ds = engine._empty(b, s, ns)
    pending = collections.deque((i, j) for i, sp in enumerate(params_list) for j in range(sp.n))
    slots: list[_Seq | None] = [None] * b
    groups: dict[int, _Group] = {}
    where: dict[int, int] = {}  # prompt index -> group id
    done: list[Completion] = []

    def prefill(reqs):
        kb = pow2_bucket(len(reqs))
        pb = min(pow2_bucket(max(len(prompts[r]) for r in reqs), engine.min_prompt_bucket), s)
        toks = np.zeros((kb, pb), np.int32)
        lens = np.zeros((kb,), np.int32)
        for row, r in enumerate(reqs):
            toks[row, :len(prompts[r])] = prompts[r]
            lens[row] = len(prompts[r])
        cache, logits = engine._prefill(state, toks, lens, cache_len=pb)  # insert copies these P positions
        gid = stats["prefill_calls"]
        groups[gid] = _Group(cache, logits, {r: row for row, r in enumerate(reqs)},
                             sum(params_list[r].n for r in reqs))
        for r in reqs:
            where[r] = gid
        stats["prefill_calls"] += 1
        stats["prefill_tokens"] += int(lens.sum())

    def admit(free):
        nonlocal ds
        take = [pending.popleft() for _ in range(min(len(free), len(pending)))]
        new = list(dict.fromkeys(r for r, _ in take if r not in where))
        if new:  # prefill ahead: fill the last prefill batch with the next waiting prompts (fewer, larger calls)
            target = -(-len(new) // engine.prefill_batch) * engine.prefill_batch
            for r, _ in pending:
                if len(new) >= target:
                    break
                if r not in where and r not in new:
                    new.append(r)
        for k in range(0, len(new), engine.prefill_batch):
            prefill(new[k:k + engine.prefill_batch])
        by_group = collections.defaultdict(list)
        for (r, c), slot in zip(take, free):
            by_group[where[r]].append((r, c, slot))
            slots[slot] = _Seq(r, c, [], [], [])
        for gid, items in by_group.items():
            g = groups[gid]
            rb = pow2_bucket(len(items))
            arr = lambda dt, fill=0: np.full((rb,), fill, dt)  # noqa: E731
            src, dst, lens, reqs, copies, mx = (arr(np.int32), arr(np.int32, b), arr(np.int32), arr(np.int32),
                                                arr(np.int32), arr(np.int32, 1))
            temp, topp, topk = arr(np.float32, 1.0), arr(np.float32, 1.0), arr(np.int32)
            stop = np.full((rb, ns), -1, np.int32)
            for k, (r, c, slot) in enumerate(items):
                sp = params_list[r]
                src[k], dst[k], lens[k], reqs[k], copies[k], mx[k] = g.rows[r], slot, len(prompts[r]), r, c, max_new[r]
                temp[k], topp[k], topk[k], stop[k] = sp.temperature, sp.top_p, sp.top_k, stop_rows[r]
            ds = engine._insert(ds, g.cache, g.logits, src, dst, lens, base_key, reqs, copies, mx, temp, topp, topk,
                                stop)
            g.remaining -= len(items)
            if g.remaining == 0:
                del groups[gid]
                for r in g.rows:
                    where.pop(r, None)
        stats["inserts"] += 1

    while pending or any(x is not None for x in slots):
        free = [i for i, x in enumerate(slots) if x is None]
        if pending and free and (mode == "continuous" or len(free) == b):
            ta = time.perf_counter()
            admit(free)
            jax.block_until_ready(ds)  # prefill + insert finish here, so decode_seconds times decode alone
            stats["admit_seconds"] += time.perf_counter() - ta
        n_active = sum(x is not None for x in slots)
        min_active = n_active if (mode == "continuous" and pending) else 1
        td = time.perf_counter()
        ds, bt, bl, br, steps = engine._decode(state, ds, np.int32(min_active), chunk=engine.chunk,
                                               filtered=filtered)
        active, ngen, hit, bt, bl, br, steps = to_numpy((ds.active, ds.ngen, ds.stop_hit, bt, bl, br, steps))
        stats["decode_seconds"] += time.perf_counter() - td
        stats["decode_calls"] += 1
        stats["decode_steps"] += int(steps)
        stats["row_steps"] += int(steps) * b
        for slot, seq in enumerate(slots):
            if seq is None:
                continue
            cnt = int(ngen[slot]) - len(seq.ids)
            seq.ids.extend(bt[slot, :cnt].tolist())
            seq.lps.extend(bl[slot, :cnt].tolist())
            seq.raws.extend(br[slot, :cnt].tolist())
            finished = not bool(active[slot])
            if on_tokens is not None and (cnt or finished):
                on_tokens(seq.req, seq.copy, bt[slot, :cnt].tolist(), finished)
            if finished:
                done.append(Completion(seq.req, seq.copy, prompts[seq.req], np.asarray(seq.ids, np.int32),
                                       np.asarray(seq.lps, np.float32), np.asarray(seq.raws, np.float32),
                                       FINISH_STOP if bool(hit[slot]) else FINISH_LENGTH))
                stats["generated_tokens"] += len(seq.ids)
                slots[slot] = None
    stats["seconds"] = time.perf_counter() - t0
    stats["cache_len"] = s
    engine.last_stats = dict(stats)
    done.sort(key=lambda c: (c.prompt_index, c.sample_index))
    return done


__all__ = ["run", "validate", "SamplingParams"]
