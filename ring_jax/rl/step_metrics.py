"""Assembling one RL step's metrics (host side) from its updates' device metrics, its rollout and the per-token
arrays of the trainer / sampler comparison (``ring_jax.rl.mismatch``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ring_jax.rl.losses import token_weights
from ring_jax.rl.mismatch import mismatch_metrics, routing_disagreement
from ring_jax.sampling.types import FINISH_STOP, Completion

if TYPE_CHECKING:
    from ring_jax.rl.step import RLConfig

# the RL loss's auxiliary outputs summed over micro-batches, and maximised
RL_SUM_KEYS = (
    "expert_load",
    "kl_sum",
    "entropy_sum",
    "clip_count",
    "ratio_sum",
    "token_count",
    "drift_sum",
    "approx_kl_sum",
)
RL_MAX_KEYS = ("ratio_max",)


def step_metrics(
    rl: RLConfig,
    ups: list[dict],
    comps: list[Completion],
    lengths: np.ndarray,
    reward: np.ndarray,
    adv: np.ndarray,
    valid: np.ndarray,
    tok: dict[str, list],
) -> dict[str, float]:
    """The metrics of one RL step (see :class:`ring_jax.rl.step.RLStep`): ``ups`` one entry per budget (``sel``,
    the update's device metrics ``m`` or None when skipped, its ``normaliser``, ``rows``, ``rows_used``); ``tok``
    the step's per-token arrays of every selected response (``train``, ``infer``, ``tis``, ``cut``, ``mask``) and
    the (trainer, sampler) routing pairs."""
    ran = [u for u in ups if u["m"] is not None]
    out: dict = {}
    sums = {k: 0.0 for k in RL_SUM_KEYS if k != "expert_load"}
    for i, u in enumerate(ups, start=1):
        sel, m = u["sel"], u["m"]
        pre = f"update/{i}/"
        out[pre + "tokens"] = float(sel.selected_tokens)
        out[pre + "skipped_no_signal"] = float(m is None)
        if m is None:
            continue
        n_tok = max(float(m["token_count"]), 1.0)
        out.update(
            {
                pre + "loss": float(m["loss"]),
                pre + "grad_norm": float(m["grad_norm"]),
                pre + "clip_frac": float(m["clip_count"]) / n_tok,
                pre + "ratio_mean": float(m["ratio_sum"]) / n_tok,
                pre + "ratio_max": float(m["ratio_max"]),
                pre + "approx_kl": float(m["approx_kl_sum"]) / n_tok,
                pre + "kl": float(m["kl_sum"]) / n_tok,
            }
        )
        for k in sums:
            sums[k] += float(m[k])
    n_tok = max(sums["token_count"], 1.0)
    if ran:
        last = ran[-1]["m"]
        out.update({k: v for k, v in last.items() if k not in RL_SUM_KEYS + RL_MAX_KEYS + ("loss", "grad_norm")})
        out.update(
            {
                "loss": float(np.mean([u["m"]["loss"] for u in ran])),
                "grad_norm": float(np.mean([u["m"]["grad_norm"] for u in ran])),
                "skipped": float(sum(float(u["m"]["skipped"]) for u in ran)),
                "kl": sums["kl_sum"] / n_tok,
                "entropy": sums["entropy_sum"] / n_tok,
                "clip_frac": sums["clip_count"] / n_tok,
                "ratio_mean": sums["ratio_sum"] / n_tok,
                "ratio_max": max(float(u["m"]["ratio_max"]) for u in ran),
                "approx_kl": sums["approx_kl_sum"] / n_tok,
                "logprob_drift": float(ups[0]["m"]["drift_sum"]) / max(float(ups[0]["m"]["token_count"]), 1.0)
                if ups[0]["m"] is not None
                else float("nan"),
                "rows": float(sum(u["rows"] for u in ran)),
                "rows_used": float(sum(u["rows_used"] for u in ran)),
                "normalizer": float(ran[0]["normaliser"]),
            }
        )
    else:  # every update skipped: the keys a plot or a caller reads are still there
        out.update(
            {
                "loss": float("nan"),
                "grad_norm": float("nan"),
                "skipped": 0.0,
                "normalizer": token_weights(rl.aggregation, ups[0]["sel"].keep, rl.budget)[1],
            }
        )
    selected = [u["sel"] for u in ups]
    kept = float(sum(s.selected_tokens for s in selected))
    sel_idx = np.concatenate([s.index for s in selected]) if selected else np.zeros((0,), int)
    cat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in tok.items() if k != "routing"}
    w_sel, t_sel = cat["tis"], cat["cut"]
    out.update(
        {
            "updates": float(len(ran)),
            "skipped_no_signal": float(len(ups) - len(ran)),
            "tokens": kept,
            "kept_tokens": kept,
            "discarded_tokens": float(selected[0].discarded_tokens),
            "budget_shortfall": float(sum(s.shortfall for s in selected)),
            "responses_selected": float(len(sel_idx)),
            "responses": float(len(comps)),
            "response_len_mean": float(lengths.mean()),
            "response_len_max": float(lengths.max()),
            "stop_frac": float(np.mean([c.finish_reason == FINISH_STOP for c in comps])),
            "reward_mean": float(reward[valid].mean()) if valid.any() else float("nan"),
            "informative_responses": float(np.count_nonzero(adv)),
            "informative_selected": float(np.count_nonzero(adv[sel_idx])),
            "tis/weight_mean": float(w_sel.mean()) if w_sel.size else float("nan"),
            "tis/weight_min": float(w_sel.min()) if w_sel.size else float("nan"),
            "tis/weight_max": float(w_sel.max()) if w_sel.size else float("nan"),
            "tis/truncated_frac": float(t_sel.mean()) if t_sel.size else 0.0,
            "icepop/masked_frac": float(1.0 - cat["mask"].mean()) if cat["mask"].size else 0.0,
        }
    )
    out.update({f"mismatch/{k}": v for k, v in mismatch_metrics(cat["train"], cat["infer"]).items()})
    pairs = tok["routing"]
    if pairs:
        own = np.concatenate([a.reshape(-1, *a.shape[-2:]) for a, _ in pairs])
        rec = np.concatenate([b.reshape(-1, *b.shape[-2:]) for _, b in pairs])
        frac, tok_frac, _ = routing_disagreement(own, rec)
    else:
        frac = tok_frac = float("nan")
    out["mismatch/routing_disagree_frac"] = frac
    out["mismatch/routing_disagree_token_frac"] = tok_frac
    return out
