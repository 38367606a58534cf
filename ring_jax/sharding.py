"""Device mesh from a flag, and the one table that maps logical axis names to mesh axes.

Mesh axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism with parameters and optimizer state sharded),
``expert`` (experts sharded; acts as a data axis outside the MoE block), ``tensor`` (heads and MLP widths sharded).
A flag such as ``--mesh=data:2,fsdp:1,expert:4,tensor:1`` builds it; absent axes have size 1.

Every parameter carries ``logical_axes`` metadata (see ``ring_jax.model.layers.param``); batches and the KV cache
name theirs here (activations inside the model carry no constraint: XLA propagates the parameters' and the batch's
shardings to them).  ``LOGICAL_RULES`` is the only place that decides where anything lives: changing the
sharding is an edit of this table.  A mesh axis that does not divide a dimension is dropped for that array (logged
once), so small test models run on any mesh.

Code inside the model that needs the rules (the expert-parallel MoE block shards its tokens like the batch) reads
:func:`active_rules`: ``DEFAULT_RULES`` unless a caller traces it inside :func:`use_rules`, the counterpart of
``jax.set_mesh`` for the rules (``make_train_step`` enters both).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TypeVar

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ring_jax.utils import is_variable, log_once

_M = TypeVar("_M", bound=nnx.Module)

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
LOGICAL_RULES: dict[str, tuple[str, ...] | str | None] = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "embed_moe": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "expert": "expert",
    "expert_mlp": "tensor",
    "router_experts": None,
    "norm": None,
    # the stacked decoder layers' leading axis (parameters and KV cache): every device holds every layer's shard
    # (a pipeline axis would go here)
    "layers": None,
    # batches, KV cache
    "batch": ("data", "fsdp", "expert"),
    "length": None,
    "cache_length": None,
}


class ShardingError(ValueError):
    pass


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """'data:2,expert:4' -> {'data': 2, 'fsdp': 1, 'expert': 4, 'tensor': 1}."""
    sizes = {a: 1 for a in MESH_AXES}
    if not spec.strip():
        return sizes
    for part in spec.split(","):
        name, _, n = part.strip().partition(":")
        if name not in MESH_AXES:
            raise ShardingError(f"mesh spec {spec!r}: unknown axis {name!r}; axes are {', '.join(MESH_AXES)}")
        try:
            sizes[name] = int(n)
        except ValueError:
            raise ShardingError(f"mesh spec {spec!r}: axis {name!r} needs an integer size, got {n!r}") from None
        if sizes[name] < 1:
            raise ShardingError(f"mesh spec {spec!r}: axis {name!r} must be >= 1")
    return sizes


def make_mesh(spec: str | Mapping[str, int] = "", devices: Sequence | None = None) -> Mesh:
    """A mesh over all (or the given) devices.  An empty spec puts every device on ``data``."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = parse_mesh_spec(spec) if isinstance(spec, str) else {**{a: 1 for a in MESH_AXES}, **spec}
    if all(v == 1 for v in sizes.values()):
        sizes["data"] = len(devices)
    n = int(np.prod(list(sizes.values())))
    if n != len(devices):
        raise ShardingError(f"mesh {sizes} has {n} devices but {len(devices)} are available")
    shape = tuple(sizes[a] for a in MESH_AXES)
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
    return Mesh(
        np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    )


