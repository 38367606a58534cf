"""HF safetensors <-> orbax for models larger than the host's RAM, one decoder layer at a time.

``ring-jax-import --stream`` and ``ring-jax-export --stream``.  The normal path (``hf.load_pretrained``, then an orbax
save) holds every parameter on the host at once; ling-lite-1.5 in bf16 is 33.6 GB.  Here nothing larger than one
decoder layer (and the embedding) is in memory at a time:

- import reads layer i's safetensors tensors, converts them with ``hf.fill_layer`` (the same code as the normal
  path) and writes slice i of every stacked array straight into the checkpoint with tensorstore, in the format
  orbax itself writes: zarr v2 arrays in an OCDBT store, plus orbax's ``_METADATA``, ``_sharding`` and
  ``array_metadatas`` files and the step's ``meta`` item.  The per-array checksums that ``Checkpointer`` checks on
  restore are summed slice by slice.  The result restores with ``Checkpointer.restore_params`` like any checkpoint.
- export reads slice i of every array, checks the checksums as it goes, and passes layer i's tensors to
  ``hf.write_pretrained`` (the writer behind ``save_pretrained``, so the shards and the index are the same).

Chunking: a stacked array is stored one layer per chunk (``(1, *shard_shape[1:])``), so writing layer i touches
only its own chunks.  Every other array is one chunk per shard, as orbax stores it.  The checkpoint is written in
``<step>.orbax-checkpoint-tmp`` and renamed when complete, so a killed import never leaves something that looks
like a checkpoint.  Single process only.  ``tests/train/test_hf_stream.py`` checks the files against what orbax
writes for the same model.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import jax
import ml_dtypes
import numpy as np
import tensorstore as ts
from flax import nnx

from ring_jax.config import ModelConfig
from ring_jax.hf import CheckpointError as HFError
from ring_jax.hf import (
    SafetensorsReader,
    as_dtype,
    expected_shapes,
    fill_layer,
    layer_to_hf,
    load_config,
    module_variables,
    write_pretrained,
)
from ring_jax.model.transformer import DecoderLayer, build_model
from ring_jax.train.checkpoint import PARAM_LAYOUT, CheckpointError

if TYPE_CHECKING:
    from ring_jax.data.tokenizer import Tokenizer

_STD_HANDLER = "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler"
_JSON_HANDLER = "orbax.checkpoint._src.handlers.json_checkpoint_handler.JsonCheckpointHandler"
_MASK = 0xFFFFFFFF
_BLOCK = 1 << 24  # checksum words per numpy pass (64 MiB of uint32)


# ------------------------------------------------------------------------------------------------ the arrays
@dataclasses.dataclass(frozen=True)
class Leaf:
    """One parameter array as the checkpoint holds it."""

    keys: tuple  # path in the pure parameter dict, e.g. ("layers", "mlp", "experts_gate")
    shape: tuple
    dtype: np.dtype
    sharding: jax.sharding.Sharding

    @property
    def name(self) -> str:  # orbax's parameter name: the keys joined by "."
        return ".".join(str(k) for k in self.keys)

    @property
    def stacked(self) -> bool:
        return self.keys[0] == "layers"

    @property
    def write_shape(self) -> tuple:
        return tuple(self.sharding.shard_shape(self.shape))

    @property
    def chunk_shape(self) -> tuple:
        w = self.write_shape
        return (1,) + w[1:] if self.stacked else w


def leaves(cfg: ModelConfig, mesh: jax.sharding.Mesh | None = None) -> list[Leaf]:
    """The model's parameter arrays in the order of ``jax.tree.leaves`` (the checksum order), placed like
    ``Checkpointer`` saves them on ``mesh`` (one device when None)."""
    from ring_jax.sharding import state_shardings
    from ring_jax.train.step import split_model

    _, pvars, abstract = split_model(nnx.eval_shape(lambda: build_model(cfg)))
    if mesh is not None:
        shardings = nnx.to_pure_dict(state_shardings(pvars, mesh))
    else:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: one, abstract)
    flat, _ = jax.tree_util.tree_flatten_with_path(abstract)
    sh = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    return [Leaf(tuple(k.key for k in path), tuple(a.shape), np.dtype(a.dtype), s) for (path, a), s in zip(flat, sh)]


# ------------------------------------------------------------------------------------------------ checksums
class Checksum:
    """``train.checkpoint.tree_checksums`` of one array, summed over slices in any order: the word at flat index
    ``n`` adds ``w * (n * 2654435761 + 1)`` to one wrapping uint32 sum and ``w`` to another."""

    def __init__(self):
        self.s1 = self.s2 = 0

    def add(self, part: np.ndarray, offset: int) -> None:
        """Add ``part``, a C-contiguous block that starts at flat index ``offset`` of the whole array."""
        w = _words(part)
        for start in range(0, w.size, _BLOCK):
            blk = w[start : start + _BLOCK]
            idx = np.arange(blk.size, dtype=np.uint32) + np.uint32((offset + start) & _MASK)  # wraps like jax's iota
            weight = idx * np.uint32(2654435761) + np.uint32(1)
            self.s1 = (self.s1 + int(np.sum(blk * weight, dtype=np.uint32))) & _MASK
            self.s2 = (self.s2 + int(np.sum(blk, dtype=np.uint32))) & _MASK

    @property
    def value(self) -> int:
        return self.s1 ^ ((self.s2 * 40503) & _MASK)


def _words(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x).reshape(-1)
    if x.dtype.itemsize == 4:
        return x.view(np.uint32)
    if x.dtype.itemsize == 2:
        return x.view(np.uint16).astype(np.uint32)
    raise TypeError(f"checksum of {x.dtype} arrays is not implemented here")


# ------------------------------------------------------------------------------------------------ orbax's files
def _kvstore(params_dir: str) -> dict:
    return {"driver": "ocdbt", "base": f"file://{os.path.abspath(params_dir)}/"}


def _spec(params_dir: str, leaf: Leaf, metadata: dict | None = None) -> dict:
    spec = {"driver": "zarr", "kvstore": {**_kvstore(params_dir), "path": leaf.name}}
    return dict(spec, metadata=metadata) if metadata is not None else spec


def _zarr_metadata(leaf: Leaf) -> dict:
    return {
        "chunks": list(leaf.chunk_shape),
        "compressor": {"id": "zstd", "level": 1},
        "dimension_separator": ".",
        "dtype": "bfloat16" if leaf.dtype == ml_dtypes.bfloat16 else leaf.dtype.str,
        "fill_value": None,
        "filters": None,
        "order": "C",
        "shape": list(leaf.shape),
        "zarr_format": 2,
    }


def _sharding_json(s: jax.sharding.Sharding) -> str:
    if isinstance(s, jax.sharding.NamedSharding):
        mesh = s.mesh
        ids = np.vectorize(lambda d: d.id, otypes=[object])(mesh.devices).tolist()
        ids = _map_nested(ids, lambda i: {"id": int(i)})
        return json.dumps(
            {
                "sharding_type": "NamedSharding",
                "shape": list(mesh.devices.shape),
                "axis_names": list(mesh.axis_names),
                "axis_types": [str(t) for t in mesh.axis_types],
                "partition_spec": [_spec_entry(p) for p in s.spec],
                "device_mesh": {"mesh": ids},
            }
        )
    if isinstance(s, jax.sharding.SingleDeviceSharding):
        return json.dumps({"sharding_type": "SingleDeviceSharding", "device_str": str(next(iter(s.device_set)))})
    raise TypeError(f"unsupported sharding {s}")


def _spec_entry(p):
    return list(p) if isinstance(p, tuple) else p


def _map_nested(x, f):
    return [_map_nested(v, f) for v in x] if isinstance(x, list) else f(x)


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)


def _commit_marker(path: str, shown: str) -> None:
    with open(os.path.join(path, "commit_success.txt"), "w") as f:
        f.write(f"Checkpoint commit was successful to {shown}")


def _write_orbax_metadata(step_dir: str, final_dir: str, ls: list[Leaf], meta: dict, started_ns: int) -> None:
    """Every file orbax writes beside the arrays of a params-only step (``Checkpointer.save(params=...)``)."""
    params = os.path.join(step_dir, "params")
    tree = {
        str(tuple(str(k) for k in leaf.keys)): {
            "key_metadata": [{"key": str(k), "key_type": 2} for k in leaf.keys],
            "value_metadata": {
                "value_type": "jax.Array",
                "skip_deserialize": False,
                "write_shape": list(leaf.write_shape),
            },
        }
        for leaf in ls
    }
    _write_json(
        os.path.join(params, "_METADATA"),
        {
            "tree_metadata": tree,
            "use_ocdbt": True,
            "use_zarr3": False,
            "store_array_data_equal_to_fill_value": True,
            "custom_metadata": None,
        },
    )
    _write_json(
        os.path.join(params, "_sharding"),
        {base64.urlsafe_b64encode(leaf.name.encode()).decode(): _sharding_json(leaf.sharding) for leaf in ls},
    )
    os.makedirs(os.path.join(params, "array_metadatas"), exist_ok=True)
    _write_json(
        os.path.join(params, "array_metadatas", "process_0"),
        {
            "array_metadatas": [
                {
                    "array_metadata": {
                        "param_name": leaf.name,
                        "write_shape": list(leaf.write_shape),
                        "chunk_shape": list(leaf.chunk_shape),
                        "ext_metadata": None,
                    }
                }
                for leaf in ls
            ]
        },
    )
    for item, obj in (("meta", meta), ("data", {})):
        os.makedirs(os.path.join(step_dir, item), exist_ok=True)
        _write_json(os.path.join(step_dir, item, "metadata"), obj)
    for item in ("params", "meta", "data"):
        _commit_marker(os.path.join(step_dir, item), os.path.join(step_dir, item))
    _write_json(
        os.path.join(step_dir, "_CHECKPOINT_METADATA"),
        {
            "item_handlers": {"data": _JSON_HANDLER, "meta": _JSON_HANDLER, "params": _STD_HANDLER},
            "metrics": {},
            "performance_metrics": {},
            "init_timestamp_nsecs": started_ns,
            "commit_timestamp_nsecs": time.time_ns(),
            "custom_metadata": {},
        },
    )
    _commit_marker(step_dir, final_dir)


# ------------------------------------------------------------------------------------------------ import
def _layer_module(cfg: ModelConfig, i: int):
    return nnx.eval_shape(lambda: DecoderLayer(cfg, i, nnx.Rngs(params=0)))


def _read_layer(cfg: ModelConfig, i: int, read: Callable, module) -> dict[tuple, np.ndarray]:
    """{variable path: array} of decoder layer ``i`` in ring_jax's layout (in the dtype ``read`` returns)."""
    by_id = {id(v): path for path, v in module_variables(module).items()}
    out = {}
    fill_layer(cfg, i, module, read, lambda var, arr: out.__setitem__(by_id[id(var)], arr))
    return out


