"""The logical-axis rules table, mesh specs and mesh construction."""

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from ring_jax.config import get_preset
from ring_jax.model import abstract_model
from ring_jax.sharding import (
    DEFAULT_RULES,
    LOGICAL_RULES,
    ShardingError,
    ShardingRules,
    make_mesh,
    parse_mesh_spec,
    state_shardings,
)


def test_parse_mesh_spec():
    assert parse_mesh_spec("data:2,expert:4") == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    assert parse_mesh_spec(" ") == {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}
    for bad, why in (("pipe:2", "unknown axis"), ("data:two", "integer"), ("data:0", ">= 1"), ("data", "integer")):
        with pytest.raises(ShardingError, match=why):
            parse_mesh_spec(bad)


def test_make_mesh_sizes_and_axis_types():
    with pytest.raises(ShardingError, match="has 3 devices but 8"):
        make_mesh("data:3")
    with pytest.raises(ShardingError, match="has 16 devices"):
        make_mesh("data:2,expert:8")
    mesh = make_mesh("fsdp:2,expert:2,tensor:2")
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert dict(make_mesh("").shape)["data"] == 8  # empty spec: everything on data
    sub = make_mesh("expert:2", devices=jax.devices()[:2])
    assert dict(sub.shape)["expert"] == 2


def test_collision_rejected():
    with pytest.raises(ShardingError, match="both map to mesh axis 'fsdp'"):
        DEFAULT_RULES.spec(("embed", "embed_moe"))
    rules = ShardingRules({**LOGICAL_RULES, "act_vocab": "tensor", "act_embed": "tensor"})
    with pytest.raises(ShardingError, match="'tensor'"):
        rules.spec(("act_vocab", "act_embed"))
    with pytest.raises(ShardingError, match="unknown mesh axis 'pipe'"):
        ShardingRules({"embed": "pipe"})
    with pytest.raises(ShardingError, match="no rule"):
        DEFAULT_RULES.spec(("embed", "nonsense"))


def test_non_divisible_axes_dropped():
    mesh = make_mesh("data:2,expert:4")
    # expert dim 6 is not divisible by expert=4: replicated along expert; fsdp (size 1) and tensor (1) always divide
    assert DEFAULT_RULES.spec(("expert", "embed_moe", "expert_mlp"), (6, 32, 16), mesh) == P(None, "fsdp", "tensor")
    assert DEFAULT_RULES.spec(("expert", "embed_moe", "expert_mlp"), (8, 32, 16), mesh) == P("expert", "fsdp", "tensor")
    # batch 2 over (data, fsdp, expert): data and fsdp divide it, expert (2*1*4 = 8) does not
    assert DEFAULT_RULES.spec(("batch", "length"), (2, 5), mesh) == P(("data", "fsdp"), None)
    assert DEFAULT_RULES.spec(("batch", "length"), (16, 5), mesh) == P(("data", "fsdp", "expert"), None)
    assert DEFAULT_RULES.spec(("batch", "length")) == P(("data", "fsdp", "expert"), None)  # no shape: no check


def test_state_shardings_follow_the_table():
    mesh = make_mesh("fsdp:2,expert:2,tensor:2")
    state = nnx.state(abstract_model(get_preset("tiny")))
    sh = state_shardings(state, mesh)
    moe = sh["layers"]["mlp"]  # the stacked layers: a leading, unsharded layers axis
    assert moe["experts_gate"].spec == P(None, "expert", "fsdp", "tensor")
    assert moe["experts_down"].spec == P(None, "expert", "tensor", "fsdp")
    assert moe["gate"].spec == P(None, "fsdp", None)
    assert sh["word_embeddings"].spec == P("tensor", "fsdp")
