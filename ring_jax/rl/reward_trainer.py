"""Bradley-Terry training of a learned reward model (``ring_jax.rl.reward_model.LearnedRewardModel``).

`RewardModelTrainer` runs Bradley-Terry steps (``loss = mean over pairs of -log sigmoid(r_chosen - r_rejected)``,
plus the MoE balance / z losses) through the project's train step (``ring_jax.train.step.make_train_step``:
micro-batching, non-finite guard, explicit shardings), with any optax optimizer; it feeds host batches straight to
the train step (one process).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ring_jax.rl.reward_model import LearnedRewardModel, RewardModelError, pad_rows
from ring_jax.train.step import (
    TrainState,
    abstract_train_state,
    create_train_state,
    make_train_step,
    train_state_shardings,
)


def bradley_terry_loss_fn(alpha_bal: float = 0.0, alpha_z: float = 0.0) -> Callable:
    """``loss_fn(model, batch) -> (loss_sum, aux)`` for ``make_train_step``.

    ``batch``: ``tokens`` / ``segment_ids`` [P, 2, T] (pair p: row 0 chosen, row 1 rejected), ``last_idx`` [P, 2],
    ``loss_mask`` [P] (1 = a real pair, 0 = padding).  ``loss_sum = sum_p mask_p * softplus(r_rejected - r_chosen)``
    (= -log sigmoid(r_chosen - r_rejected)); the step divides it by the number of real pairs.  Pairs stay whole in
    every micro-batch (rows of the batch are pairs)."""

    def loss_fn(model, batch):
        p, two, t = batch["tokens"].shape
        out = model(
            batch["tokens"].reshape(p * two, t),
            batch["segment_ids"].reshape(p * two, t),
            batch["last_idx"].reshape(p * two),
        )
        r = out.scores.reshape(p, two)
        margin = r[:, 0] - r[:, 1]
        w = batch["loss_mask"].astype(jnp.float32)
        loss_sum = jnp.sum(w * jax.nn.softplus(-margin))
        aux = {
            "aux_loss": alpha_bal * out.balance_loss + alpha_z * out.z_loss,
            "balance_loss": out.balance_loss,
            "z_loss": out.z_loss,
            "pairs": jnp.sum(w),
            "correct": jnp.sum(w * (margin > 0)),
            "margin_sum": jnp.sum(w * margin),
        }
        return loss_sum, aux

    return loss_fn


BT_SUM_KEYS = ("pairs", "correct", "margin_sum")


class RewardModelTrainer:
    """Bradley-Terry training of a `LearnedRewardModel` in place (its ``params`` are replaced after each step).

    ``step(prompts, chosen, rejected) -> metrics`` (loss, accuracy, mean margin, grad_norm, ...).  The optimizer is
    any optax transformation of the pure parameter tree (e.g. ``ring_jax.train.optim.make_optimizer``); the
    compiled step is the project's train step, so ``num_micro`` micro-batches accumulate gradients and a
    non-finite step is skipped."""

    def __init__(
        self,
        rm: LearnedRewardModel,
        optimizer: optax.GradientTransformation,
        *,
        num_micro: int = 1,
        alpha_bal: float = 0.0,
        alpha_z: float = 0.0,
        seed: int = 0,
    ):
        self.rm = rm
        abstract = abstract_train_state(rm.params, optimizer, seed)
        self.shardings = train_state_shardings(rm.param_vars, abstract, rm.mesh, rm.rules)
        self.state: TrainState = create_train_state(rm.params, optimizer, self.shardings, seed)
        self.num_micro = num_micro
        self._step = make_train_step(
            rm.graphdef,
            bradley_terry_loss_fn(alpha_bal, alpha_z),
            optimizer,
            rm.mesh,
            self.shardings,
            num_micro,
            sum_aux_keys=BT_SUM_KEYS,
            rules=rm.rules,
        )

    def batch(self, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str]) -> dict[str, np.ndarray]:
        """The [P, 2, T] pair batch (padded to a power-of-two pair count the mesh and micro-batches divide)."""
        if not (len(prompts) == len(chosen) == len(rejected)) or not prompts:
            raise RewardModelError(
                f"need equally many (>0) prompts, chosen and rejected responses, got "
                f"{len(prompts)}, {len(chosen)}, {len(rejected)}"
            )
        seqs = []
        for p, c, r in zip(prompts, chosen, rejected):
            seqs += [self.rm.encode(p, c), self.rm.encode(p, r)]
        b = pad_rows(seqs, 2 * self.rm.row_multiple * self.num_micro, self.rm.min_len)
        n = b["tokens"].shape[0] // 2
        mask = np.zeros((n,), np.int32)
        mask[: len(prompts)] = 1
        return {
            "tokens": b["tokens"].reshape(n, 2, -1),
            "segment_ids": b["segment_ids"].reshape(n, 2, -1),
            "last_idx": b["last_idx"].reshape(n, 2),
            "loss_mask": mask,
        }

    def step(self, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str]) -> dict[str, float]:
        self.state, m = self._step(self.state, self.batch(prompts, chosen, rejected))
        self.rm.params = self.state.params
        m = jax.device_get(m)
        pairs = max(float(m["pairs"]), 1.0)
        return {
            "loss": float(m["loss"]),
            "accuracy": float(m["correct"]) / pairs,
            "margin": float(m["margin_sum"]) / pairs,
            "grad_norm": float(m["grad_norm"]),
            "skipped": float(m["skipped"]),
            "balance_loss": float(m["balance_loss"]),
        }


def pairwise_accuracy(
    rm: LearnedRewardModel, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str]
) -> float:
    """Fraction of pairs scored chosen > rejected."""
    c = np.asarray(rm.score_batch(list(prompts), list(chosen)))
    r = np.asarray(rm.score_batch(list(prompts), list(rejected)))
    return float(np.mean(c > r))


__all__ = ["BT_SUM_KEYS", "RewardModelTrainer", "bradley_terry_loss_fn", "pairwise_accuracy"]
