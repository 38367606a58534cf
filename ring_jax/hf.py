"""Hugging Face interop: ``save_pretrained`` / ``load_pretrained`` in the upstream BailingMoe layout.

Names and layouts are exactly those of the upstream ``modeling_bailing_moe.py`` state dict (torch ``Linear``
weights are ``[out, in]``; ``attention.query_key_value`` fuses all Q heads, then K heads, then V heads).  ring_jax
keeps q/k/v apart and experts stacked (``[E, in, out]``); this module is the only place that knows both layouts.

Loading streams: the model is built abstractly, then filled one decoder layer at a time from the safetensors shards,
so peak host memory stays near one copy of the parameters.  Missing, unexpected or wrongly shaped tensors and
config fields the model cannot honour are errors that name the tensor or field.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from numpy.typing import DTypeLike
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from ring_jax.config import ConfigError, ModelConfig
from ring_jax.model.transformer import BailingMoeForCausalLM, DecoderLayer, build_model

if TYPE_CHECKING:
    from ring_jax.data.tokenizer import Tokenizer

INDEX_NAME = "model.safetensors.index.json"
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


class CheckpointError(ValueError):
    """An HF directory does not match the model its config.json describes."""


def _np(x) -> np.ndarray:
    """A host copy in the parameter's own dtype (float32 or bfloat16): every layout change below is exact in any
    dtype, and the writer converts once (``as_dtype``)."""
    return np.asarray(jax.device_get(x))


def as_dtype(arr: np.ndarray, dtype: DTypeLike) -> np.ndarray:
    """``arr`` in ``dtype``, rounding once: float32 and ``dtype`` itself convert directly, anything else goes
    through float32 (so e.g. bfloat16 -> float16 rounds as bfloat16 -> float32 -> float16 always did)."""
    if arr.dtype == dtype or arr.dtype == np.float32:
        return arr.astype(dtype, copy=False)
    return arr.astype(np.float32).astype(dtype)


# ------------------------------------------------------------------------------------------------ name mapping
def layer_to_hf(cfg: ModelConfig, i: int, layer: DecoderLayer) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array in the parameter's dtype) of decoder layer ``i`` (a ring_jax DecoderLayer)."""
    p = f"model.layers.{i}."
    h, nh, d = cfg.hidden_size, cfg.num_attention_heads, cfg.head_size
    at = layer.attention
    yield p + "input_layernorm.weight", _np(layer.input_layernorm.weight[...])
    qkv = [_np(w[...]).reshape(h, -1).T for w in (at.q_proj, at.k_proj, at.v_proj)]
    yield p + "attention.query_key_value.weight", np.concatenate(qkv, axis=0)
    if cfg.use_qkv_bias:
        yield (
            p + "attention.query_key_value.bias",
            np.concatenate([_np(b[...]).reshape(-1) for b in (at.q_bias, at.k_bias, at.v_bias)]),
        )
    yield p + "attention.dense.weight", _np(at.o_proj[...]).reshape(nh * d, h).T
    if cfg.use_bias:
        yield p + "attention.dense.bias", _np(at.o_bias[...])
    yield p + "post_attention_layernorm.weight", _np(layer.post_attention_layernorm.weight[...])
    mlp = layer.mlp
    if cfg.is_moe_layer(i):
        yield p + "mlp.gate.weight", _np(mlp.gate[...]).T
        wg, wu, wd = _np(mlp.experts_gate[...]), _np(mlp.experts_up[...]), _np(mlp.experts_down[...])
        for e in range(cfg.num_experts):
            yield p + f"mlp.experts.{e}.gate_proj.weight", wg[e].T
            yield p + f"mlp.experts.{e}.up_proj.weight", wu[e].T
            yield p + f"mlp.experts.{e}.down_proj.weight", wd[e].T
        if cfg.num_shared_experts is not None:
            if mlp.shared is None:  # num_shared_experts == 0: the reference holds a zero-width MLP
                for n, shape in (("gate", (0, h)), ("up", (0, h)), ("down", (h, 0))):
                    yield p + f"mlp.shared_experts.{n}_proj.weight", np.zeros(shape, np.float32)
            else:
                yield from _mlp_to_hf(p + "mlp.shared_experts.", mlp.shared)
    else:
        yield from _mlp_to_hf(p + "mlp.", mlp)


