"""Group-relative advantages (GRPO, Ring-lite Eq. 2): A_i = (R_i - mean(R_group)) / (std(R_group) + eps).

Every token of response i gets A_i.  ``std`` is the population standard deviation over the K responses of one
prompt; a group whose rewards are all equal gets zero advantages (it carries no learning signal).

Responses whose reward could not be computed (the reward function raised, timed out or returned NaN) are not
failures of the policy: ``valid`` masks them out of their group's mean and std, and they get advantage 0 (the RL
step also keeps them out of the token budget).  A group with fewer than two valid responses has no signal.

A group whose rewards differ only by rounding (a learned reward model's float scores of equal responses: std of
~1e-17, so (R - mean) / (std + eps) ~ 1e-11) has no signal either: a std at or below ``std_tol`` times the rewards'
scale (max(1, max |R|)) gives the group zero advantages, so it never counts as informative.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt


def group_advantages(
    rewards: npt.ArrayLike,
    group_ids: npt.ArrayLike,
    eps: float = 1e-6,
    valid: npt.ArrayLike | None = None,
    std_tol: float = 1e-6,
) -> np.ndarray:
    """rewards [N] and group_ids [N] (the prompt each response answers) -> advantages [N] (float32).  ``valid`` [N]
    bool (default all): which rewards enter the group statistics; the others get 0.  ``std_tol``: see the module
    doc."""
    r = np.asarray(rewards, np.float64)
    g = np.asarray(group_ids)
    if r.shape != g.shape or r.ndim != 1:
        raise ValueError(f"rewards {r.shape} and group_ids {g.shape} must be equal 1-D shapes")
    ok = np.ones(r.shape, bool) if valid is None else np.asarray(valid, bool)
    if ok.shape != r.shape:
        raise ValueError(f"valid {ok.shape} must match rewards {r.shape}")
    adv = np.zeros_like(r)
    for gid in np.unique(g):
        m = (g == gid) & ok
        if m.sum() >= 2:
            std = r[m].std()
            if std > std_tol * max(1.0, float(np.max(np.abs(r[m])))):
                adv[m] = (r[m] - r[m].mean()) / (std + eps)
    return adv.astype(np.float32)


# Tasks whose reward is a score, not a verdict: never binarised (a learned reward model's scalar).
SCORED_TASKS = frozenset({"reward_model"})


def binarize_rewards(rewards: npt.ArrayLike, tasks: Iterable[str]) -> np.ndarray:
    """Ring-lite's rewards are verdicts (solved or not, no format reward): 1.0 where a verifier gave 1.0, else 0.0.
    Partial credit (reasoning-gym's 0.01 for a garbled answer, an ifeval response meeting some constraints) would be
    blown up to unit advantages by the group std.  Rewards of ``SCORED_TASKS`` pass through unchanged."""
    r = np.asarray(rewards, np.float32)
    scored = np.array([t in SCORED_TASKS for t in tasks], bool)
    return np.where(scored, r, (r >= 1.0).astype(np.float32))
