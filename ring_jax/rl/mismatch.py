"""The trainer / sampler mismatch, host side (NumPy): its metrics, the IcePop mask and what pi_old is.

pi_infer is the sampler's temperature-1 probability of each sampled token (``Completion.raw_logprobs``: the
engine's own numerics, e.g. a bfloat16 rollout); pi_train is the trainer's probability of the same token at the same
(rollout) parameters, from its own forward (its dtype, its MoE path, its routing).  They differ by rounding, and in a
MoE by far more wherever a router logit near a tie flips which experts a token reaches.

Metrics, over every selected response token of a step (those of the C3PO budgets or baseline batches, also
of a budget then skipped for lack of signal; ``mismatch_metrics``), with d = log pi_train - log pi_infer:

- ``mismatch/logp_abs_mean``: mean |d|; ``mismatch/logp_abs_max``: the largest |d|; ``mismatch/logp_abs_p50`` /
  ``_p99``: its median and 99th percentile (the shape of the distribution, step by step);
- ``mismatch/kl``: the k3 estimate of KL(pi_infer || pi_train), mean of exp(d) - 1 - d over the sampled tokens
  (non-negative per token; unbiased when the rollout samples pi_infer itself, i.e. at temperature 1 without top-p /
  top-k);
- ``mismatch/ratio_out_2x_frac``: the share of tokens whose ratio pi_train / pi_infer is above 2 or below 1/2;
- ``mismatch/routing_disagree_frac``: the share of (token, MoE layer) pairs whose top-k expert *set* in the trainer's
  forward differs from the one the sampler routed the token to, over every token of the trained documents that the
  sampler recorded (prompt and response; the response's last token is never fed back, so it has no record);
  ``mismatch/routing_disagree_token_frac``: the share of those tokens that differ in at least one layer (R3's
  "94% of tokens" figure).  With routing replay the trainer's forward *uses* the recorded experts; the metric then
  still compares the trainer router's own choice, i.e. how much the replay overrides.

IcePop (Ring-1T, arXiv 2510.18855): a token whose ratio pi_train / pi_infer lies outside [low, high] gets no
policy-gradient term (``icepop_mask``).  Ring-1T's objective weighs the kept tokens by the ratio itself
(M(k) = k in the band, 0 outside); here that weight is TIS's (``old_logp="trainer"`` makes it min(pi_train / q, C),
q the distribution the token was drawn from), so IcePop with trainer pi_old and a cap >= high is Ring-1T's M(k).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

OLD_LOGP = ("sampler", "trainer")
LOG2 = float(np.log(2.0))


def parse_icepop(spec: str | Sequence[str] | Sequence[float] | None) -> tuple[float, float] | None:
    """``"LOW,HIGH"`` (or a pair) -> (low, high); empty / None -> None (IcePop off).  ValueError unless
    0 <= low <= 1 <= high (a band without ratio 1 would mask tokens the two engines agree on)."""
    if spec is None or (isinstance(spec, str) and not spec.strip()) or (not isinstance(spec, str) and not spec):
        return None
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    try:
        low, high = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"icepop {spec!r}: two numbers LOW,HIGH, e.g. 0.5,2.0") from None
    if not (0.0 <= low <= 1.0 <= high) or not np.isfinite(high):
        raise ValueError(f"icepop {spec!r}: needs 0 <= LOW <= 1 <= HIGH (finite)")
    return low, high


def icepop_mask(train_logp: npt.ArrayLike, infer_logp: npt.ArrayLike, band: tuple[float, float] | None) -> np.ndarray:
    """1.0 where pi_train / pi_infer is inside ``band`` = (low, high) (ends included), else 0.0; all ones when
    ``band`` is None."""
    d = np.asarray(train_logp, np.float64) - np.asarray(infer_logp, np.float64)
    if band is None:
        return np.ones(d.shape, np.float32)
    low, high = band
    with np.errstate(divide="ignore"):
        lo = np.log(low) if low > 0 else -np.inf
    return ((d >= lo) & (d <= np.log(high))).astype(np.float32)


def old_logprobs(mode: str, sampler_logp: np.ndarray, trainer_logp: np.ndarray) -> np.ndarray:
    """pi_old of each trained token: the sampler's temperature-1 log-probs (``"sampler"``) or the trainer's at the
    rollout parameters (``"trainer"``, verl's decoupled pi_old)."""
    if mode == "sampler":
        return np.asarray(sampler_logp, np.float32)
    if mode == "trainer":
        return np.asarray(trainer_logp, np.float32)
    raise ValueError(f"old_logp {mode!r}: one of {OLD_LOGP}")


def routing_disagreement(trainer_ids: np.ndarray, sampler_ids: np.ndarray) -> tuple[float, float, int]:
    """(share of recorded (token, layer) pairs whose expert sets differ, share of recorded tokens differing in any
    layer, recorded tokens).  Both [..., L, k]; a token is recorded where ``sampler_ids[..., 0, 0] >= 0``."""
    t = np.sort(np.asarray(trainer_ids), axis=-1)
    s = np.sort(np.asarray(sampler_ids).astype(t.dtype), axis=-1)
    rec = np.asarray(sampler_ids)[..., 0, 0] >= 0
    n = int(rec.sum())
    if n == 0:
        return float("nan"), float("nan"), 0
    diff = np.any(t != s, axis=-1)[rec]  # [n, L]
    return float(diff.mean()), float(diff.any(axis=-1).mean()), n


def mismatch_metrics(train_logp: np.ndarray, infer_logp: np.ndarray) -> dict[str, float]:
    """The log-probability metrics of the module doc over 1-D arrays of selected tokens."""
    d = np.asarray(train_logp, np.float64) - np.asarray(infer_logp, np.float64)
    if d.size == 0:
        keys = ("logp_abs_mean", "logp_abs_max", "logp_abs_p50", "logp_abs_p99", "kl", "ratio_out_2x_frac")
        return {k: float("nan") for k in keys} | {"tokens": 0.0}
    a = np.abs(d)
    return {
        "logp_abs_mean": float(a.mean()),
        "logp_abs_max": float(a.max()),
        "logp_abs_p50": float(np.quantile(a, 0.5)),
        "logp_abs_p99": float(np.quantile(a, 0.99)),
        "kl": float(np.mean(np.expm1(d) - d)),
        "ratio_out_2x_frac": float(np.mean(a > LOG2)),
        "tokens": float(d.size),
    }
