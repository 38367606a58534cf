"""Group-relative advantages (GRPO, Ring-lite Eq. 2): A_i = (R_i - mean(R_group)) / (std(R_group) + eps).

Every token of response i gets A_i.  ``std`` is the population standard deviation over the K responses of one
prompt; a group whose rewards are all equal gets zero advantages (it carries no learning signal).
"""

from __future__ import annotations

import numpy as np


def group_advantages(rewards, group_ids, eps: float = 1e-6) -> np.ndarray:
    """rewards [N] and group_ids [N] (the prompt each response answers) -> advantages [N] (float32)."""
    r = np.asarray(rewards, np.float64)
    g = np.asarray(group_ids)
    if r.shape != g.shape or r.ndim != 1:
        raise ValueError(f"rewards {r.shape} and group_ids {g.shape} must be equal 1-D shapes")
    adv = np.zeros_like(r)
    for gid in np.unique(g):
        m = g == gid
        adv[m] = (r[m] - r[m].mean()) / (r[m].std() + eps)
    return adv.astype(np.float32)