def _hf_parts(cfg: ModelConfig, read: Callable) -> Iterator[list[tuple[tuple, int | None, np.ndarray]]]:
    """Every parameter read from the HF directory, one group at a time (the embedding, each decoder layer, the final
    norm and head): lists of (leaf keys, index in the stack or None, array in the stored dtype).  The next group is
    read only when asked for, so a caller that finishes with a group first holds one group at a time."""
    shapes = expected_shapes(cfg)
    k = cfg.num_first_layers
    stack = _layer_module(cfg, k)  # every stacked layer has this one's shapes: built once, refilled per layer
    yield [(("word_embeddings",), None, read("model.word_embeddings.weight", shapes["model.word_embeddings.weight"]))]
    for i in range(cfg.num_hidden_layers):
        layer = _read_layer(cfg, i, read, _layer_module(cfg, i) if i < k else stack)
        yield [
            (("first_layers", i) + tuple(path), None, arr) if i < k else (("layers",) + tuple(path), i - k, arr)
            for path, arr in layer.items()
        ]
        del layer
    last = [(("norm", "weight"), None, read("model.norm.weight", shapes["model.norm.weight"]))]
    if not cfg.tie_word_embeddings:
        last.append((("lm_head",), None, read("lm_head.weight", shapes["lm_head.weight"]).T))
    yield last


