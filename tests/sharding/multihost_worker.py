"""One process of the 2-process x 4-CPU-device test (tests/sharding/test_multihost.py).

  python multihost_worker.py PROCESS_ID PORT OUT_JSON

Forms one global 8-device mesh over both processes (gloo collectives on 127.0.0.1), runs one sharded train step of
the tiny model on a fixed batch and writes the loss.  Any failure exits non-zero at once (a hung peer would
otherwise block the collective forever)."""

import json
import os
import sys
import traceback


def main(pid: int, port: int, out: str):
    os.environ["JAX_PLATFORMS"] = "cpu"
    from tests.flags import FAST_COMPILE  # the same compile flags as the 1-process x 8-device reference

    os.environ["XLA_FLAGS"] = FAST_COMPILE
    import jax

    jax.config.update("jax_num_cpu_devices", 4)
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=pid,
        initialization_timeout=int(os.environ.get("RING_JAX_TEST_INIT_TIMEOUT_S", "60")),
        heartbeat_timeout_seconds=20,
        shutdown_timeout_seconds=10,
    )
    from tests.sharding.multihost_common import run_step

    loss = run_step(process_index=pid, process_count=2)
    loss = float(loss.addressable_data(0))  # replicated: this process's copy
    with open(out, "w") as f:
        json.dump({"loss": loss, "devices": jax.device_count(), "local": jax.local_device_count()}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    try:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
    except BaseException:  # noqa: BLE001 - report and die fast, never hang the peer
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)
