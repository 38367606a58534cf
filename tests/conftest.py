"""Test set-up: 8 fake CPU devices and fast XLA compiles (tests/flags.py), which must happen before jax is imported
anywhere, and shared fixtures."""

import os

from tests.flags import with_fast_compile

os.environ["XLA_FLAGS"] = with_fast_compile(
    (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip())
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
