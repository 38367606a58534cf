import numpy as np
import pytest

from ring_jax.data.packing import FIELDS, assign_rows, pack

PAD = 0


def test_exact_small_example():
    docs = [([1, 2, 3], [0, 1, 1]), ([4, 5], [0, 1])]
    rows, stats = pack(docs, seq_len=6, pad_id=PAD)
    assert len(rows) == 1
    np.testing.assert_array_equal(rows.tokens[0], [1, 2, 3, 4, 5, 0])
    np.testing.assert_array_equal(rows.targets[0], [2, 3, 0, 5, 0, 0])
    np.testing.assert_array_equal(rows.loss_mask[0], [1, 1, 0, 1, 0, 0])
    np.testing.assert_array_equal(rows.segment_ids[0], [1, 1, 1, 2, 2, 0])
    np.testing.assert_array_equal(rows.positions[0], [0, 1, 2, 0, 1, 0])
    assert (stats.num_docs, stats.num_rows, stats.num_tokens, stats.pad_tokens, stats.num_loss_tokens) == (
        2,
        1,
        5,
        1,
        3,
    )
    assert set(rows[0]) == set(FIELDS) and all(v.dtype == np.int32 for v in rows.as_dict().values())


def random_docs(rng, n, seq_len, vocab=50):
    docs = []
    for _ in range(n):
        L = int(rng.integers(0, int(seq_len * 1.3) + 1))
        ids = rng.integers(1, vocab, size=L)
        mask = (rng.random(L) < 0.6).astype(np.int32)
        docs.append((ids, mask))
    return docs


def unpack(rows):
    """Recovers the documents of every row, checking the per-row layout invariants on the way."""
    out = []
    n_rows, S = rows.tokens.shape
    for r in range(n_rows):
        seg = rows.segment_ids[r]
        used = int((seg > 0).sum())
        # documents first (segments 1..k, contiguous, increasing by one), then only padding
        assert np.all(seg[:used] > 0) and np.all(seg[used:] == 0)
        assert seg[0] == 1 if used else True
        assert np.all(np.diff(seg[:used]) >= 0) and np.all(np.diff(seg[:used]) <= 1)
        for f in ("tokens", "targets"):
            assert np.all(getattr(rows, f)[r, used:] == PAD)
        assert np.all(rows.loss_mask[r, used:] == 0) and np.all(rows.positions[r, used:] == 0)
        for s in range(1, int(seg.max(initial=0)) + 1):
            where = np.flatnonzero(seg == s)
            assert where.size and np.array_equal(where, np.arange(where[0], where[-1] + 1))  # contiguous
            tok = rows.tokens[r, where]
            np.testing.assert_array_equal(rows.positions[r, where], np.arange(where.size))  # restart at 0
            # next-token targets inside the document, nothing after its last token
            np.testing.assert_array_equal(rows.targets[r, where[:-1]], tok[1:])
            assert rows.targets[r, where[-1]] == PAD and rows.loss_mask[r, where[-1]] == 0
            out.append((tuple(tok.tolist()), tuple(rows.loss_mask[r, where[:-1]].tolist())))
    return out


@pytest.mark.parametrize("method", ["best_fit", "sequential"])
@pytest.mark.parametrize("seed", range(6))
def test_packing_invariants(method, seed):
    rng = np.random.default_rng(seed)
    seq_len = int(rng.integers(2, 40))
    docs = random_docs(rng, int(rng.integers(1, 60)), seq_len)
    rows, stats = pack(docs, seq_len, pad_id=PAD, method=method)
    got = unpack(rows)
    # every non-empty document appears exactly once (truncated to seq_len), with its mask shifted onto targets
    want = [(tuple(ids[:seq_len].tolist()), tuple(mask[1:seq_len].tolist())) for ids, mask in docs if len(ids)]
    assert sorted(got) == sorted(want)
    lengths = [len(ids) for ids, _ in docs]
    assert stats.num_tokens == sum(min(L, seq_len) for L in lengths) == int((rows.segment_ids > 0).sum())
    assert stats.truncated_tokens == sum(max(0, L - seq_len) for L in lengths)
    assert stats.truncated_docs == sum(L > seq_len for L in lengths)
    assert stats.dropped_empty == sum(L == 0 for L in lengths)
    assert stats.num_loss_tokens == int(rows.loss_mask.sum())
    assert stats.pad_tokens == rows.tokens.size - stats.num_tokens
    # deterministic
    again, _ = pack(docs, seq_len, pad_id=PAD, method=method)
    assert all(np.array_equal(getattr(rows, f), getattr(again, f)) for f in FIELDS)


def test_pad_id_and_row_assignment():
    rows, _ = pack([([5, 6], [1, 1])], seq_len=4, pad_id=9)
    np.testing.assert_array_equal(rows.tokens[0], [5, 6, 9, 9])
    np.testing.assert_array_equal(rows.targets[0], [6, 9, 9, 9])
    # best fit puts the 2 into the row with 2 free (row 1), sequential opens rows in order
    assert assign_rows([6, 8, 2], 10, "best_fit") == [[0], [1, 2]]
    assert assign_rows([6, 8, 4, 2], 10, "best_fit") == [[0, 2], [1, 3]]
    assert assign_rows([6, 8, 4, 2], 10, "sequential") == [[0], [1], [2, 3]]
    with pytest.raises(ValueError, match="method"):
        assign_rows([1], 4, "worst_fit")
    with pytest.raises(ValueError, match="lengths differ"):
        pack([([1, 2], [1])], 4)
