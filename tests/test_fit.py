"""ring_jax.fit (ring-jax-fit): the rollout report's KV cache is the formula's bytes per device and scales with
slots x cache length; XLA's compiled arguments include what the report says they hold; the RL step compiles with
the reference model resident."""

import pytest

from ring_jax import fit
from ring_jax.config import get_preset
from ring_jax.rl.losses import PolicyLossConfig
from ring_jax.rl.step import RLConfig
from ring_jax.sharding import make_mesh


@pytest.fixture(scope="module")
def setup():
    cfg = get_preset("tiny", attn_chunk=16, moe_chunk=16)
    return fit.make_setup(cfg, make_mesh("data:2,expert:4"))


def test_rollout_kv_cache_scales_with_slots_and_length(setup):
    dp = fit.data_parallel(setup)
    assert dp == 8 and fit.cache_len_for(setup.cfg, 16, 48) == (16, 64)
    pre, dec = fit.rollout(setup, 8, 16, 48, prefill_batch=8, chunk=4)
    kv = dec.inputs["KV cache"]
    # layers x (k, v) x slots x S x kv_heads x head_dim x 4 bytes, the slots split over the 8 data-parallel shards,
    # + the cache's int32 segment ids and positions
    assert kv == fit.kv_cache_bytes(setup.cfg, 8, 64) // dp + 2 * 8 * 64 * 4 // dp > 0
    assert dec.argument >= dec.inputs["params"] + kv  # XLA passes at least what the report says
    assert dec.temp > 0 and pre.temp > 0 and dec.peak > dec.argument
    assert pre.resident["decode state (KV cache of all slots)"] > kv
    kv2, _ = fit.decode_state_bytes(setup, 16, 128)
    assert kv2 == 4 * kv  # twice the slots x twice the length


def test_rl_step_compiles_with_reference_resident(setup):
    rl = RLConfig(policy=PolicyLossConfig(beta=1e-3), logit_chunk=16)
    r = fit.rl_step(setup, rl, rows=8, seq_len=64)
    p = r.inputs["params"]
    assert r.resident["reference params"] == p > 0
    assert 2 * p <= r.inputs["optimizer state"] < 2 * p + 1024  # AdamW moments in float32 + counters
    assert r.temp > 0 and r.argument >= p + r.inputs["optimizer state"] + r.inputs["batch"]
    far = fit.extrapolate(r, r, 28)
    assert far.temp == r.temp and "extrapolated" in far.note
