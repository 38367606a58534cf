"""The sampling engine on the trainer's mesh: parameters sharded over (data=2, expert=4) make the engine run under
that mesh with the KV cache split over the slots and the per-slot scalars replicated (readable on every process);
the sampled tokens equal those of the unsharded engine (same keys), log-probs to float tolerance."""

import jax
import numpy as np

from ring_jax.config import get_preset
from ring_jax.sampling import device
from ring_jax.sampling.engine import SamplingEngine
from ring_jax.sampling.types import SamplingParams
from ring_jax.sharding import make_mesh, shard_model
from tests.sampling.models import random_model


def test_sharded_engine_places_the_cache_and_samples_the_same_tokens():
    cfg = get_preset("tiny")
    prompts = [[3, 4, 5], [7, 8, 9, 10, 11]]
    sp = SamplingParams(temperature=1.0, max_new_tokens=8, n=2)
    outs = []
    for spec in (None, "data:2,expert:4"):
        # NumPy-initialised (tests/sampling/models.py): build_model's initialisers and randomize's draws compiled
        # one small program per parameter shape, for each of the two models
        model = random_model(cfg, seed=1)
        if spec:
            shard_model(model, make_mesh(spec))
        eng = SamplingEngine.from_model(model, num_slots=8, chunk=4)
        assert (eng.mesh is not None) == bool(spec)
        outs.append(eng.generate(prompts, sp, key=0))
    with jax.set_mesh(eng.mesh):
        ds = device.empty_state(eng.cfg, 8, 64, 8, rules=eng.rules)
    assert ds.cache.k.sharding.spec[:2] == (None, ("data", "expert"))  # [layers, slots, ...]: slots over the batch axes
    assert ds.logits.sharding.spec[0] == ("data", "expert")
    assert ds.active.sharding.is_fully_replicated and ds.stop_ids.sharding.is_fully_replicated
    for a, b in zip(*outs):
        assert a.token_ids.tolist() == b.token_ids.tolist()
        np.testing.assert_allclose(a.raw_logprobs, b.raw_logprobs, atol=1e-4)