def check_tensors(cfg: ModelConfig, read: SafetensorsReader) -> None:
    """Every tensor the config needs is present with its shape and nothing else is there, read from the shards'
    headers alone: a bad directory fails before anything is written (the same errors as ``hf.load_pretrained``)."""
    want = expected_shapes(cfg)
    for name, shape in want.items():
        got = read.shape(name)
        if got is None:
            raise HFError(f"missing tensor {name!r} (expected shape {shape})")
        if got != tuple(shape):
            raise HFError(f"tensor {name!r} has shape {got}, expected {tuple(shape)}")
    extra = sorted(n for n in read.where if n not in want and not (cfg.tie_word_embeddings and n == "lm_head.weight"))
    if extra:
        raise HFError(
            f"unexpected tensors not used by the model: {extra[:8]}"
            + (f" (+{len(extra) - 8} more)" if len(extra) > 8 else "")
        )


def import_hf_streaming(
    hf_dir: str,
    ckpt_dir: str,
    step: int = 0,
    param_dtype: str = "bfloat16",
    mesh: jax.sharding.Mesh | None = None,
    meta: dict | None = None,
    log: Callable[[str], None] = print,
) -> str:
    """Write the parameters-only checkpoint ``<ckpt_dir>/<step>`` from an HF directory, one layer at a time (see
    the module docstring).  ``meta`` is stored like ``Checkpointer.save``'s; returns the step directory."""
    if jax.process_count() > 1:
        raise CheckpointError("--stream import runs in one process (it writes the whole checkpoint itself)")
    cfg = load_config(hf_dir, param_dtype=param_dtype)
    read = SafetensorsReader(hf_dir, mmap=False, as_float32=False)  # nothing mapped, nothing widened
    check_tensors(cfg, read)
    ls = leaves(cfg, mesh)
    final = os.path.join(os.path.abspath(ckpt_dir), str(step))
    if os.path.exists(final):
        raise CheckpointError(f"{final} already exists")
    tmp = final + ".orbax-checkpoint-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    params_dir = os.path.join(tmp, "params")
    os.makedirs(params_dir)
    try:
        _write_params(cfg, read, ls, params_dir, tmp, final, meta, step, log)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a partial import is of no use; never leave it looking like one
        raise
    os.replace(tmp, final)
    return final


