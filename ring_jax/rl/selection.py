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

Several optimiser updates per rollout (``select_budgets``): the pool is cut into that many disjoint budgets of Phi
tokens each, one per update, so every update trains on fresh responses and pi_old (the policy that sampled) moves
away from the trained policy after the first update.

Selection happens after advantages are computed (the report: "token truncation after advantage computation, before
back-propagation"), so truncating a response never changes its group statistics.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import numpy.typing as npt

ORDERS = ("random", "rollout", "shortest_first", "longest_first", "informative_first")


@dataclasses.dataclass(frozen=True)
class Selection:
    index: np.ndarray  # [S] pool indices of the selected responses, in selection order
    keep: np.ndarray  # [S] response tokens kept of each (the last may be truncated)
    selected_tokens: int  # sum(keep): == budget unless the pool ran short
    discarded_tokens: int  # pool tokens not selected
    shortfall: int  # budget - selected_tokens (0 when the pool had enough)
    truncated: bool  # whether the last selected response was cut


def _order(lengths, order: str, seed: int, advantages) -> np.ndarray:
    """The greedy pass's order over the pool (see the module docstring)."""
    n = len(lengths)
    if order not in ORDERS:
        raise ValueError(f"selection order {order!r}: one of {ORDERS}")
    if order == "random":
        return np.random.default_rng(seed).permutation(n)
    if order == "informative_first":
        if advantages is None or len(advantages) != n:
            raise ValueError("order 'informative_first' needs one advantage per response")
        shuffled = np.random.default_rng(seed).permutation(n)
        return shuffled[np.argsort(np.asarray(advantages)[shuffled] == 0, kind="stable")]
    if order == "rollout":
        return np.arange(n)
    if order == "shortest_first":
        return np.lexsort((np.arange(n), lengths))
    return np.lexsort((np.arange(n), -lengths))


def select_budgets(
    lengths: npt.ArrayLike,
    budget: int,
    num: int = 1,
    order: str = "random",
    seed: int = 0,
    advantages: npt.ArrayLike | None = None,
    eligible: npt.ArrayLike | None = None,
) -> list[Selection]:
    """``num`` disjoint budgets of exactly ``budget`` response tokens from one pool, one per optimiser update.

    One greedy pass in ``order`` is cut into consecutive budgets: budget u takes responses until its cumulative count
    first reaches ``budget`` and truncates the last one; the cut-off remainder of that response is discarded (a
    response is never split over two updates), and budget u + 1 starts with the next response.  When the pool runs
    short, the later budgets fall short (``shortfall``) or are empty.  ``eligible`` [N] bool (default all): responses
    that may be selected at all (the RL step excludes those whose reward failed).  ``discarded_tokens`` of every
    returned Selection is the pool's tokens that no budget took."""
    lengths = np.asarray(lengths, np.int64)
    if budget <= 0:
        raise ValueError(f"token budget must be positive, got {budget}")
    if num < 1:
        raise ValueError(f"need at least one budget, got {num}")
    perm = _order(lengths, order, seed, advantages)
    ok = np.ones(len(lengths), bool) if eligible is None else np.asarray(eligible, bool)
    perm = perm[(lengths[perm] > 0) & ok[perm]]  # empty responses contribute no tokens
    parts = []
    at = 0
    for _ in range(num):
        rest = perm[at:]
        cum = np.cumsum(lengths[rest])
        take = min(int(np.searchsorted(cum, budget, side="left")) + 1, len(rest))  # first prefix reaching it
        index = rest[:take]
        keep = lengths[index].copy()
        total = int(keep.sum())
        truncated = total > budget
        if truncated:
            keep[-1] -= total - budget
            total = budget
        parts.append((index, keep, total, truncated))
        at += take
    discarded = int(lengths.sum()) - sum(p[2] for p in parts)
    return [
        Selection(
            index=i, keep=k, selected_tokens=t, discarded_tokens=discarded, shortfall=max(0, budget - t), truncated=tr
        )
        for i, k, t, tr in parts
    ]


def select_budget(
    lengths: npt.ArrayLike,
    budget: int,
    order: str = "random",
    seed: int = 0,
    advantages: npt.ArrayLike | None = None,
    eligible: npt.ArrayLike | None = None,
) -> Selection:
    """Greedy selection of exactly ``budget`` response tokens (see the module docstring); ``advantages`` (one per
    response) is required by, and only used by, ``order="informative_first"``."""
    return select_budgets(lengths, budget, 1, order, seed, advantages, eligible)[0]


def fixed_count(
    lengths: npt.ArrayLike, num: int, seed: int = 0, parts: int = 1, eligible: npt.ArrayLike | None = None
) -> list[Selection]:
    """Sample-level baseline: ``parts`` disjoint sets of ``num`` responses each, consecutive in a seeded shuffle of
    the eligible responses, untruncated (the last sets may hold fewer when the pool runs out)."""
    lengths = np.asarray(lengths, np.int64)
    ok = np.ones(len(lengths), bool) if eligible is None else np.asarray(eligible, bool)
    perm = np.random.default_rng(seed).permutation(len(lengths))
    perm = perm[ok[perm]]
    chosen = [perm[u * num : (u + 1) * num] for u in range(parts)]
    discarded = int(lengths.sum()) - sum(int(lengths[c].sum()) for c in chosen)
    return [
        Selection(
            index=c,
            keep=lengths[c].copy(),
            selected_tokens=int(lengths[c].sum()),
            discarded_tokens=discarded,
            shortfall=0,
            truncated=False,
        )
        for c in chosen
    ]
