"""ring-jax-fit: will it fit?  Compile the SFT train step, the RL rollout (prefill + decode with the KV cache) and the
RL train step (+ reference log-probs) for a preset on a mesh against abstract arrays (nothing allocated) and print
XLA's per-device memory analysis of each: parameters, optimizer state, batch / KV cache, temporaries, peak.

    ring-jax-fit --preset=ling-lite-1.5 --devices=64 --mesh=fsdp:8,expert:8 --seq_len=4096 --global_batch=64
    ring-jax-fit --flagfile=experiments/flags/fit_ling_lite_tpu.flags        # the Ring-lite recipe, 128 chips
    ring-jax-fit ... --target=v5p:4x4x4      # compile for a TPU topology (needs libtpu: pip install 'jax[tpu]')

``--target=cpu`` (default): the mesh is ``--devices`` fake CPU devices, so parameters, optimizer state, batch and KV
cache per device are exact, while temporaries are XLA:CPU's (it runs bf16 matmuls in float32, so they overstate a
TPU's).  ``--target=<tpu topology>`` compiles deviceless for that TPU slice with libtpu: the TPU compiler's own
figures.  The decoder layers after ``first_k_dense_replace`` run as one ``lax.scan``, so compile time does not grow
with depth and every program compiles at the preset's full layer count; each report gives its compile seconds.
``--noscan_layers`` compiles the same stacked parameters with the layers unrolled (compile time linear in depth), and
``--extrapolate`` compiles every program at 1 and 2 layers and extrapolates linearly to the preset's layer count
(memory is linear in layers: per-layer parameters, moments, KV cache, saved layer inputs and gradients), kept to
compare with the direct figures.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from absl import app, flags

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from ring_jax.config import ModelConfig
    from ring_jax.fit import Report

FLAGS = flags.FLAGS

HBM_GIB = {"v5e": 16.0, "v4": 32.0, "v6e": 32.0, "v5p": 95.0}


def define_flags() -> None:
    flags.DEFINE_string("preset", "ling-lite-1.5", "model preset")
    flags.DEFINE_string(
        "target",
        "cpu",
        "cpu (fake CPU devices) or a TPU topology for a deviceless compile with "
        "libtpu, e.g. v5p:4x4x4 (64 chips), v5p:4x4x8, v4:4x4x4, v5e:8x8",
    )
    flags.DEFINE_integer("devices", 64, "number of fake CPU devices (--target=cpu)")
    flags.DEFINE_string("mesh", "fsdp:8,expert:8", "mesh spec over the devices")
    flags.DEFINE_list("programs", ["sft", "rollout", "rl"], "what to compile: sft, rollout, rl (RL step + ref logp)")
    flags.DEFINE_integer("num_layers", 0, "override num_hidden_layers (0: the preset's)")
    flags.DEFINE_bool("extrapolate", False, "compile at 1 and 2 layers, extrapolate to the preset's layer count")
    flags.DEFINE_bool("remat", True, "rematerialise decoder layers")
    flags.DEFINE_string("remat_policy", "nothing", "what a rematerialised layer saves: nothing, dots, dots_no_batch")
    flags.DEFINE_bool("scan_layers", True, "run the stacked layers as one lax.scan (False: unrolled)")
    flags.DEFINE_integer("attn_chunk", 1024, "attention queries per chunk (0: all at once)")
    flags.DEFINE_integer("moe_chunk", 2048, "routed-expert positions per row per chunk (0: all at once)")
    flags.DEFINE_float("moe_capacity_factor", None, "expert-parallel capacity factor (default: dropless)")
    # SFT
    flags.DEFINE_integer("seq_len", 4096, "SFT row length")
    flags.DEFINE_integer("global_batch", 64, "SFT rows per step")
    flags.DEFINE_integer("micro_batches", 1, "SFT micro-batches per step")
    flags.DEFINE_integer("ce_chunk", 1024, "chunked cross-entropy / log-prob positions (0: full logits)")
    # rollout
    flags.DEFINE_integer(
        "num_slots", 0, "decode batch of the sampling engine, over the whole mesh (0: 8 per data-parallel shard)"
    )
    flags.DEFINE_integer("prefill_batch", 0, "prompts per prefill call (0: one per data-parallel shard)")
    flags.DEFINE_integer("prompt_len", 2048, "prompt tokens (bucketed to a power of two)")
    flags.DEFINE_integer("max_new_tokens", 24576, "response length limit (Ring-lite: 24,576; 32,768 code/science)")
    flags.DEFINE_integer("decode_chunk", 32, "decode steps per jitted call")
    # RL step
    flags.DEFINE_integer("rl_seq_len", 32768, "packed RL row length")
    flags.DEFINE_integer(
        "budget",
        409600,
        "C3PO token budget Phi (sets the RL rows: Phi / (rl_seq_len - "
        "prompt_len) rows, at least one per data-parallel shard x micro-batch)",
    )
    flags.DEFINE_integer("rl_micro_batches", 1, "RL micro-batches per step")
    flags.DEFINE_float("beta", 1e-3, "KL weight (> 0: the reference model is resident and its log-probs computed)")


def _target_devices():
    """(devices or None for the fake CPU ones, a description, ModelConfig overrides for the expert-parallel path the
    target would take)."""

    if FLAGS.target == "cpu":
        return None, f"{FLAGS.devices} fake CPU devices", {}
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=FLAGS.target)
    except Exception as e:  # noqa: BLE001 - libtpu missing or an unknown topology: say which
        raise app.UsageError(
            f"--target={FLAGS.target}: no TPU topology ({type(e).__name__}: {e}); a deviceless TPU "
            "compile needs libtpu (pip install 'jax[tpu]') and a name such as v5p:4x4x4"
        ) from None
    devs = list(topo.devices)
    # the expert-parallel path a TPU would take (ragged all_to_all when dropless), except on v5e / v6e: the TPU
    # compiler rejects ragged all-to-all there ("not supported in limited ICI routing settings"), so measure the
    # capacity all_to_all path (dropless unless --moe_capacity_factor)
    ep = dict(ep_platform="tpu", ep_auto_ragged="lite" not in getattr(devs[0], "device_kind", "").lower())
    return devs, f"TPU {FLAGS.target} ({len(devs)} x {getattr(devs[0], 'device_kind', 'TPU')}, deviceless compile)", ep


def _hbm():
    if FLAGS.target == "cpu":
        return HBM_GIB
    gen = FLAGS.target.split(":")[0]
    return {gen: HBM_GIB[gen]} if gen in HBM_GIB else HBM_GIB


def programs(cfg: ModelConfig, mesh: Mesh) -> list[tuple[str, Callable[[], list[Report]]]]:
    """``(name, compile)`` for every program named by --programs; ``compile()`` returns a list of reports."""
    from ring_jax import fit
    from ring_jax.rl.losses import PolicyLossConfig
    from ring_jax.rl.step import RLConfig
    from ring_jax.train.losses import LossConfig

    setup = fit.make_setup(cfg, mesh)
    dp = fit.data_parallel(setup)
    out = []
    if "sft" in FLAGS.programs:
        out.append(
            (
                "sft",
                lambda: [
                    fit.sft_step(
                        setup,
                        FLAGS.seq_len,
                        FLAGS.global_batch,
                        FLAGS.micro_batches,
                        LossConfig(ce_chunk=FLAGS.ce_chunk),
                    )
                ],
            )
        )
    if "rl" in FLAGS.programs:
        room = max(1, FLAGS.rl_seq_len - FLAGS.prompt_len)
        unit = dp * FLAGS.rl_micro_batches
        rows_needed = -(-FLAGS.budget // room)  # ceil divisions
        rows = -(-rows_needed // unit) * unit
        rl = RLConfig(policy=PolicyLossConfig(beta=FLAGS.beta), logit_chunk=FLAGS.ce_chunk)
        out.append(("rl", lambda: [fit.rl_step(setup, rl, rows, FLAGS.rl_seq_len, FLAGS.rl_micro_batches)]))
        if FLAGS.beta:
            out.append(("ref", lambda: [fit.ref_logp(setup, rows, FLAGS.rl_seq_len, FLAGS.ce_chunk)]))
    if "rollout" in FLAGS.programs:
        slots = FLAGS.num_slots or 8 * dp
        out.append(
            (
                "rollout",
                lambda: list(
                    fit.rollout(
                        setup,
                        slots,
                        FLAGS.prompt_len,
                        FLAGS.max_new_tokens,
                        FLAGS.prefill_batch or dp,
                        FLAGS.decode_chunk,
                        resident_ref=FLAGS.beta > 0,
                    )
                ),
            )
        )
    return out


def reports_for(cfg: ModelConfig, mesh: Mesh) -> list[Report]:
    """Every report, each printed as soon as it is compiled (with --extrapolate: at 1 and 2 layers)."""
    from ring_jax import fit

    if not FLAGS.extrapolate:
        progs = [(name, [fn]) for name, fn in programs(cfg, mesh)]
    else:
        one = programs(cfg.replace(num_hidden_layers=1), mesh)
        two = programs(cfg.replace(num_hidden_layers=2), mesh)
        progs = [(name, [f1, f2]) for (name, f1), (_, f2) in zip(one, two)]
    out = []
    for _, fns in progs:
        got = [fn() for fn in fns]
        reps = got[0] if len(got) == 1 else [fit.extrapolate(a, b, cfg.num_hidden_layers) for a, b in zip(*got)]
        for r in reps:
            print("\n".join(r.lines(_hbm())), flush=True)
        out.extend(reps)
    return out


def main(argv: list[str]) -> None:
    del argv
    from ring_jax.cli.common import quiet_library_logs
    from ring_jax.config import get_preset, human
    from ring_jax.sharding import ShardingError, make_mesh

    quiet_library_logs()
    devices, where, ep = _target_devices()
    over = dict(
        remat=FLAGS.remat,
        remat_policy=FLAGS.remat_policy,
        scan_layers=FLAGS.scan_layers,
        attn_chunk=FLAGS.attn_chunk,
        moe_chunk=FLAGS.moe_chunk,
        moe_capacity_factor=FLAGS.moe_capacity_factor,
        **ep,
    )
    if FLAGS.num_layers:
        over["num_hidden_layers"] = FLAGS.num_layers
    cfg = get_preset(FLAGS.preset, **over)
    try:
        mesh = make_mesh(FLAGS.mesh, devices=devices)
    except ShardingError as e:
        raise app.UsageError(f"--mesh: {e}") from None
    counts = cfg.param_counts()
    print(
        f"{FLAGS.preset}: {human(counts['total'])} parameters ({human(counts['active'])} active), "
        f"{cfg.num_hidden_layers} layers ({'scanned' if cfg.scan_layers else 'unrolled'}), dtype {cfg.dtype} / "
        f"params {cfg.param_dtype}, remat={cfg.remat} ({cfg.remat_policy}), "
        f"attn_chunk={cfg.attn_chunk}, moe_chunk={cfg.moe_chunk}, ce_chunk={FLAGS.ce_chunk}"
    )
    print(f"mesh {dict(mesh.shape)} on {where}")
    print("per device:", flush=True)
    reports_for(cfg, mesh)


def run() -> None:
    define_flags()
    # fake devices must be configured before jax initialises its backends
    argv = sys.argv
    target = next((a.split("=", 1)[1] for a in argv if a.startswith("--target=")), "cpu")
    n = next((a.split("=", 1)[1] for a in argv if a.startswith("--devices=")), "64")
    if target == "cpu" and not any(a.startswith("--flagfile") for a in argv):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # deviceless TPU compile: libtpu must not look for local chips or a metadata server
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    app.run(_main_with_flagfile_devices)


def _main_with_flagfile_devices(argv):
    """A flagfile may set --devices / --target: the fake CPU device count is only known after parsing, so it is
    applied here (before the first jax backend call)."""
    if FLAGS.target == "cpu" and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (
            f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={FLAGS.devices}"
        )
    main(argv)


if __name__ == "__main__":
    run()