def _write_params(cfg, read, ls, params_dir, tmp, final, meta, step, log) -> None:
    """The arrays, layer by layer, then the metadata files, into the temporary step directory ``tmp``."""
    by_keys = {leaf.keys: leaf for leaf in ls}
    started = time.time_ns()
    context = ts.Context()
    arrays = {
        leaf.keys: ts.open(_spec(params_dir, leaf, _zarr_metadata(leaf)), create=True, context=context).result()
        for leaf in ls
    }
    sums = {leaf.keys: Checksum() for leaf in ls}
    t0 = time.time()
    for g, group in enumerate(_hf_parts(cfg, read)):
        pending = []
        while group:
            keys, j, arr = group.pop(0)
            leaf = by_keys[keys]
            value = np.ascontiguousarray(as_dtype(arr, leaf.dtype))
            del arr
            sums[keys].add(value, 0 if j is None else j * int(np.prod(leaf.shape[1:])))
            pending.append((arrays[keys] if j is None else arrays[keys][j]).write(value))
            del value
        _wait(pending)  # this group is on disk before the next is read
        del pending
        if 1 <= g <= cfg.num_hidden_layers:
            log(f"  layer {g}/{cfg.num_hidden_layers} written ({time.time() - t0:.0f}s)")
    del arrays, context
    meta = dict(
        meta or {},
        step=int(step),
        has_state=False,
        checksums={"params": [sums[leaf.keys].value for leaf in ls]},
        param_layout=PARAM_LAYOUT,
    )
    _write_orbax_metadata(tmp, final, ls, meta, started)