def _mlp_to_hf(prefix, mlp):
    for n in ("gate", "up", "down"):
        yield prefix + f"{n}_proj.weight", _np(getattr(mlp, f"{n}_proj")[...]).T


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """Every tensor name the reference's state dict holds, with its shape."""
    h, nh, kvh, d, v = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads, cfg.head_size, cfg.vocab_size
    out = {"model.word_embeddings.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (v, h)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
        out[p + "attention.query_key_value.weight"] = ((nh + 2 * kvh) * d, h)
        if cfg.use_qkv_bias:
            out[p + "attention.query_key_value.bias"] = ((nh + 2 * kvh) * d,)
        out[p + "attention.dense.weight"] = (h, nh * d)
        if cfg.use_bias:
            out[p + "attention.dense.bias"] = (h,)
        if cfg.is_moe_layer(i):
            f = cfg.moe_intermediate_size
            out[p + "mlp.gate.weight"] = (cfg.num_experts, h)
            for e in range(cfg.num_experts):
                out[p + f"mlp.experts.{e}.gate_proj.weight"] = (f, h)
                out[p + f"mlp.experts.{e}.up_proj.weight"] = (f, h)
                out[p + f"mlp.experts.{e}.down_proj.weight"] = (h, f)
            if cfg.num_shared_experts is not None:
                fs = f * cfg.num_shared_experts
                out[p + "mlp.shared_experts.gate_proj.weight"] = (fs, h)
                out[p + "mlp.shared_experts.up_proj.weight"] = (fs, h)
                out[p + "mlp.shared_experts.down_proj.weight"] = (h, fs)
        else:
            fi = cfg.intermediate_size
            out[p + "mlp.gate_proj.weight"] = (fi, h)
            out[p + "mlp.up_proj.weight"] = (fi, h)
            out[p + "mlp.down_proj.weight"] = (h, fi)
    return out


def model_to_hf(model: BailingMoeForCausalLM) -> Iterator[tuple[str, np.ndarray]]:
    cfg = model.config
    yield "model.word_embeddings.weight", _np(model.word_embeddings[...])
    for i in range(cfg.num_hidden_layers):
        yield from layer_to_hf(cfg, i, model.layer(i))
    yield "model.norm.weight", _np(model.norm.weight[...])
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", _np(model.lm_head[...]).T


# ------------------------------------------------------------------------------------------------ save
def _parse_size(s) -> int:
    if isinstance(s, int):
        return s
    s = s.strip().upper()
    for unit, mul in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mul)
    return int(s)


def save_pretrained(
    model: BailingMoeForCausalLM,
    out_dir: str,
    tokenizer: Tokenizer | None = None,
    dtype: str = "bfloat16",
    max_shard_size: int | str = "2GB",
) -> str:
    """Write ``config.json``, safetensors shards and ``model.safetensors.index.json`` (and the tokenizer, if given:
    anything with ``save(dir)``).  Only JAX process 0 writes; the others return after the gathers."""
    return write_pretrained(model.config, model_to_hf(model), out_dir, tokenizer, dtype, max_shard_size)


