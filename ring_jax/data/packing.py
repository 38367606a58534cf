"""Pack tokenized documents into fixed-length rows (pure numpy, deterministic).

Input: documents ``(ids, loss_mask)`` where ``loss_mask[j] == 1`` means "token j is trained", i.e. the model is
scored on predicting ``ids[j]`` from ``ids[:j]`` (what :class:`ring_jax.data.chat.ChatRenderer` returns).

Output rows of length ``seq_len`` (all int32 arrays ``[num_rows, seq_len]``):

* ``tokens``: the documents laid out contiguously, ``pad_id`` after the last one.
* ``targets``: next token *within the same document*: if position t holds token j of document d, then
  ``targets[t] = d.ids[j + 1]``; at the last token of a document and on padding, ``targets[t] = pad_id``.
* ``loss_mask``: aligned with ``targets``: ``loss_mask[t] = d.loss_mask[j + 1]`` (0 at a document's last token
  and on padding). So the loss at position t is ``loss_mask[t] * CE(logits[t], targets[t])`` and never crosses
  a document boundary. The first token of a document is never a target.
* ``segment_ids``: 1, 2, 3, ... for the documents of a row in order, 0 on padding. The model must restrict
  attention to equal, non-zero segment ids.
* ``positions``: 0, 1, 2, ... restarting at each document (0 on padding).

A document is never split across rows; a document longer than ``seq_len`` is truncated to its first
``seq_len`` tokens (counted in :class:`PackStats`). Empty documents are dropped (counted).
Placement is greedy best-fit (each document, in input order, goes to the open row with the least free space
that still fits it; ties -> earliest row) or ``"sequential"`` (next-fit: start a new row when it doesn't fit).
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence

import numpy as np

FIELDS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


@dataclasses.dataclass
class PackStats:
    seq_len: int
    num_docs: int = 0  # documents packed (after dropping empty ones)
    num_rows: int = 0
    num_tokens: int = 0  # tokens placed in rows (after truncation)
    num_loss_tokens: int = 0  # sum of the output loss_mask
    truncated_docs: int = 0
    truncated_tokens: int = 0  # tokens cut off the end of over-long documents
    dropped_empty: int = 0

    @property
    def pad_tokens(self) -> int:
        return self.num_rows * self.seq_len - self.num_tokens

    @property
    def efficiency(self) -> float:
        """Fraction of row slots holding document tokens."""
        return self.num_tokens / max(1, self.num_rows * self.seq_len)


@dataclasses.dataclass
class PackedRows:
    """Packed rows; also a random-access sequence of per-row dicts (a grain data source)."""

    tokens: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"PackedRows index must be an int, got {type(i).__name__}")
        return {f: getattr(self, f)[i] for f in FIELDS}

    def as_dict(self) -> dict[str, np.ndarray]:
        return {f: getattr(self, f) for f in FIELDS}


def assign_rows(lengths: Sequence[int], seq_len: int, method: str = "best_fit") -> list[list[int]]:
    """Groups document indices into rows; every length must be in [1, seq_len]. Returns row -> doc indices."""
    rows: list[list[int]] = []
    if method == "sequential":
        free = 0
        for i, n in enumerate(lengths):
            if not rows or n > free:
                rows.append([])
                free = seq_len
            rows[-1].append(i)
            free -= n
        return rows
    if method != "best_fit":
        raise ValueError(f"unknown packing method {method!r} (expected 'best_fit' or 'sequential')")
    open_rows: list[tuple[int, int]] = []  # sorted (free space, row index); full rows are removed
    for i, n in enumerate(lengths):
        k = bisect.bisect_left(open_rows, (n, -1))
        if k < len(open_rows):
            free, r = open_rows.pop(k)
        else:
            free, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(i)
        if free - n > 0:
            bisect.insort(open_rows, (free - n, r))
    return rows


def pack(
    documents: Sequence[tuple[Sequence[int], Sequence[int]]],
    seq_len: int,
    pad_id: int = 0,
    method: str = "best_fit",
) -> tuple[PackedRows, PackStats]:
    """Packs ``(ids, loss_mask)`` documents into rows of ``seq_len`` (see module docstring for the layout)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    stats = PackStats(seq_len=seq_len)
    docs: list[tuple[np.ndarray, np.ndarray]] = []
    for ids, mask in documents:
        ids = np.asarray(ids, dtype=np.int32).reshape(-1)
        mask = np.asarray(mask, dtype=np.int32).reshape(-1)
        if ids.shape != mask.shape:
            raise ValueError(f"ids and loss_mask lengths differ: {ids.shape} vs {mask.shape}")
        if ids.size == 0:
            stats.dropped_empty += 1
            continue
        if ids.size > seq_len:
            stats.truncated_docs += 1
            stats.truncated_tokens += ids.size - seq_len
            ids, mask = ids[:seq_len], mask[:seq_len]
        docs.append((ids, mask))

    rows = assign_rows([d[0].size for d in docs], seq_len, method)
    shape = (len(rows), seq_len)
    tokens = np.full(shape, pad_id, dtype=np.int32)
    targets = np.full(shape, pad_id, dtype=np.int32)
    loss_mask = np.zeros(shape, dtype=np.int32)
    segment_ids = np.zeros(shape, dtype=np.int32)
    positions = np.zeros(shape, dtype=np.int32)
    for r, members in enumerate(rows):
        start = 0
        for seg, i in enumerate(members, start=1):
            ids, mask = docs[i]
            n = ids.size
            end = start + n
            tokens[r, start:end] = ids
            targets[r, start : end - 1] = ids[1:]
            loss_mask[r, start : end - 1] = mask[1:]
            segment_ids[r, start:end] = seg
            positions[r, start:end] = np.arange(n, dtype=np.int32)
            start = end
        stats.num_tokens += start

    stats.num_docs = len(docs)
    stats.num_rows = len(rows)
    stats.num_loss_tokens = int(loss_mask.sum())
    return PackedRows(tokens, targets, loss_mask, segment_ids, positions), stats
