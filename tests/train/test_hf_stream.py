"""ring_jax.hf_stream (``--stream`` import/export, one layer at a time) against the normal path as the oracle:
the checkpoint it writes carries orbax's own metadata for the same model, restores through ``Checkpointer`` bit-equal
(with the checksums checked), and exports to the bytes ``save_pretrained`` writes.  Its running checksum equals
``tree_checksums`` over slices and past 2**32 words; damage and bad HF directories are refused before anything is
written or exported."""

import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts

from ring_jax.cli.export import export_checkpoint, restore_model
from ring_jax.cli.import_ckpt import import_hf
from ring_jax.config import get_preset
from ring_jax.hf import CheckpointError as HFError
from ring_jax.hf import save_pretrained
from ring_jax.hf_stream import Checksum, leaves
from ring_jax.model.transformer import build_model
from ring_jax.sharding import make_mesh
from ring_jax.train.checkpoint import CheckpointError, tree_checksums
from ring_jax.train.step import split_model

CASES = {
    # 3 stacked layers behind a dense first one, sharded over fsdp and expert, stored in bf16
    "mesh-bf16": (dict(num_hidden_layers=4), "fsdp:2,expert:4", "bfloat16"),
    # tied embeddings (no lm_head), one device, stored in f32
    "tied-f32": (dict(num_hidden_layers=3, tie_word_embeddings=True), None, "float32"),
}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    """(case, HF source dir, run dir of the normal import, run dir of the streamed import, mesh)."""
    over, mesh_spec, pdt = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    cfg = get_preset("tiny", **over)
    save_pretrained(build_model(cfg), str(root / "hf"), dtype="bfloat16")
    mesh = make_mesh(mesh_spec) if mesh_spec else None
    import_hf(str(root / "hf"), str(root / "normal"), param_dtype=pdt, mesh=mesh)
    import_hf(str(root / "hf"), str(root / "stream"), param_dtype=pdt, mesh=mesh, stream=True)
    return request.param, root, mesh


def _json(path):
    with open(path) as f:
        return json.load(f)


def test_streamed_checkpoint_has_orbax_metadata_and_restores_bit_equal(pair):
    case, root, mesh = pair
    a, b = root / "normal" / "ckpt" / "0", root / "stream" / "ckpt" / "0"
    assert sorted(os.listdir(b)) == sorted(os.listdir(a))
    # meta (config, runtime, source, step, checksums, layout), data and shardings: exactly what orbax wrote
    for f in ("meta/metadata", "data/metadata", "params/_sharding"):
        assert _json(b / f) == _json(a / f), f
    # the tree metadata: the same but for write_shape (orbax divides a replicated shard among its replicas)
    ta, tb = _json(a / "params/_METADATA"), _json(b / "params/_METADATA")
    for t in (ta, tb):
        for v in t["tree_metadata"].values():
            v["value_metadata"].pop("write_shape")
    assert tb == ta
    names = lambda d: [
        m["array_metadata"]["param_name"]
        for m in _json(d / "params/array_metadatas/process_0")[  # noqa: E731
            "array_metadatas"
        ]
    ]
    assert names(b) == names(a)
    # the zarr headers: equal but for the chunk grid (one layer per chunk in the stack)
    kv = lambda d: ts.KvStore.open({"driver": "ocdbt", "base": f"file://{d}/params/"}).result()  # noqa: E731
    ka, kb = kv(a), kv(b)
    headers = [k for k in ka.list().result() if k.endswith(b"/.zarray")]
    assert headers and sorted(headers) == sorted(k for k in kb.list().result() if k.endswith(b"/.zarray"))
    for k in headers:
        za, zb = json.loads(ka.read(k).result().value), json.loads(kb.read(k).result().value)
        za.pop("chunks"), zb.pop("chunks")
        assert zb == za, k
    # restore both through the Checkpointer (checksums verified on the way) into the mesh: every bit equal
    ma, _, _ = restore_model(str(root / "normal"), None, mesh)
    mb, _, _ = restore_model(str(root / "stream"), None, mesh)
    pa, pb = split_model(ma)[2], split_model(mb)[2]
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        assert x.dtype == y.dtype and x.sharding == y.sharding
        np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))


