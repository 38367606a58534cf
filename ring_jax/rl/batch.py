"""Turn selected responses into packed training rows for the RL step (pure NumPy).

Each selected response becomes one document ``prompt ids + kept response ids`` packed into rows of ``seq_len``
(first fit, in selection order) with segment ids and positions restarting per document, as the SFT packer does.
Per-token arrays follow the SFT convention: position t predicts ``targets[t] = tokens[t + 1]``; the response token j
(at index P + j) is therefore trained at t = P + j - 1, where its sampler log-probability ``old_logp``, advantage and
loss weight are placed, with its truncated importance weight ``tis`` and its policy-gradient mask ``pg_mask`` (both
1 here; the RL step writes them once the trainer's log-probabilities are known).  With ``routing`` (rollout routing
replay), each document's recorded experts [prompt + kept response tokens, MoE layers, k] go to the positions of its
tokens (``-1`` elsewhere: padding routes by the trainer's own choice).  Rows are padded to a power of two and then to
a multiple of ``row_multiple`` (micro-batches x data-parallel size), so the jitted step sees a few bucketed shapes,
never one per step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

FIELDS = ("tokens", "targets", "positions", "segment_ids", "weights", "old_logp", "advantages", "tis", "pg_mask")
FLOAT_FIELDS = ("weights", "old_logp", "advantages", "tis", "pg_mask")


def build_rows(
    prompts: Sequence[npt.ArrayLike],
    responses: Sequence[npt.ArrayLike],
    old_logps: Sequence[npt.ArrayLike],
    advantages: Sequence[float] | np.ndarray,
    keep: Sequence[int] | np.ndarray,
    weights: Sequence[float] | np.ndarray,
    seq_len: int,
    row_multiple: int = 1,
    min_rows: int = 0,
    pow2_rows: bool = True,
    tis: Sequence[npt.ArrayLike | None] | None = None,
    routing: Sequence[np.ndarray] | None = None,
    return_index: bool = False,
) -> tuple[dict[str, np.ndarray], int] | tuple[dict[str, np.ndarray], int, list[tuple[int, np.ndarray]]]:
    """prompts/responses/old_logps (and ``tis``, optional): per selected response (lists of int / float arrays);
    advantages, keep, weights: per response; ``routing``: per response [prompt + response tokens, L, k] int.
    Returns (dict of [R, seq_len] arrays (and ``routing`` [R, seq_len, L, k]), number of rows that hold data), and
    with ``return_index`` the place of each response's kept tokens: (row, the positions t that predict them)."""
    docs = []
    tis = tis if tis is not None else [None] * len(prompts)
    for p, r, lp, a, k, w, iw in zip(prompts, responses, old_logps, advantages, keep, weights, tis):
        p, r, lp = np.asarray(p, np.int32), np.asarray(r, np.int32)[:k], np.asarray(lp, np.float32)[:k]
        iw = np.ones(len(r), np.float32) if iw is None else np.asarray(iw, np.float32)[:k]
        if len(p) + len(r) > seq_len:
            raise ValueError(f"prompt {len(p)} + response {len(r)} tokens exceed the row length {seq_len}")
        docs.append((p, r, lp, float(a), float(w), iw))
    rows: list[list] = []
    fill: list[int] = []
    for d in docs:
        n = len(d[0]) + len(d[1])
        for i, used in enumerate(fill):
            if used + n <= seq_len:
                rows[i].append(d)
                fill[i] += n
                break
        else:
            rows.append([d])
            fill.append(n)
    used_rows = len(rows)
    total = max(used_rows, min_rows, 1)
    if pow2_rows:  # a handful of row buckets, so a varying batch (sample-level baselines) does not recompile
        total = 1 << (total - 1).bit_length()
    total = -(-total // row_multiple) * row_multiple if row_multiple > 1 else total
    out = {f: np.zeros((total, seq_len), np.float32 if f in FLOAT_FIELDS else np.int32) for f in FIELDS}
    out["tis"][:] = 1.0
    out["pg_mask"][:] = 1.0
    doc_of = {id(d): j for j, d in enumerate(docs)}
    index: list = [None] * len(docs)
    if routing is not None:
        r0 = np.asarray(routing[0])
        out["routing"] = np.full((total, seq_len) + r0.shape[1:], -1, r0.dtype)
    for i, row in enumerate(rows):
        at = 0
        for seg, d in enumerate(row, start=1):
            p, r, lp, a, w, iw = d
            ids = np.concatenate([p, r])
            n = len(ids)
            sl = slice(at, at + n)
            out["tokens"][i, sl] = ids
            out["targets"][i, at : at + n - 1] = ids[1:]
            out["positions"][i, sl] = np.arange(n)
            out["segment_ids"][i, sl] = seg
            t = at + len(p) - 1 + np.arange(len(r))  # where each response token is predicted
            out["weights"][i, t] = w
            out["old_logp"][i, t] = lp
            out["advantages"][i, t] = a
            out["tis"][i, t] = iw
            j = doc_of[id(d)]
            index[j] = (i, t)
            if routing is not None:
                out["routing"][i, sl] = np.asarray(routing[j])[:n]
            at += n
    return (out, used_rows, index) if return_index else (out, used_rows)