def _as_tuple(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    rules: Mapping[str, tuple[str, ...] | str | None] = dataclasses.field(default_factory=lambda: dict(LOGICAL_RULES))

    def __hash__(self) -> int:  # a static argument of jax.jit (the sampling engine's device functions) is hashed
        return hash(tuple(sorted((k, _as_tuple(v)) for k, v in self.rules.items())))

    def __post_init__(self):
        for name, axes in self.rules.items():
            for a in _as_tuple(axes):
                if a not in MESH_AXES:
                    raise ShardingError(f"rule {name!r} -> {axes!r}: unknown mesh axis {a!r}")

    def spec(
        self, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None, mesh: Mesh | None = None
    ) -> P:
        """PartitionSpec for an array with these logical axes.  Two dimensions mapped to one mesh axis is an error;
        with ``shape`` and ``mesh`` given, mesh axes that do not divide their dimension are dropped."""
        used: dict[str, str] = {}
        out = []
        for i, name in enumerate(logical_axes):
            if name is not None and name not in self.rules:
                raise ShardingError(f"logical axis {name!r} has no rule; known: {sorted(self.rules)}")
            axes = _as_tuple(self.rules.get(name)) if name is not None else ()
            keep = []
            for a in axes:
                if a in used:
                    raise ShardingError(
                        f"logical axes {used[a]!r} and {name!r} of one array both map to mesh "
                        f"axis {a!r} (axes {tuple(logical_axes)})"
                    )
                used[a] = name
                if mesh is not None and shape is not None:
                    size = int(np.prod([mesh.shape[b] for b in keep + [a]]))
                    if shape[i] % size:
                        log_once(
                            f"dimension {name!r} of size {shape[i]} is not divisible by mesh axis {a!r}; "
                            "replicating it along that axis",
                            logging.INFO,
                        )
                        continue
                keep.append(a)
            out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
        return P(*out)

    def sharding(
        self, mesh: Mesh, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None
    ) -> NamedSharding:
        return NamedSharding(mesh, self.spec(logical_axes, shape, mesh))


DEFAULT_RULES = ShardingRules()
_ACTIVE_RULES: contextvars.ContextVar[ShardingRules] = contextvars.ContextVar("ring_jax_rules", default=DEFAULT_RULES)


@contextlib.contextmanager
def use_rules(rules: ShardingRules) -> Iterator[ShardingRules]:
    """Inside the block, :func:`active_rules` returns ``rules``.  Model code reads them when it is traced, so a jitted
    function must be traced (first called) inside the block whose rules it should use."""
    token = _ACTIVE_RULES.set(rules)
    try:
        yield rules
    finally:
        _ACTIVE_RULES.reset(token)


def active_rules() -> ShardingRules:
    """The rules of the innermost :func:`use_rules` block, else ``DEFAULT_RULES``."""
    return _ACTIVE_RULES.get()


def state_shardings(state: nnx.State, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> nnx.State:
    """NamedSharding for every Variable of an nnx State (parameters carry ``logical_axes``; anything without
    it, e.g. optimizer step counters, is replicated).  Works on abstract states too."""

    def one(v):
        axes = v.get_metadata().get("logical_axes") if is_variable(v) else None
        shape = v.get_value().shape if is_variable(v) else np.shape(v)
        if axes is None:
            return NamedSharding(mesh, P())
        return rules.sharding(mesh, axes, shape)

    return jax.tree.map(one, state, is_leaf=is_variable)


def shard_model(model: _M, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> _M:
    """Place every parameter of ``model`` according to the rules (in place; returns the model)."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    placed = jax.tree.map(lambda v, s: jax.device_put(v.get_value(), s), state, shardings, is_leaf=is_variable)
    nnx.update(model, placed)
    return model


def batch_sharding(mesh: Mesh, ndim: int = 2, rules: ShardingRules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of a [batch, length, ...] input: batch over the data-like axes."""
    return rules.sharding(mesh, ("batch",) + ("length",) + (None,) * (ndim - 2) if ndim >= 2 else ("batch",))


def param_sharding_fn(
    mesh: Mesh, rules: ShardingRules = DEFAULT_RULES
) -> Callable[[Sequence[str | None], Sequence[int]], NamedSharding]:
    """``(logical_axes, shape) -> Sharding``, the form ``ring_jax.hf.load_pretrained(shardings=...)`` takes."""
    return lambda axes, shape: rules.sharding(mesh, axes, shape)