def test_streamed_export_writes_the_bytes_save_pretrained_writes(pair, tmp_path):
    case, root, mesh = pair
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    export_checkpoint(str(root / "normal"), str(out_a), max_shard_size="30KB")
    export_checkpoint(str(root / "stream"), str(out_b), max_shard_size="30KB", stream=True)
    files = sorted(os.listdir(out_a))
    assert sum(f.endswith(".safetensors") for f in files) > 1  # several shards: the index is exercised
    assert sorted(os.listdir(out_b)) == files
    for f in files:
        assert (out_b / f).read_bytes() == (out_a / f).read_bytes(), f
    # and the round trip HF (bf16) -> orbax -> HF (bf16) kept every tensor of the source
    src, got = _json(root / "hf" / "model.safetensors.index.json"), _json(out_b / "model.safetensors.index.json")
    assert set(got["weight_map"]) == set(src["weight_map"])
    from safetensors.numpy import load_file

    load_dir = lambda d: {
        k: v
        for f in os.listdir(d)
        if f.endswith(".safetensors")  # noqa: E731
        for k, v in load_file(str(d / f)).items()
    }
    s, g = load_dir(root / "hf"), load_dir(out_b)
    for k in s:
        np.testing.assert_array_equal(g[k].view(np.uint16), s[k].view(np.uint16), err_msg=k)


def test_running_checksum_equals_tree_checksums_over_slices_and_past_2_to_the_32():
    rng = np.random.default_rng(0)
    for dtype in (np.float32, ml_dtypes.bfloat16):
        x = rng.normal(size=(5, 7, 33)).astype(dtype)
        c = Checksum()
        for j in (3, 0, 4, 1, 2):  # slices of the leading axis, in any order
            c.add(x[j], j * 7 * 33)
        assert c.value == int(tree_checksums([x])[0])
    # the flat index wraps at 2**32 as jax's uint32 iota does; oracle: python integers
    w = rng.integers(0, 2**16, size=1000, dtype=np.uint16)
    offset = 2**32 - 300
    c = Checksum()
    c.add(w.view(ml_dtypes.bfloat16), offset)
    s1 = sum(int(v) * (((offset + n) % 2**32) * 2654435761 + 1) for n, v in enumerate(w)) % 2**32
    assert c.value == s1 ^ (int(w.astype(np.int64).sum()) * 40503 % 2**32)


@pytest.mark.parametrize("pair", ["mesh-bf16"], indirect=True)
def test_a_damaged_array_is_refused_by_export_and_restore(pair, tmp_path):
    case, root, mesh = pair
    import shutil

    run = tmp_path / "run"
    shutil.copytree(root / "stream", run)
    cfg = get_preset("tiny", **CASES[case][0])
    leaf = next(leaf for leaf in leaves(cfg) if leaf.name == "layers.mlp.experts_up")
    arr = ts.open(
        {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{run}/ckpt/0/params/", "path": leaf.name}},
        open=True,
    ).result()
    slab = arr[1].read().result()
    arr[1].write(slab * 2).result()  # a decodable file with wrong values: only the checksum can tell
    with pytest.raises(CheckpointError, match="checksum mismatch in 1 arrays.*experts_up"):
        export_checkpoint(str(run), str(tmp_path / "hf"), stream=True)
    assert not (tmp_path / "hf").exists()
    with pytest.raises(CheckpointError, match="experts_up"):
        restore_model(str(run), 0, mesh)


@pytest.mark.parametrize("pair", ["mesh-bf16"], indirect=True)
def test_a_bad_hf_directory_fails_before_anything_is_written(pair, tmp_path):
    case, root, mesh = pair
    import shutil

    hf = tmp_path / "hf"
    shutil.copytree(root / "hf", hf)
    index = _json(hf / "model.safetensors.index.json")
    index["weight_map"].pop("model.layers.2.mlp.experts.3.down_proj.weight")
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(HFError, match=r"missing tensor 'model.layers.2.mlp.experts.3.down_proj.weight'"):
        import_hf(str(hf), str(out), stream=True, overwrite=True)
    assert os.listdir(out) == ["keep"]
    # a shard cut short (the streaming reader's own header check, not safetensors'): named, still before writing
    shutil.copy(root / "hf" / "model.safetensors.index.json", hf / "model.safetensors.index.json")
    shard = hf / index["weight_map"]["model.layers.3.mlp.experts.0.up_proj.weight"]
    os.truncate(shard, os.path.getsize(shard) - 100)
    with pytest.raises(HFError, match=f"{shard.name}: unreadable safetensors file"):
        import_hf(str(hf), str(out), stream=True, overwrite=True)
    assert os.listdir(out) == ["keep"]


def test_the_plain_reader_reads_what_safetensors_reads(pair):
    from ring_jax.hf import SafetensorsReader

    case, root, mesh = pair
    plain = SafetensorsReader(str(root / "hf"), mmap=False, as_float32=False)
    mapped = SafetensorsReader(str(root / "hf"), as_float32=False)  # safetensors' own safe_open
    assert set(plain.where) == set(mapped.where)
    for name in plain.where:
        a, b = plain(name, plain.shape(name)), mapped(name, mapped.shape(name))
        assert a.dtype == b.dtype == ml_dtypes.bfloat16 and a.shape == b.shape
        np.testing.assert_array_equal(a.view(np.uint16), b.view(np.uint16))
