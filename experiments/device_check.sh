#!/usr/bin/env bash
# Check the accelerator paths on whatever JAX sees (one GPU or TPU chip): the Pallas kernels compiled for real
# against their references, the SFT step's time and MFU, the engine's decode speed; one table at the end.
# Under 8 minutes on one H200.  From the repository root, with the project installed or on PYTHONPATH:
#   bash experiments/device_check.sh [--peak_tflops=989]        # --smoke: small shapes (interpret mode on CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"  # ring_jax, and ring_kernels in kernels/
exec timeout 480 "${PYTHON:-python}" experiments/device_check.py "$@"
