import numpy as np
import pytest

from ring_jax.rl.batch import build_rows


def test_rows_place_each_response_token_where_it_is_predicted():
    rng = np.random.default_rng(0)
    prompts = [rng.integers(5, 50, n) for n in (3, 4, 2)]
    responses = [rng.integers(5, 50, n) for n in (5, 2, 6)]
    lps = [rng.normal(size=len(r)).astype(np.float32) for r in responses]
    keep = [5, 2, 4]  # the last one truncated
    rows, used = build_rows(
        prompts, responses, lps, [0.5, -1.0, 2.0], keep, [1.0, 1.0, 1.0], seq_len=12, row_multiple=4
    )
    assert rows["tokens"].shape == (4, 12) and used == 2
    # oracle: walk every segment and check the per-token arrays against the inputs
    seen = 0
    for i in range(4):
        for s in range(1, rows["segment_ids"][i].max() + 1):
            idx = np.nonzero(rows["segment_ids"][i] == s)[0]
            j = seen
            p, r = prompts[j], responses[j][: keep[j]]
            np.testing.assert_array_equal(rows["tokens"][i, idx], np.concatenate([p, r]))
            np.testing.assert_array_equal(rows["positions"][i, idx], np.arange(len(idx)))
            trained = idx[rows["weights"][i, idx] > 0]
            np.testing.assert_array_equal(rows["targets"][i, trained], r)  # exactly the kept response tokens
            np.testing.assert_allclose(rows["old_logp"][i, trained], lps[j][: keep[j]])
            assert np.all(rows["advantages"][i, trained] == [0.5, -1.0, 2.0][j])
            seen += 1
    assert seen == 3
    assert rows["weights"].sum() == sum(keep)


def test_too_long_is_an_error():
    with pytest.raises(ValueError, match="exceed"):
        build_rows([[1] * 5], [[2] * 6], [[0.0] * 6], [1.0], [6], [1.0], seq_len=8)
