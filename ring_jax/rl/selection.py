"""C3PO token-budget selection (Ring-lite section 3.2).

From one step's pool of responses, take responses greedily until the cumulative response-token count first reaches
the budget Phi; the last one taken is truncated so exactly Phi tokens enter the optimiser step (when the pool holds
at least Phi tokens).  Tokens left over are discarded and counted.  The report does not fix the order of the greedy
pass, so it is an option:

- ``random`` (default): a seeded shuffle of the pool, so no response length is systematically favoured;
- ``rollout``: the order the rollout produced them (with continuous batching: completion order, so short answers
  first — faster steps but biased towards short responses);
- ``shortest_first`` / ``longest_first``: by length (ties by pool index), for studying the length bias;
- ``informative_first``: responses with a non-zero advantage first, then the rest, each part in a seeded shuffle.
  A group whose K rewards are all equal has zero advantage on every token and adds nothing to the gradient (only
  to the KL and entropy terms), so with rare successes -- a weak policy, hard prompts -- random order spends most
  of Phi on such responses and discards some of the few that carry signal. Needs ``advantages``.

Selection happens after advantages are computed (the report: "token truncation after advantage computation, before
back-propagation"), so truncating a response never changes its group statistics.
"""

from __future__ import annotations

import dataclasses

import numpy as np

ORDERS = ("random", "rollout", "shortest_first", "longest_first", "informative_first")


@dataclasses.dataclass(frozen=True)
class Selection:
    index: np.ndarray  # [S] pool indices of the selected responses, in selection order
    keep: np.ndarray  # [S] response tokens kept of each (the last may be truncated)
    selected_tokens: int  # sum(keep): == budget unless the pool ran short
    discarded_tokens: int  # pool tokens not selected
    shortfall: int  # budget - selected_tokens (0 when the pool had enough)
    truncated: bool  # whether the last selected response was cut


def select_budget(lengths, budget: int, order: str = "random", seed: int = 0, advantages=None) -> Selection:
    """Greedy selection of exactly ``budget`` response tokens (see the module docstring); ``advantages`` (one per
    response) is required by, and only used by, ``order="informative_first"``."""
    lengths = np.asarray(lengths, np.int64)
    if budget <= 0:
        raise ValueError(f"token budget must be positive, got {budget}")
    if order not in ORDERS:
        raise ValueError(f"selection order {order!r}: one of {ORDERS}")
    n = len(lengths)
    if order == "random":
        perm = np.random.default_rng(seed).permutation(n)
    elif order == "informative_first":
        if advantages is None or len(advantages) != n:
            raise ValueError("order 'informative_first' needs one advantage per response")
        shuffled = np.random.default_rng(seed).permutation(n)
        perm = shuffled[np.argsort(np.asarray(advantages)[shuffled] == 0, kind="stable")]
    elif order == "rollout":
        perm = np.arange(n)
    elif order == "shortest_first":
        perm = np.lexsort((np.arange(n), lengths))
    else:
        perm = np.lexsort((np.arange(n), -lengths))
    perm = perm[lengths[perm] > 0]  # empty responses contribute no tokens
    cum = np.cumsum(lengths[perm])
    take = int(np.searchsorted(cum, budget, side="left")) + 1  # first prefix reaching the budget
    take = min(take, len(perm))
    index = perm[:take]
    keep = lengths[index].copy()
    total = int(keep.sum())
    truncated = False
    if total > budget:
        keep[-1] -= total - budget
        truncated = True
        total = budget
    return Selection(index=index, keep=keep, selected_tokens=total,
                     discarded_tokens=int(lengths.sum()) - total, shortfall=max(0, budget - total),
                     truncated=truncated)


def fixed_count(lengths, num: int, seed: int = 0) -> Selection:
    """Sample-level baseline: the first ``num`` responses of a seeded shuffle, untruncated."""
    lengths = np.asarray(lengths, np.int64)
    perm = np.random.default_rng(seed).permutation(len(lengths))[:num]
    keep = lengths[perm].copy()
    return Selection(index=perm, keep=keep, selected_tokens=int(keep.sum()),
                     discarded_tokens=int(lengths.sum() - keep.sum()), shortfall=0, truncated=False)
