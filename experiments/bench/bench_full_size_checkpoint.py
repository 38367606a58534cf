"""A full-size ling-lite-1.5 checkpoint through a host with less RAM than the model (issue 17, item 3).

    python experiments/bench/bench_full_size_checkpoint.py --work=/tmp/fullsize [--preset=ling-lite-1.5] [--keep]

Each leg runs in its own process; its peak resident memory (``ru_maxrss`` from ``os.wait4``: every page it
touched, mapped file pages included) and wall time are reported:

1. ``generate``: a synthetic HF directory shaped like ling-lite-1.5 (the upstream tensor names and shapes, bf16,
   N(0, 0.02) values, <= 2 GB safetensors shards written one at a time by ``hf.write_pretrained``), with the sha256
   of every tensor's bytes recorded;
2. ``import``: ``ring-jax-import --stream --param_dtype=bfloat16`` onto a fake 8-device mesh (``--mesh``);
3. the HF source is deleted (so the disk holds at most two copies: about 67 GB at full size);
4. ``export``: ``ring-jax-export --stream`` (every array's checksum checked against the import's);
5. ``verify``: the sha256 of every exported tensor equals the source's (bit-equal round trip), names and shapes too.

Everything under --work is deleted at the end unless --keep.  ``--preset=small`` runs the same legs in seconds.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.abspath(__file__)


def _tensors(cfg, seed=0):
    """(HF name, bf16 array) of a random model in the order ``model_to_hf`` writes them, one at a time."""
    import ml_dtypes

    from ring_jax.hf import expected_shapes

    rng = np.random.default_rng(seed)
    for name, shape in expected_shapes(cfg).items():
        x = rng.standard_normal(size=shape, dtype=np.float32)
        x *= 0.02
        yield name, x.astype(ml_dtypes.bfloat16)


def _sha(arr) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).view(np.uint8).data).hexdigest()


def leg_generate(a):
    from ring_jax.config import get_preset
    from ring_jax.hf import write_pretrained

    cfg = get_preset(a.preset)
    hashes = {}

    def hashed():
        for i, (name, arr) in enumerate(_tensors(cfg)):
            hashes[name] = [_sha(arr), list(arr.shape)]
            if i % 500 == 0:
                print(f"  generate: {i} tensors", flush=True)
            yield name, arr

    write_pretrained(cfg, hashed(), os.path.join(a.work, "hf"), dtype="bfloat16", max_shard_size="2GB")
    with open(os.path.join(a.work, "source_sha256.json"), "w") as f:
        json.dump(hashes, f)


def leg_verify(a):
    import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16", which safetensors asks for by name)
    from safetensors import safe_open

    want = json.load(open(os.path.join(a.work, "source_sha256.json")))
    out = os.path.join(a.work, "hf_out")
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))["weight_map"]
    if set(index) != set(want):
        sys.exit(f"names differ: {sorted(set(index) ^ set(want))[:5]}")
    bad = []
    for shard in sorted(set(index.values())):
        with safe_open(os.path.join(out, shard), framework="numpy") as f:
            for name in f.keys():
                arr = f.get_tensor(name)
                if [_sha(arr), list(arr.shape)] != want[name] or str(arr.dtype) != "bfloat16":
                    bad.append(name)
    print(json.dumps({"tensors": len(want), "mismatched": len(bad), "examples": bad[:5]}))
    if bad:
        sys.exit(1)


def _run(cmd, env=None):
    """(wall seconds, peak RSS in GB, rc) of one child process; its output streams through."""
    t0 = time.time()
    p = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return time.time() - t0, usage.ru_maxrss / 1e6, p.returncode


def _du(path) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="scratch directory (deleted at the end unless --keep)")
    ap.add_argument("--preset", default="ling-lite-1.5")
    ap.add_argument("--mesh", default="fsdp:2,expert:4")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--leg", choices=["generate", "verify"], help=argparse.SUPPRESS)  # a child process
    a = ap.parse_args()
    if a.leg:
        return {"generate": leg_generate, "verify": leg_verify}[a.leg](a)
    if os.path.exists(a.work) and os.listdir(a.work):
        sys.exit(f"--work {a.work} is not empty")
    os.makedirs(a.work, exist_ok=True)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    py = sys.executable
    me = [py, HERE, f"--work={a.work}", f"--preset={a.preset}"]
    rows, sizes = [], {}
    legs = [
        ("generate HF (bf16)", me + ["--leg=generate"]),
        (
            "import --stream",
            [
                py,
                "-m",
                "ring_jax.cli.import_ckpt",
                f"--hf_dir={a.work}/hf",
                f"--out_dir={a.work}/run",
                "--param_dtype=bfloat16",
                "--stream",
                f"--mesh={a.mesh}",
            ],
        ),
        (
            "export --stream",
            [
                py,
                "-m",
                "ring_jax.cli.export",
                f"--ckpt_dir={a.work}/run",
                f"--out_dir={a.work}/hf_out",
                "--dtype=bfloat16",
                "--stream",
            ],
        ),
        ("verify sha256", me + ["--leg=verify"]),
    ]
    try:
        for name, cmd in legs:
            print(f"== {name}: {' '.join(cmd)}", flush=True)
            wall, rss, rc = _run(cmd, env)
            rows.append((name, wall, rss, rc))
            print(f"== {name}: {wall:.0f} s, peak RSS {rss:.2f} GB, rc {rc}", flush=True)
            if rc != 0:
                break
            if name.startswith("generate"):
                sizes["HF source"] = _du(f"{a.work}/hf")
            if name.startswith("import"):
                sizes["orbax checkpoint"] = _du(f"{a.work}/run")
                shutil.rmtree(f"{a.work}/hf")  # leave room for the export
            if name.startswith("export"):
                sizes["HF export"] = _du(f"{a.work}/hf_out")
    finally:
        if not a.keep:
            shutil.rmtree(a.work, ignore_errors=True)
    from ring_jax.config import get_preset, human

    cfg = get_preset(a.preset)
    print(
        f"\n{a.preset}: {human(cfg.param_counts()['total'])} parameters, mesh {a.mesh} (fake CPU devices), "
        f"host RAM {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB"
    )
    print("| leg | wall s | peak RSS GB | rc |\n|---|---|---|---|")
    for name, wall, rss, rc in rows:
        print(f"| {name} | {wall:.0f} | {rss:.2f} | {rc} |")
    print("sizes on disk (GB): " + ", ".join(f"{k} {v:.1f}" for k, v in sizes.items()))
    if any(r[3] != 0 for r in rows) or len(rows) < len(legs):
        sys.exit(1)


if __name__ == "__main__":
    main()