def _wait(futures) -> None:
    for f in futures:
        f.result()


# ------------------------------------------------------------------------------------------------ export
def _open_params(step_dir: str, cfg: ModelConfig) -> dict[tuple, ts.TensorStore]:
    params_dir = os.path.join(step_dir, "params")
    context = ts.Context()
    out = {}
    for leaf in leaves(cfg):
        try:
            arr = ts.open(_spec(params_dir, leaf), open=True, context=context).result()
        except ValueError as e:
            raise CheckpointError(f"{step_dir}: parameter {leaf.name} unreadable ({str(e).splitlines()[0]})") from None
        if tuple(arr.shape) != leaf.shape:
            raise CheckpointError(f"{step_dir}: {leaf.name} has shape {tuple(arr.shape)}, the config says {leaf.shape}")
        out[leaf.keys] = arr
    return out


def _checkpoint_parts(cfg: ModelConfig, arrays: dict, sums: dict) -> Iterator[tuple]:
    """model_to_hf's (name, array) pairs, read from the checkpoint one layer at a time, each array's
    checksum accumulated as it is read."""

    def get(keys, j=None):
        arr = arrays[keys]
        value = (arr if j is None else arr[j]).read().result()
        sums[keys].add(value, 0 if j is None else j * int(np.prod(arr.shape[1:])))
        return value

    def filled(module, value_of):
        for path, var in module_variables(module).items():
            var.set_value(value_of(tuple(path)))
        return module

    yield "model.word_embeddings.weight", get(("word_embeddings",))
    k = cfg.num_first_layers
    stack = _layer_module(cfg, k)
    for i in range(cfg.num_hidden_layers):
        if i < k:
            module = filled(_layer_module(cfg, i), lambda path: get(("first_layers", i) + path))  # noqa: B023 (called in this iteration)
        else:
            module = filled(stack, lambda path: get(("layers",) + path, i - k))  # noqa: B023 (called in this iteration)
        yield from layer_to_hf(cfg, i, module)
        module = None
    yield "model.norm.weight", get(("norm", "weight"))
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", get(("lm_head",)).T


def export_streaming(
    ckpt_dir: str,
    step: int | None,
    out_dir: str,
    dtype: str = "bfloat16",
    tokenizer: Tokenizer | None = None,
    max_shard_size: int | str = "2GB",
) -> tuple[str, int]:
    """The parameters of checkpoint ``step`` (newest when None) as an HF directory, one layer at a time, every
    array's checksum checked against the checkpoint's meta.  Returns (out_dir, step)."""
    from ring_jax.train.checkpoint import Checkpointer, model_config_from_meta

    with Checkpointer(ckpt_dir, read_only=True) as ckpt:
        if step is None:
            step = ckpt.latest_step()
            if step is None:
                raise CheckpointError(f"no checkpoint in {ckpt_dir}")
        meta = ckpt.read_meta(step)
    if meta.get("param_layout") != PARAM_LAYOUT:
        raise CheckpointError(
            "checkpoint written before the decoder layers were stacked: export it without "
            "--stream (that path converts it)"
        )
    cfg = model_config_from_meta(meta)
    step_dir = os.path.join(os.path.abspath(ckpt_dir), str(step))
    arrays = _open_params(step_dir, cfg)
    ls = leaves(cfg)
    sums = {leaf.keys: Checksum() for leaf in ls}
    write_pretrained(cfg, _checkpoint_parts(cfg, arrays, sums), out_dir, tokenizer, dtype, max_shard_size)
    want = (meta.get("checksums") or {}).get("params")
    if want is not None:
        bad = [leaf.name for leaf, w in zip(ls, want) if sums[leaf.keys].value != w]
        if bad or len(want) != len(ls):
            shutil.rmtree(out_dir, ignore_errors=True)
            raise CheckpointError(
                f"{step_dir}: checksum mismatch in {len(bad)} arrays, e.g. {bad[:3]}; nothing was exported"
            )
    return out_dir, step


__all__ = ["Checksum", "Leaf", "check_tensors", "export_streaming", "import_hf_streaming", "leaves"]
