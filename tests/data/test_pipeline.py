import json

import numpy as np
import pytest

from ring_jax.data.jsonl import DataError
from ring_jax.data.packing import FIELDS
from ring_jax.data.pipeline import make_prompt_dataset, make_sft_dataset, prompt_dataset, sft_dataset
from tests.data.synth import make_sft_records

SEQ = 96


@pytest.fixture(scope="module")
def records():
    return make_sft_records(120, seed=11)


def take(it, n):
    return [next(it) for _ in range(n)]


def same(a, b):
    return len(a) == len(b) and all(all(np.array_equal(x[k], y[k]) for k in FIELDS) for x, y in zip(a, b))


def row_keys(batches):
    return [b["tokens"][i].tobytes() for b in batches for i in range(b["tokens"].shape[0])]


def test_batches_shape_and_determinism(bpe_tok, records):
    ds, info = make_sft_dataset(records, bpe_tok, SEQ, batch_size=4, seed=3, num_epochs=1)
    batches = list(ds)
    assert info.shard.shard_count == 1 and info.shard.shard_index == 0  # jax.process_* defaults
    assert len(batches) == info.shard.num_batches == info.pack_stats.num_rows // 4
    for b in batches:
        assert set(b) == set(FIELDS)
        assert all(v.shape == (4, SEQ) and v.dtype == np.int32 for v in b.values())
    assert info.read_stats.good == len(records) and info.pack_stats.num_docs == len(records)
    assert same(batches, take(sft_dataset(records, bpe_tok, SEQ, 4, seed=3), len(batches)))
    other = list(sft_dataset(records, bpe_tok, SEQ, 4, seed=4))  # another packing: may hold fewer rows
    assert not same(batches, other)


@pytest.mark.parametrize("skip", [3, 7])
def test_state_resume_reproduces_batches(bpe_tok, records, skip):
    ds, info = make_sft_dataset(records, bpe_tok, SEQ, batch_size=4, seed=0, num_epochs=2)
    it = iter(ds)
    take(it, skip)  # with skip=7 the following batches cross the epoch boundary
    state = it.get_state()
    state = json.loads(json.dumps(state))  # checkpointable as JSON
    expected = take(it, 6)
    fresh, _ = make_sft_dataset(records, bpe_tok, SEQ, batch_size=4, seed=0, num_epochs=2)
    it2 = iter(fresh)
    take(it2, 1)
    it2.set_state(state)
    assert same(take(it2, 6), expected)


def test_epochs_reshuffle_and_cover(bpe_tok, records):
    ds, info = make_sft_dataset(records, bpe_tok, SEQ, batch_size=1, seed=5, num_epochs=2)
    n = info.pack_stats.num_rows
    rows = row_keys(list(ds))
    assert len(rows) == 2 * n
    assert sorted(rows[:n]) == sorted(rows[n:]) and len(set(rows[:n])) == n
    assert rows[:n] != rows[n:]


@pytest.mark.parametrize("num_epochs", [1, 2])
def test_shards_disjoint_and_cover(bpe_tok, records, num_epochs):
    out = []
    for shard in range(2):
        ds, info = make_sft_dataset(
            records, bpe_tok, SEQ, batch_size=2, seed=9, num_epochs=num_epochs, shard_index=shard, shard_count=2
        )
        batches = list(ds)
        assert all(b["tokens"].shape == (1, SEQ) for b in batches)  # global batch 2 -> 1 row per process
        out.append(row_keys(batches))
    n = info.pack_stats.num_rows
    assert len(out[0]) == len(out[1]) == num_epochs * (n // 2)  # equal steps on every process
    for e in range(num_epochs):
        a, b = (set(o[e * (n // 2) : (e + 1) * (n // 2)]) for o in out)
        assert not a & b
        all_rows, _ = make_sft_dataset(records, bpe_tok, SEQ, batch_size=1, seed=9, shard_count=1, shard_index=0)
        everything = set(row_keys(list(all_rows)))
        assert a | b <= everything and len(a | b) == n - n % 2


def test_sft_from_file_and_errors(bpe_tok, records, tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join([json.dumps(r) for r in records] + ["not json"]) + "\n")
    ds, info = make_sft_dataset(str(path), bpe_tok, SEQ, batch_size=2, seed=0)
    assert info.read_stats.bad_records == [(str(path), len(records) + 1, "bad_json")]
    assert len(list(ds)) == info.pack_stats.num_rows // 2
    with pytest.raises(ValueError, match="multiple of shard_count"):
        make_sft_dataset(records, bpe_tok, SEQ, batch_size=3, seed=0, shard_index=0, shard_count=2)
    with pytest.raises(DataError, match="fewer than one batch"):
        make_sft_dataset(records[:2], bpe_tok, SEQ, batch_size=8, seed=0)
    # over-length records: skipped as bad by default, truncated by the packer with skip_overlength=False
    long = [{"prompt": "word " * 60, "response": "answer"}] + records[:40]
    with pytest.raises(DataError, match="too_long"):
        make_sft_dataset(long, bpe_tok, 32, batch_size=1, seed=0)
    _, info = make_sft_dataset(long, bpe_tok, 32, batch_size=1, seed=0, skip_overlength=False)
    assert info.read_stats.bad == 0 and info.pack_stats.truncated_docs >= 1


def test_prompt_dataset_shards_and_state():
    recs = [{"task": "math", "prompt": f"q{i}", "uid": i} for i in range(23)]
    seen = []
    for shard in range(2):
        ds, stats, info = make_prompt_dataset(recs, batch_size=4, seed=1, shard_index=shard, shard_count=2)
        batches = list(ds)
        assert all(isinstance(b, list) and len(b) == 2 for b in batches) and len(batches) == info.num_batches == 5
        seen.append([r["uid"] for b in batches for r in b])
    assert not set(seen[0]) & set(seen[1]) and len(set(seen[0]) | set(seen[1])) == 20  # 22 even, 1 partial batch each
    it = prompt_dataset(recs, batch_size=3, seed=2, num_epochs=None, shard_index=0, shard_count=1)
    take(it, 10)  # past the first epoch (infinite repeat)
    state = it.get_state()
    expected = take(it, 5)
    it2 = prompt_dataset(recs, batch_size=3, seed=2, num_epochs=None, shard_index=0, shard_count=1)
    it2.set_state(state)
    assert take(it2, 5) == expected


def test_data_package_is_independent_of_model():
    import subprocess
    import sys

    code = (
        "import sys, ring_jax.data as d\n"
        "names = [getattr(d, n) for n in d.__all__]\n"
        "bad = [m for m in sys.modules if m.startswith('ring_jax.') and not m.startswith('ring_jax.data')]\n"
        "assert not bad, bad\n"
    )
    import os
    import pathlib

    root = str(pathlib.Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, env=env, cwd=root)
