"""One RL step: rollout on the live parameters -> rewards -> advantages -> selection -> packed rows -> reference
log-probabilities -> micro-batched update (ring_jax.train.step.make_train_step).

The sampling engine reads ``state.params`` (the trainer's own arrays, on the trainer's mesh): no copy, no host round
trip, so each rollout uses the weights of the previous update.  The sampler's per-token log-probabilities at
temperature 1 are the old-policy log-probabilities; the step logs how far the trainer's recomputed log-probabilities
drift from them (``logprob_drift``: mean |logp_trainer - logp_sampler| over trained tokens; both see the same
parameters, so this measures numerical sampler/trainer mismatch).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ring_jax.rewards import registry as rewards
from ring_jax.rl.advantages import binarize_rewards, group_advantages
from ring_jax.rl.batch import build_rows
from ring_jax.rl.losses import (PolicyLossConfig, chunked_token_logprobs, policy_loss_sum, token_logprobs,
                                token_weights)
from ring_jax.rl.selection import fixed_count, select_budget
from ring_jax.sampling.engine import SamplingEngine
from ring_jax.sampling.types import FINISH_STOP, SamplingParams
from ring_jax.train.losses import moe_aux_loss

RL_SUM_KEYS = ("expert_load", "kl_sum", "entropy_sum", "clip_count", "ratio_sum", "token_count", "drift_sum")


@dataclasses.dataclass(frozen=True)
class RLConfig:
    samples_per_prompt: int = 4  # K responses per prompt (Ring-lite: 16)
    aggregation: str = "c3po"  # c3po (fixed token budget) | seq_mean | token_mean (sample-level baselines)
    budget: int = 1024  # Phi: response tokens per optimiser step (c3po); Ring-lite: 409,600
    responses_per_step: int = 0  # baselines: responses per step (0 = the whole pool)
    selection_order: str = "random"  # see ring_jax.rl.selection
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seq_len: int = 256  # packed training row length
    num_micro: int = 1
    policy: PolicyLossConfig = PolicyLossConfig()
    alpha_bal: float = 1e-5
    alpha_z: float = 1e-7
    reward_timeout_s: float = 30.0
    # True: rewards are verdicts, 1.0 iff the verifier gives 1.0 (Ring-lite; see advantages.binarize_rewards);
    # a learned reward model's scores pass through
    binary_reward: bool = True
    num_slots: int = 16  # decode batch of the engine
    sampling_moe_impl: str | None = None  # e.g. "dense" for small decode batches (same parameters)
    # rows longer than this: token log-probabilities from logits made this many positions at a time (same values,
    # no [R, T, V] float32 buffer: 15 GiB per 32k-token row at V = 126k); 0 = always full logits
    logit_chunk: int = 1024


def policy_logprobs(model, tokens, positions, segment_ids, targets, logit_chunk: int = 0):
    """(log pi(targets) [B, T], entropy [B, T], model Output) -- from full float32 logits, or for rows longer than
    ``logit_chunk`` (> 0) from the final hidden states ``logit_chunk`` positions at a time (same values; no
    [B, T, V] buffer)."""
    if 0 < logit_chunk < tokens.shape[1]:
        out = model(tokens, positions, segment_ids, return_hidden=True, compute_logits=False)
        logp, ent = chunked_token_logprobs(out.hidden, model.head_weight(), targets, logit_chunk)
    else:
        out = model(tokens, positions, segment_ids)
        logp, ent = token_logprobs(out.logits, targets)
    return logp, ent, out


def rl_loss_fn(rl: RLConfig) -> Callable:
    """``loss_fn(model, mb) -> (sum_t w_t l_t, aux)`` for make_train_step; the step divides by the normaliser."""

    def loss_fn(model, mb):
        logp, ent, out = policy_logprobs(model, mb["tokens"], mb["positions"], mb["segment_ids"], mb["targets"],
                                         rl.logit_chunk)
        ref = mb.get("ref_logp")
        total, stats = policy_loss_sum(logp, ent, mb["old_logp"], mb["advantages"], mb["weights"], ref, rl.policy)
        trained = (mb["weights"] > 0).astype(jnp.float32)
        load = out.expert_load
        load = jnp.mean(load, axis=0) if load.shape[0] else jnp.zeros((load.shape[1],), jnp.float32)
        aux = {"aux_loss": moe_aux_loss(out, rl.alpha_bal, rl.alpha_z), "balance_loss": out.balance_loss,
               "z_loss": out.z_loss, "expert_load": load,
               "drift_sum": jnp.sum(trained * jnp.abs(logp - mb["old_logp"])), **stats}
        return total, aux

    return loss_fn


def make_ref_logp_fn(graphdef, logit_chunk: int = 0):
    """Jitted ``(ref_params, rows) -> log pi_ref(targets)`` [R, T] for the KL term."""

    @jax.jit
    def fn(params, tokens, positions, segment_ids, targets):
        model = nnx.merge(graphdef, params)
        return policy_logprobs(model, tokens, positions, segment_ids, targets, logit_chunk)[0]

    return fn


class RLStep:
    """``step(state, records) -> (state, metrics)``: one RL step on a list of prompt records (each with ``prompt``
    text or ``prompt_ids``, and ``task`` for the reward registry).  Pluggable into ring_jax.train.loop.train_loop."""

    def __init__(self, graphdef, train_step: Callable, rl: RLConfig, *, encode_prompt: Callable[[dict], Sequence[int]],
                 decode: Callable[[Sequence[int]], str], stop_ids: Sequence[int] = (), ref_params=None,
                 row_multiple: int = 1, seed: int = 0, to_device: Callable = lambda b: b):
        if rl.aggregation == "c3po" and rl.budget <= 0:
            raise ValueError("c3po needs a positive token budget")
        self.graphdef, self.train_step, self.rl = graphdef, train_step, rl
        self.encode_prompt, self.decode, self.stop_ids = encode_prompt, decode, tuple(stop_ids)
        self.ref_params = ref_params if rl.policy.beta else None  # beta = 0: no reference model in memory
        self.ref_fn = make_ref_logp_fn(graphdef, rl.logit_chunk) if self.ref_params is not None else None
        self.row_multiple, self.seed, self.to_device = row_multiple, seed, to_device
        self.calls = 0

    def rollout(self, params, prompts: list[list[int]], key: int):
        rl = self.rl
        engine = SamplingEngine(self.graphdef, params, num_slots=rl.num_slots, moe_impl=rl.sampling_moe_impl)
        sp = SamplingParams(temperature=rl.temperature, top_p=rl.top_p, max_new_tokens=rl.max_new_tokens,
                            n=rl.samples_per_prompt, stop_token_ids=self.stop_ids)
        return engine.generate(prompts, sp, key=key)

    def __call__(self, state, records: list[dict]):
        rl = self.rl
        self.calls += 1
        step_key = self.seed * 1_000_003 + int(jax.device_get(state.step))
        times = {}
        t0 = time.perf_counter()
        prompts = [list(map(int, self.encode_prompt(r))) for r in records]
        comps = self.rollout(state.params, prompts, step_key)
        times["rollout"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        texts = [self.decode([t for t in c.token_ids.tolist() if t not in self.stop_ids]) for c in comps]
        recs = [records[c.prompt_index] for c in comps]
        results, rstats = rewards.score_batch(recs, texts, timeout_s=rl.reward_timeout_s)
        reward = np.array([r.reward for r in results], np.float32)
        if rl.binary_reward:
            reward = binarize_rewards(reward, [r.get("task") for r in recs])
        adv = group_advantages(reward, [c.prompt_index for c in comps])
        lengths = np.array([len(c.token_ids) for c in comps])
        if rl.aggregation == "c3po":
            sel = select_budget(lengths, rl.budget, rl.selection_order, seed=step_key, advantages=adv)
        else:
            sel = fixed_count(lengths, rl.responses_per_step or len(comps), seed=step_key)
        w, normaliser = token_weights(rl.aggregation, sel.keep, rl.budget)
        rows, used_rows = build_rows([comps[i].prompt_ids for i in sel.index], [comps[i].token_ids for i in sel.index],
                                     [comps[i].raw_logprobs for i in sel.index], adv[sel.index], sel.keep, w,
                                     rl.seq_len, row_multiple=self.row_multiple * rl.num_micro)
        times["reward"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        batch = {k: rows[k] for k in ("tokens", "targets", "positions", "segment_ids", "weights", "old_logp",
                                      "advantages")}
        batch = self.to_device(batch)
        if self.ref_fn is not None:
            batch["ref_logp"] = self.ref_fn(self.ref_params, batch["tokens"], batch["positions"],
                                            batch["segment_ids"], batch["targets"])
            jax.block_until_ready(batch["ref_logp"])
        times["reference"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        state, m = self.train_step(state, batch, normaliser)
        m = jax.device_get(m)
        times["train"] = time.perf_counter() - t0

        n_tok = max(float(m["token_count"]), 1.0)
        metrics = {k: v for k, v in m.items() if k not in RL_SUM_KEYS or k == "expert_load"}
        metrics.update({
            "kl": float(m["kl_sum"]) / n_tok, "entropy": float(m["entropy_sum"]) / n_tok,
            "clip_frac": float(m["clip_count"]) / n_tok, "ratio_mean": float(m["ratio_sum"]) / n_tok,
            "logprob_drift": float(m["drift_sum"]) / n_tok,
            "tokens": float(sel.selected_tokens), "kept_tokens": float(sel.selected_tokens),
            "discarded_tokens": float(sel.discarded_tokens), "budget_shortfall": float(sel.shortfall),
            "responses_selected": float(len(sel.index)), "responses": float(len(comps)),
            "rows": float(len(rows["tokens"])), "rows_used": float(used_rows),
            "response_len_mean": float(lengths.mean()), "response_len_max": float(lengths.max()),
            "stop_frac": float(np.mean([c.finish_reason == FINISH_STOP for c in comps])),
            "reward_mean": float(reward.mean()), "normalizer": float(normaliser),
            "informative_responses": float(np.count_nonzero(adv)),
            "informative_selected": float(np.count_nonzero(adv[sel.index])),
        })
        metrics.update(rstats.to_dict())
        for k, v in times.items():
            metrics[f"time/{k}_s"] = v
        self.last_completions = comps
        self.last_texts = texts
        return state, metrics