def write_pretrained(
    cfg: ModelConfig,
    tensors: Iterator[tuple[str, np.ndarray]],
    out_dir: str,
    tokenizer: Tokenizer | None = None,
    dtype: str = "bfloat16",
    max_shard_size: int | str = "2GB",
) -> str:
    """:func:`save_pretrained` from ``(HF name, array)`` pairs in :func:`model_to_hf`'s order (consumed one shard at
    a time, so a caller may produce them lazily: ``ring_jax.hf_stream``)."""
    if dtype not in _NP_DTYPES:
        raise ValueError(f"dtype {dtype!r}: one of {sorted(_NP_DTYPES)}")
    np_dtype, limit = _NP_DTYPES[dtype], _parse_size(max_shard_size)
    writer = jax.process_index() == 0
    tmp = out_dir.rstrip("/") + ".partial"
    if writer:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    shard, shard_bytes, files, weight_map, total = {}, 0, [], {}, 0

    def flush():
        nonlocal shard, shard_bytes
        if shard and writer:
            name = f"shard-{len(files):05d}.tmp"
            save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
            files.append((name, list(shard)))
        shard, shard_bytes = {}, 0

    for name, arr in tensors:
        arr = np.ascontiguousarray(as_dtype(arr, np_dtype))
        if shard and shard_bytes + arr.nbytes > limit:
            flush()
        shard[name] = arr
        shard_bytes += arr.nbytes
        total += arr.nbytes
    flush()
    if not writer:
        return out_dir
    n = len(files)
    for j, (tmp_name, names) in enumerate(files):
        final = f"model-{j + 1:05d}-of-{n:05d}.safetensors"
        os.replace(os.path.join(tmp, tmp_name), os.path.join(tmp, final))
        weight_map.update({k: final for k in names})
    with open(os.path.join(tmp, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    cfg_dict = cfg.to_hf_dict()
    cfg_dict["torch_dtype"] = dtype
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg_dict, f, indent=2)
    if tokenizer is not None:
        tokenizer.save(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)  # replace atomically-ish: a crash leaves the old dir or the .partial
    os.replace(tmp, out_dir)
    return out_dir


# ------------------------------------------------------------------------------------------------ load
class SafetensorsReader:
    """Reads named tensors from the shards of an HF directory, opening each shard lazily.  At most ``max_open``
    shards stay open (least recently used closed first): an open shard is a memory map, and every page read
    through it counts in the process's resident memory until it is closed.  ``mmap=False`` reads with plain file
    reads instead (nothing stays resident; ``ring_jax.hf_stream``).  Tensors come as float32, or with
    ``as_float32=False`` in their stored dtype."""

    def __init__(self, hf_dir: str, max_open: int = 2, mmap: bool = True, as_float32: bool = True):
        idx = os.path.join(hf_dir, INDEX_NAME)
        single = os.path.join(hf_dir, "model.safetensors")
        self.handles, self.used, self.max_open = {}, set(), max(1, max_open)
        self.opener, self.as_float32 = (_open_shard if mmap else _PlainShard), as_float32
        if os.path.exists(idx):
            weight_map = _read_json(idx).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{idx}: no 'weight_map' object")
            self.where = {k: os.path.join(hf_dir, v) for k, v in weight_map.items()}
        elif os.path.exists(single):
            self.where = {k: single for k in self._open(single, "").keys()}
        else:
            raise CheckpointError(f"{hf_dir}: no {INDEX_NAME} or model.safetensors")

    def _open(self, path: str, name: str):
        if path in self.handles:
            self.handles[path] = self.handles.pop(path)  # most recently used last
            return self.handles[path]
        if not os.path.exists(path):
            raise CheckpointError(f"shard {path} (holding {name!r}) not found")
        while len(self.handles) >= self.max_open:
            self.handles.pop(next(iter(self.handles)))  # dropping the handle unmaps the file
        self.handles[path] = self.opener(path)
        return self.handles[path]

    def __call__(self, name: str, shape: tuple) -> np.ndarray:
        if name not in self.where:
            raise CheckpointError(f"missing tensor {name!r} (expected shape {shape})")
        arr = self._open(self.where[name], name).get_tensor(name)
        if tuple(arr.shape) != tuple(shape):
            raise CheckpointError(f"tensor {name!r} has shape {tuple(arr.shape)}, expected {tuple(shape)}")
        self.used.add(name)
        return arr.astype(np.float32) if self.as_float32 else arr

    def shape(self, name: str) -> tuple | None:
        """The stored shape of ``name`` (None when the index does not list it), from the shard's header only."""
        if name not in self.where:
            return None
        return tuple(self._open(self.where[name], name).get_slice(name).get_shape())

    def unexpected(self) -> list[str]:
        return sorted(set(self.where) - self.used)


def _open_shard(path: str):
    """A safetensors file opened for reading; CheckpointError naming it when it is damaged (e.g. truncated: the
    header promises more bytes than the file holds) instead of the library's bare SafetensorError."""
    try:
        return safe_open(path, framework="numpy")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None


_ST_DTYPES = {"F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16)}


class _PlainShard:
    """A safetensors file read with ``pread`` (the header, then one tensor's bytes at a time), never mapped: the
    same ``keys`` / ``get_tensor`` / ``get_slice(name).get_shape()`` as a ``safe_open`` handle, and the same
    CheckpointError naming the file when its header is unreadable or promises more bytes than the file holds."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if n <= 0 or 8 + n > size:
                    raise ValueError(f"header of {n} bytes in a file of {size}")
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            for name, t in header.items():
                b, e = t["data_offsets"]
                if t["dtype"] not in _ST_DTYPES:
                    raise ValueError(f"{name}: dtype {t['dtype']} (ring_jax reads F32, BF16, F16)")
                if e - b != int(np.prod(t["shape"])) * _ST_DTYPES[t["dtype"]].itemsize or 8 + n + e > size:
                    raise ValueError(f"{name}: bytes {b}..{e} do not fit its shape or the file")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None
        self.header, self.base = header, 8 + n

    def keys(self):
        return list(self.header)

    def get_slice(self, name: str):
        return _Shape(tuple(self.header[name]["shape"]))

    def get_tensor(self, name: str) -> np.ndarray:
        t = self.header[name]
        b, e = t["data_offsets"]
        buf = bytearray(e - b)
        with open(self.path, "rb") as f:
            f.seek(self.base + b)
            if f.readinto(buf) != e - b:
                raise CheckpointError(f"{self.path}: {name} is cut short")
        return np.frombuffer(buf, _ST_DTYPES[t["dtype"]]).reshape(t["shape"])


@dataclasses.dataclass(frozen=True)
class _Shape:
    shape: tuple

    def get_shape(self) -> tuple:
        return self.shape


def _read_json(path: str) -> dict:
    """A JSON object from ``path``; CheckpointError naming the file when it is unreadable or not an object."""
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read())
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def fill_layer(cfg: ModelConfig, i: int, layer: DecoderLayer, read: Callable, put: Callable) -> None:
    """Read decoder layer ``i``'s tensors with ``read(hf_name, shape)`` and hand each to ``put(variable, array)``
    in ring_jax's layout (``layer`` is a DecoderLayer, abstract or concrete, whose Variables name the targets)."""
    p = f"model.layers.{i}."
    shapes = expected_shapes(cfg)
    r = lambda n: read(p + n, shapes[p + n])  # noqa: E731
    h, nh, kvh, d = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads, cfg.head_size
    at = layer.attention
    put(layer.input_layernorm.weight, r("input_layernorm.weight"))
    put(layer.post_attention_layernorm.weight, r("post_attention_layernorm.weight"))
    qkv = r("attention.query_key_value.weight")
    q, k, v = np.split(qkv, [nh * d, (nh + kvh) * d], axis=0)
    put(at.q_proj, q.T.reshape(h, nh, d))
    put(at.k_proj, k.T.reshape(h, kvh, d))
    put(at.v_proj, v.T.reshape(h, kvh, d))
    if cfg.use_qkv_bias:
        qb, kb, vb = np.split(r("attention.query_key_value.bias"), [nh * d, (nh + kvh) * d])
        put(at.q_bias, qb.reshape(nh, d))
        put(at.k_bias, kb.reshape(kvh, d))
        put(at.v_bias, vb.reshape(kvh, d))
    put(at.o_proj, r("attention.dense.weight").T.reshape(nh, d, h))
    if cfg.use_bias:
        put(at.o_bias, r("attention.dense.bias"))
    mlp = layer.mlp
    if cfg.is_moe_layer(i):
        put(mlp.gate, r("mlp.gate.weight").T)
        for n, attr in (("gate", "experts_gate"), ("up", "experts_up"), ("down", "experts_down")):
            put(getattr(mlp, attr), np.stack([r(f"mlp.experts.{e}.{n}_proj.weight").T for e in range(cfg.num_experts)]))
        if cfg.num_shared_experts is not None:
            if mlp.shared is None:
                for n in ("gate", "up", "down"):
                    r(f"mlp.shared_experts.{n}_proj.weight")
            else:
                for n in ("gate", "up", "down"):
                    put(getattr(mlp.shared, f"{n}_proj"), r(f"mlp.shared_experts.{n}_proj.weight").T)
    else:
        for n in ("gate", "up", "down"):
            put(getattr(mlp, f"{n}_proj"), r(f"mlp.{n}_proj.weight").T)


def module_variables(module: nnx.Module) -> dict:
    """{path: Variable} of a module (the module's own Variable objects)."""
    return {path: v for path, v in nnx.iter_graph(module) if isinstance(v, nnx.Variable)}


def load_config(hf_dir: str, **runtime: Any) -> ModelConfig:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"{hf_dir}: no config.json")
    return ModelConfig.from_hf_dict(_read_json(path), **runtime)


def load_pretrained(
    hf_dir: str,
    dtype: str | None = None,
    param_dtype: str | None = None,
    shardings: Callable[[Sequence[str | None], Sequence[int]], jax.sharding.Sharding] | None = None,
    **runtime: Any,
) -> tuple[BailingMoeForCausalLM, ModelConfig]:
    """Model and config from an HF directory written by ``save_pretrained`` or by the upstream code.

    ``dtype``/``param_dtype`` choose compute and storage dtypes (default float32 both).  ``shardings``, when given,
    is a callable ``(logical_axes, shape) -> jax.sharding.Sharding`` placing each parameter as it is loaded."""
    if dtype is not None:
        runtime["dtype"] = dtype
    if param_dtype is not None:
        runtime["param_dtype"] = param_dtype
    elif dtype is not None:
        runtime.setdefault("param_dtype", dtype)
    cfg = load_config(hf_dir, **runtime)
    model = nnx.eval_shape(lambda: build_model(cfg))
    pdt = jnp.dtype(cfg.param_dtype)
    read = SafetensorsReader(hf_dir)
    shapes = expected_shapes(cfg)

    def on_host(var: nnx.Param, arr: np.ndarray):
        want = var.get_value().shape
        if tuple(arr.shape) != tuple(want):
            raise CheckpointError(f"internal layout mismatch: {arr.shape} vs {want}")
        var.set_value(arr.astype(pdt) if pdt != jnp.bfloat16 else arr.astype(ml_dtypes.bfloat16))

    def put(var: nnx.Param, arr: np.ndarray):
        on_host(var, arr)
        value = var.get_value()
        if shardings is not None:
            var.set_value(jax.device_put(value, shardings(var.logical_axes, value.shape)))
        else:
            var.set_value(jnp.asarray(value))

    put(model.word_embeddings, read("model.word_embeddings.weight", shapes["model.word_embeddings.weight"]))
    k = cfg.num_first_layers
    for i in range(k):
        fill_layer(cfg, i, model.first_layers[i], read, put)
    # the stacked layers: each filled on the host into its slice of one buffer per parameter, placed once complete
    bufs: dict = {}
    one = nnx.eval_shape(lambda: DecoderLayer(cfg, k, nnx.Rngs(params=0)))  # every parameter is set per layer
    for i in range(k, cfg.num_hidden_layers):
        fill_layer(cfg, i, one, read, on_host)
        for path, var in module_variables(one).items():
            a = var.get_value()
            bufs.setdefault(path, np.empty((cfg.num_hidden_layers - k,) + a.shape, a.dtype))[i - k] = a
    for path, var in module_variables(model.layers).items():
        put(var, bufs.pop(path))
    put(model.norm.weight, read("model.norm.weight", shapes["model.norm.weight"]))
    if not cfg.tie_word_embeddings:
        put(model.lm_head, read("lm_head.weight", shapes["lm_head.weight"]).T)
    extra = [n for n in read.unexpected() if not (cfg.tie_word_embeddings and n == "lm_head.weight")]
    if extra:
        raise CheckpointError(
            f"unexpected tensors not used by the model: {extra[:8]}"
            + (f" (+{len(extra) - 8} more)" if len(extra) > 8 else "")
        )
    return model, cfg


__all__ = [
    "CheckpointError",
    "ConfigError",
    "expected_shapes",
    "load_config",
    "load_pretrained",
    "model_to_hf",
    "SafetensorsReader",
    "as_dtype",
    "fill_layer",
    "module_variables",
    "save_pretrained",
    "write_pretrained",
]
