"""One RL step: rollout on the live parameters -> rewards -> advantages -> selection of N disjoint budgets ->
for each: packed rows -> reference log-probabilities -> micro-batched update (ring_jax.train.step.make_train_step).

The rollout (``RLStep(rollout=...)``, a :class:`ring_jax.rl.rollout.Rollout`; by default the sampling engine) reads
``state.params`` (the trainer's own arrays, on the trainer's mesh): no copy, no host round trip, so each rollout uses
the weights of the previous update.  The sampler's per-token log-probabilities at temperature 1 are pi_old, the policy
that sampled.  With ``updates_per_rollout = N > 1`` the pool feeds N optimiser updates, each on its own budget of Phi
tokens (``selection.select_budgets``), so from the second update on the trained policy differs from pi_old and the PPO
clip acts (Ring-lite trains several mini-batches per rollout batch).

Off-policy correction: at temperature != 1 or with top-p / top-k the rollout samples another distribution q than
pi_old; each trained token then carries the truncated importance weight min(pi_old / q, C) (``losses.tis_weights``,
``tis_cap``, over the trained tokens only; its statistics are logged under ``tis/``).

The trainer / sampler mismatch (``ring_jax.rl.mismatch``): the rollout may compute in another dtype
(``rollout_dtype``: bfloat16 rollouts beside a float32 trainer) and, in a MoE, route tokens to other experts.  Before
the first update, one no-gradient forward of the trainer at the rollout parameters gives pi_train of every selected
token: the ``mismatch/*`` metrics compare it with the sampler's pi_infer every step; ``old_logp="trainer"`` makes it
pi_old (TIS then corrects it to q, so the numerical mismatch is corrected too); ``icepop=(low, high)`` drops the
policy-gradient term of tokens whose pi_train / pi_infer leaves the band.  ``routing_replay``: the engine records
each token's experts (``Completion.routing``) and every training forward of the step (the pi_train pass and the
updates) routes by them, so the trainer's MoE sees what the sampler's did.  ``logprob_drift`` is mean
|logp_trainer - logp_pi_old| over the first update's tokens, where both see the same parameters.

Failing rewards (the reward function raised, timed out or returned NaN) are not policy failures: such responses are
left out of their group's statistics and out of every budget, counted per task (``reward_failed/<task>``) and the
first error of each kind is logged; past ``max_reward_fail_frac`` of a rollout the step raises
:class:`RewardFailureError` without touching the state.  An update whose selected responses all have advantage 0
carries no policy-gradient signal (only the KL, entropy and MoE aux terms): it is skipped (``skip_no_signal``),
counted, and the state's step counter still advances, so the next rollout draws new samples.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from ring_jax.rewards import registry as rewards
from ring_jax.rl.advantages import binarize_rewards, group_advantages
from ring_jax.rl.batch import build_rows
from ring_jax.rl.losses import (
    TIS_LEVELS,
    PolicyLossConfig,
    chunked_token_logprobs,
    policy_loss_sum,
    tis_weights,
    token_logprobs,
    token_weights,
)
from ring_jax.rl.mismatch import (
    OLD_LOGP,
    icepop_mask,
    old_logprobs,
    parse_icepop,
)
from ring_jax.rl.rollout import EngineRollout, Rollout
from ring_jax.rl.selection import fixed_count, select_budgets
from ring_jax.rl.step_metrics import RL_MAX_KEYS, RL_SUM_KEYS, step_metrics
from ring_jax.sampling.types import Completion, SamplingParams
from ring_jax.train.loop import StepAborted
from ring_jax.train.losses import moe_aux_loss

if TYPE_CHECKING:
    import optax

    from ring_jax.model.transformer import BailingMoeForCausalLM, Output
    from ring_jax.train.step import TrainState

ROLLOUT_DTYPES = (None, "float32", "bfloat16", "float16")


class RewardFailureError(StepAborted):
    """Too many responses of one rollout could not be scored (their reward function raised, timed out or returned
    a non-finite value)."""


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
    updates_per_rollout: int = 1  # optimiser updates per rollout, each on its own budget of Phi tokens
    tis_cap: float = 2.0  # C of the truncated importance weight min(pi_old / q_sampler, C); <= 0: no correction
    tis_level: str = "token"  # token | sequence (see losses.tis_weights)
    skip_no_signal: bool = True  # skip an update whose selected responses all have advantage 0
    max_reward_fail_frac: float = 0.1  # abort when a larger fraction of a rollout's rewards fail
    # the sampler's compute dtype, from the same parameters (None: the trainer's ModelConfig.dtype)
    rollout_dtype: str | None = None
    old_logp: str = "sampler"  # pi_old: the sampler's T=1 log-probs, or the trainer's at the rollout parameters
    icepop: tuple[float, float] | None = None  # (low, high): no policy gradient where pi_train / pi_infer is outside
    routing_replay: bool = False  # the training forward routes each token to the experts the sampler used

    def __post_init__(self):
        if self.updates_per_rollout < 1:
            raise ValueError(f"updates_per_rollout must be >= 1, got {self.updates_per_rollout}")
        if self.samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        if self.tis_level not in TIS_LEVELS:
            raise ValueError(f"tis_level {self.tis_level!r}: one of {TIS_LEVELS}")
        if not 0.0 <= self.max_reward_fail_frac <= 1.0:
            raise ValueError(f"max_reward_fail_frac must be in [0, 1], got {self.max_reward_fail_frac}")
        if self.old_logp not in OLD_LOGP:
            raise ValueError(f"old_logp {self.old_logp!r}: one of {OLD_LOGP}")
        if self.rollout_dtype not in ROLLOUT_DTYPES:
            raise ValueError(f"rollout_dtype {self.rollout_dtype!r}: one of {ROLLOUT_DTYPES[1:]} (or None)")
        object.__setattr__(self, "icepop", parse_icepop(self.icepop))


def policy_logprobs(
    model: BailingMoeForCausalLM,
    tokens: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array,
    targets: jax.Array,
    logit_chunk: int = 0,
    routing: jax.Array | None = None,
    return_routing: bool = False,
) -> tuple[jax.Array, jax.Array, Output]:
    """(log pi(targets) [B, T], entropy [B, T], model Output) -- from full float32 logits, or for rows longer than
    ``logit_chunk`` (> 0) from the final hidden states ``logit_chunk`` positions at a time (same values; no
    [B, T, V] buffer).  ``routing`` [B, T, L, k]: replay those experts; ``return_routing``: the router's own choice
    in ``Output.routing``."""
    kw = {"routing": routing, "return_routing": return_routing}
    if 0 < logit_chunk < tokens.shape[1]:
        out = model(tokens, positions, segment_ids, return_hidden=True, compute_logits=False, **kw)
        logp, ent = chunked_token_logprobs(out.hidden, model.head_weight(), targets, logit_chunk)
    else:
        out = model(tokens, positions, segment_ids, **kw)
        logp, ent = token_logprobs(out.logits, targets)
    return logp, ent, out


def rl_loss_fn(rl: RLConfig) -> Callable:
    """``loss_fn(model, mb) -> (sum_t w_t l_t, aux)`` for make_train_step; the step divides by the normaliser."""

    def loss_fn(model, mb):
        replay = mb.get("routing") if rl.routing_replay else None
        logp, ent, out = policy_logprobs(
            model, mb["tokens"], mb["positions"], mb["segment_ids"], mb["targets"], rl.logit_chunk, replay
        )
        ref = mb.get("ref_logp")
        total, stats = policy_loss_sum(
            logp,
            ent,
            mb["old_logp"],
            mb["advantages"],
            mb["weights"],
            ref,
            rl.policy,
            tis=mb.get("tis"),
            pg_mask=mb.get("pg_mask"),
        )
        trained = (mb["weights"] > 0).astype(jnp.float32)
        load = out.expert_load
        load = jnp.mean(load, axis=0) if load.shape[0] else jnp.zeros((load.shape[1],), jnp.float32)
        aux = {
            "aux_loss": moe_aux_loss(out, rl.alpha_bal, rl.alpha_z),
            "balance_loss": out.balance_loss,
            "z_loss": out.z_loss,
            "expert_load": load,
            "drift_sum": jnp.sum(trained * jnp.abs(logp - mb["old_logp"])),
            **stats,
        }
        return total, aux

    return loss_fn


def make_rl_train_step(
    graphdef: nnx.GraphDef,
    rl: RLConfig,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    shardings: TrainState,
    *,
    schedule: Callable | None = None,
    num_micro: int | None = None,
    **kw: Any,
) -> Callable:
    """``make_train_step`` with the RL loss and the RL statistics' reductions (sums over micro-batches for the
    ``RL_SUM_KEYS``, maxima for ``RL_MAX_KEYS``); ``num_micro`` defaults to ``rl.num_micro``."""
    from ring_jax.train.step import make_train_step

    return make_train_step(
        graphdef,
        rl_loss_fn(rl),
        optimizer,
        mesh,
        shardings,
        rl.num_micro if num_micro is None else num_micro,
        schedule=schedule,
        sum_aux_keys=RL_SUM_KEYS,
        max_aux_keys=RL_MAX_KEYS,
        **kw,
    )


def make_ref_logp_fn(graphdef: nnx.GraphDef, logit_chunk: int = 0) -> Callable[..., jax.Array]:
    """Jitted ``(ref_params, rows) -> log pi_ref(targets)`` [R, T] for the KL term (the reference routes by its own
    router: it is pi_ref, not the replayed policy)."""

    @jax.jit
    def fn(params, tokens, positions, segment_ids, targets):
        model = nnx.merge(graphdef, params)
        return policy_logprobs(model, tokens, positions, segment_ids, targets, logit_chunk)[0]

    return fn


def make_trainer_logp_fn(graphdef: nnx.GraphDef, logit_chunk: int = 0) -> Callable[..., tuple]:
    """Jitted ``(params, tokens, positions, segment_ids, targets, routing=None, *, with_routing) -> (log pi_train
    (targets) [R, T], the router's own experts [R, T, L, k] or None)``: the trainer's forward, no gradient, at the
    parameters the rollout used; ``routing`` replays recorded experts (None: the trainer routes itself)."""

    @functools.partial(jax.jit, static_argnames=("with_routing",))
    def fn(params, tokens, positions, segment_ids, targets, routing=None, *, with_routing):
        model = nnx.merge(graphdef, params)
        logp, _, out = policy_logprobs(
            model, tokens, positions, segment_ids, targets, logit_chunk, routing, return_routing=with_routing
        )
        return logp, out.routing

    return fn


def host_array(x: jax.Array | None) -> np.ndarray | None:
    """A global array on every process's host (``process_allgather`` across processes: a sharded array of a
    multi-process mesh cannot be read with ``np.asarray``)."""
    if x is None:
        return None
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


class RLStep:
    """``step(state, records) -> (state, metrics)``: one RL step (one rollout, ``updates_per_rollout`` optimiser
    updates) on a list of prompt records (each with ``prompt`` text or ``prompt_ids``, and ``task`` for the reward
    registry).  Pluggable into ring_jax.train.loop.train_loop.

    Metrics: per update u (1-based) ``update/<u>/{loss, grad_norm, clip_frac, ratio_mean, ratio_max, approx_kl, kl,
    tokens, skipped_no_signal}``; the unprefixed ``loss``, ``grad_norm`` are means over the updates that ran, the
    token statistics (``clip_frac``, ``ratio_mean``, ``approx_kl``, ``kl``, ``entropy``) are over all their tokens,
    ``ratio_max`` the largest; ``tokens`` / ``kept_tokens`` / ``budget_shortfall`` add up over the updates; the
    trainer / sampler mismatch over every selected response token, also of a budget then skipped for lack of signal
    (``ring_jax.rl.mismatch``: ``mismatch/*``, ``icepop/masked_frac``).

    Before the first update, one forward of the trainer at the rollout parameters (no gradient) gives pi_train of
    every selected token (``time/trainer_logp_s``): the mismatch metrics, pi_old when
    ``rl.old_logp == "trainer"``, and the IcePop mask come from it."""

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        train_step: Callable,
        rl: RLConfig,
        *,
        encode_prompt: Callable[[dict], Sequence[int]],
        decode: Callable[[Sequence[int]], str],
        stop_ids: Sequence[int] = (),
        ref_params: dict[str, Any] | None = None,
        row_multiple: int = 1,
        seed: int = 0,
        to_device: Callable = lambda b: b,
        rollout: Rollout | None = None,
    ):
        if rl.aggregation == "c3po" and rl.budget <= 0:
            raise ValueError("c3po needs a positive token budget")
        if rl.policy.beta and ref_params is None:
            raise ValueError(
                f"beta={rl.policy.beta} needs the KL reference's parameters (ref_params); pass them, or beta=0 for no "
                "KL term"
            )
        self.graphdef, self.train_step, self.rl = graphdef, train_step, rl
        # the sampler (default: the sampling engine, ``rl.num_slots`` rows, ``rl.sampling_moe_impl``,
        # ``rl.rollout_dtype``, recording the routing of a MoE model)
        self.sampler: Rollout = (
            rollout
            if rollout is not None
            else EngineRollout(graphdef, num_slots=rl.num_slots, moe_impl=rl.sampling_moe_impl, dtype=rl.rollout_dtype)
        )
        self.encode_prompt, self.decode, self.stop_ids = encode_prompt, decode, tuple(stop_ids)
        self.ref_params = ref_params if rl.policy.beta else None  # beta = 0: no reference model in memory
        self.ref_fn = make_ref_logp_fn(graphdef, rl.logit_chunk) if self.ref_params is not None else None
        self.trainer_fn = make_trainer_logp_fn(graphdef, rl.logit_chunk)
        self.row_multiple, self.seed, self.to_device = row_multiple, seed, to_device
        self.calls = 0
        self._errors_logged: set = set()

    def rollout(self, params: dict[str, Any], prompts: list[list[int]], key: int) -> list[Completion]:
        """``samples_per_prompt`` responses per prompt from ``params`` at the config's temperature / top-p."""
        rl = self.rl
        sp = SamplingParams(
            temperature=rl.temperature,
            top_p=rl.top_p,
            max_new_tokens=rl.max_new_tokens,
            n=rl.samples_per_prompt,
            stop_token_ids=self.stop_ids,
        )
        return self.sampler.generate(params, prompts, sp, key)

    # -------------------------------------------------------------------------------------------- rewards
    def score(self, recs: list[dict], texts: list[str]) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        """(rewards [N] float32, valid [N] bool, reward metrics): failed rewards are counted per task, the first
        error of each (task, kind) is logged, and past ``max_reward_fail_frac`` :class:`RewardFailureError`."""
        rl = self.rl
        results, rstats = rewards.score_batch(recs, texts, timeout_s=rl.reward_timeout_s)
        valid = np.array([r.ok for r in results], bool)
        tasks = [r.get("task") if isinstance(r, dict) else None for r in recs]
        failed_by_task: dict = {}
        for res, task in zip(results, tasks):
            if res.ok:
                continue
            failed_by_task[task] = failed_by_task.get(task, 0) + 1
            kind = "timeout" if res.timed_out else res.error.split(":", 1)[0]
            if (task, kind) not in self._errors_logged:
                self._errors_logged.add((task, kind))
                logging.warning(
                    "reward for task %r failed (%s); such responses are left out of their group and "
                    "the budget (first of its kind, later ones only counted)",
                    task,
                    res.error,
                )
        reward = np.array([r.reward for r in results], np.float32)
        if rl.binary_reward:
            reward = binarize_rewards(reward, tasks)
        metrics = rstats.to_dict()
        metrics["reward_failed"] = float((~valid).sum())
        for task, n in failed_by_task.items():
            metrics[f"reward_failed/{task}"] = float(n)
        frac = float((~valid).mean()) if len(valid) else 0.0
        if frac > rl.max_reward_fail_frac:
            detail = ", ".join(f"{t}: {n}" for t, n in sorted(failed_by_task.items(), key=str))
            first = next(r.error for r in results if not r.ok)
            raise RewardFailureError(
                f"{int((~valid).sum())} of {len(valid)} rewards of this rollout failed ({detail}; "
                f"first error: {first}), more than max_reward_fail_frac="
                f"{rl.max_reward_fail_frac}"
            )
        return reward, valid, metrics

    # -------------------------------------------------------------------------------------------- one update
    def _plan(self, comps: list[Completion], sel, adv: np.ndarray, params) -> dict:
        """Rows of one update (sampler fields only) and the trainer's forward over them at ``params`` (the rollout's),
        started on device (not fetched)."""
        rl = self.rl
        have_routing = all(comps[i].routing is not None for i in sel.index)
        if rl.routing_replay and not have_routing:
            raise ValueError("routing_replay: the rollout recorded no routing (SamplingEngine(record_routing=True))")
        rows, used_rows, index = build_rows(
            [comps[i].prompt_ids for i in sel.index],
            [comps[i].token_ids for i in sel.index],
            [comps[i].raw_logprobs for i in sel.index],
            adv[sel.index],
            sel.keep,
            np.ones(len(sel.index)),
            rl.seq_len,
            row_multiple=self.row_multiple * rl.num_micro,
            routing=[comps[i].routing for i in sel.index] if have_routing else None,
            return_index=True,
        )
        keys = ("tokens", "targets", "positions", "segment_ids") + (("routing",) if rl.routing_replay else ())
        dev = self.to_device({k: rows[k] for k in keys})
        trainer = self.trainer_fn(
            params,
            dev["tokens"],
            dev["positions"],
            dev["segment_ids"],
            dev["targets"],
            dev.get("routing"),
            with_routing=have_routing,
        )
        return {"sel": sel, "rows": rows, "index": index, "used_rows": used_rows, "dev": dev, "trainer": trainer}

    def _finish(self, plan: dict, comps: list[Completion], tok: dict) -> None:
        """With pi_train fetched (``plan["trainer"]`` on the host): pi_old, TIS weights over the trained tokens,
        the IcePop mask and the loss weights written into the plan's rows, its normaliser set; per-token arrays of
        the step appended to ``tok`` for the metrics."""
        rl, rows, sel = self.rl, plan["rows"], plan["sel"]
        train_rows, own_rows = plan["trainer"]
        masks, per = [], []
        for j, (i, k) in enumerate(zip(sel.index, sel.keep)):
            r, t = plan["index"][j]
            train = train_rows[r, t]
            raw, q = comps[i].raw_logprobs[:k], comps[i].logprobs[:k]
            old = old_logprobs(rl.old_logp, raw, train)
            # TIS over the trained tokens only (a sequence-level weight is the product over the kept prefix)
            w_is, cut = tis_weights(old, q, rl.tis_cap, rl.tis_level)
            mask = icepop_mask(train, raw, rl.icepop)
            rows["old_logp"][r, t], rows["tis"][r, t], rows["pg_mask"][r, t] = old, w_is, mask
            masks.append(mask)
            per.append((r, t))
            for key, v in (("train", train), ("infer", raw), ("tis", w_is), ("cut", cut), ("mask", mask)):
                tok[key].append(np.asarray(v))
        # masked tokens leave the normaliser of a token-count aggregation (token_mean; seq_mean's per-response
        # lengths); c3po's normaliser is the budget Phi whatever is masked
        counts = np.array([m.sum() for m in masks]) if rl.icepop else np.asarray(sel.keep)
        w, normaliser = token_weights(rl.aggregation, counts, rl.budget)
        for (r, t), wj in zip(per, w):
            rows["weights"][r, t] = wj
        plan["normaliser"] = normaliser
        if own_rows is not None:
            tok["routing"].append((own_rows, rows["routing"]))

    def _batch(self, plan: dict) -> tuple[dict, float, int, int]:
        """The update's device batch (the plan's rows, the reference log-probs when beta > 0)."""
        rows = plan["rows"]
        batch = dict(plan["dev"])
        batch.update(self.to_device({k: rows[k] for k in ("weights", "old_logp", "advantages", "tis", "pg_mask")}))
        if self.ref_fn is not None:
            batch["ref_logp"] = self.ref_fn(
                self.ref_params, batch["tokens"], batch["positions"], batch["segment_ids"], batch["targets"]
            )
            jax.block_until_ready(batch["ref_logp"])
        return batch, plan["normaliser"], len(rows["tokens"]), plan["used_rows"]

    @staticmethod
    def _skip(state):
        """The state after a skipped update: parameters and optimizer untouched, one more step taken and skipped
        (as the non-finite guard counts its skips), so the schedule and the next rollout's key move on."""
        return state._replace(step=state.step + 1, skipped=state.skipped + 1)

    def __call__(self, state, records: list[dict]):
        rl = self.rl
        self.calls += 1
        step_key = self.seed * 1_000_003 + int(jax.device_get(state.step))
        times = {"reference": 0.0, "train": 0.0}
        t0 = time.perf_counter()
        prompts = [list(map(int, self.encode_prompt(r))) for r in records]
        comps = self.rollout(state.params, prompts, step_key)
        times["rollout"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        texts = [self.decode([t for t in c.token_ids.tolist() if t not in self.stop_ids]) for c in comps]
        recs = [records[c.prompt_index] for c in comps]
        reward, valid, reward_metrics = self.score(recs, texts)
        adv = group_advantages(reward, [c.prompt_index for c in comps], valid=valid)
        lengths = np.array([len(c.token_ids) for c in comps])
        n_upd = rl.updates_per_rollout
        if rl.aggregation == "c3po":
            sels = select_budgets(
                lengths, rl.budget, n_upd, rl.selection_order, seed=step_key, advantages=adv, eligible=valid
            )
        else:
            per = rl.responses_per_step or max(int(valid.sum()) // n_upd, 1)
            sels = fixed_count(lengths, per, seed=step_key, parts=n_upd, eligible=valid)
        times["reward"] = time.perf_counter() - t0

        # every budget's rows and the trainer's log-probabilities over them at the rollout parameters, before the
        # first update changes (and donates) them; a budget without signal is measured too (the mismatch is the
        # rollout's), then skipped
        t0 = time.perf_counter()
        plans = [None if len(sel.index) == 0 else self._plan(comps, sel, adv, state.params) for sel in sels]
        skip = [p is None or (rl.skip_no_signal and not np.any(adv[p["sel"].index] != 0)) for p in plans]
        tok: dict = {k: [] for k in ("train", "infer", "tis", "cut", "mask", "routing")}
        for plan in plans:
            if plan is not None:
                plan["trainer"] = tuple(host_array(x) for x in plan["trainer"])
                self._finish(plan, comps, tok)
        times["trainer_logp"] = time.perf_counter() - t0

        ups = []
        for sel, plan, skipped in zip(sels, plans, skip):
            if skipped:
                state = self._skip(state)
                ups.append({"sel": sel, "m": None})
                continue
            t0 = time.perf_counter()
            batch, normaliser, n_rows, used_rows = self._batch(plan)
            times["reference"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            state, m = self.train_step(state, batch, normaliser)
            m = jax.device_get(m)
            times["train"] += time.perf_counter() - t0
            ups.append({"sel": sel, "m": m, "normaliser": normaliser, "rows": n_rows, "rows_used": used_rows})
        metrics = step_metrics(rl, ups, comps, lengths, reward, adv, valid, tok)
        metrics.update(reward_metrics)
        for k, v in times.items():
            metrics[f"time/{k}_s"] = v
        self.last_completions = comps
        self.last_texts = texts
        self.last_selections = sels
        return state, metrics
