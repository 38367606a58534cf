"""Max |logit difference| of ring_jax against the NumPy reference and (optionally) the real upstream code.

  python experiments/parity_report.py [--upstream_dir DIR --upstream_python PY]

Uses the tiny configurations of tests/model/test_hf_parity.py (GQA/MHA, dense-first, 0/1/2/None shared experts,
norm_head, biases, tied embeddings, linear/dynamic RoPE).  Prints a markdown table for BUILD_NOTES.md.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ring_jax.hf import load_pretrained, save_pretrained  # noqa: E402
from ring_jax.model import build_model  # noqa: E402
from tests import numpy_reference as ref  # noqa: E402
from tests.helpers import randomize  # noqa: E402
from tests.model.test_hf_parity import CASES  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--upstream_dir")
    ap.add_argument("--upstream_python", default=sys.executable)
    a = ap.parse_args()
    runner = os.path.join(os.path.dirname(__file__), "..", "tests", "upstream", "runner.py")
    print("| config | vs NumPy ref (dispatch) | vs NumPy ref (dense) | vs upstream torch |")
    print("|---|---|---|---|")
    for name, cfg in CASES.items():
        with tempfile.TemporaryDirectory() as tmp:
            model = randomize(build_model(cfg, seed=1), seed=2)
            ids = np.random.default_rng(0).integers(2, cfg.vocab_size, (2, 11))
            hf = save_pretrained(model, os.path.join(tmp, "hf"), dtype="float32")
            want = ref.forward(json.load(open(os.path.join(hf, "config.json"))), ref.load_state_dict(hf), ids)
            d1 = np.max(np.abs(np.asarray(load_pretrained(hf)[0](ids).logits) - want))
            d2 = np.max(np.abs(np.asarray(load_pretrained(hf, moe_impl="dense")[0](ids).logits) - want))
            up = "-"
            if a.upstream_dir:
                np.savez(os.path.join(tmp, "in.npz"), ids=ids, mask=np.ones_like(ids), generate=0)
                subprocess.run(
                    [
                        a.upstream_python,
                        runner,
                        "logits",
                        a.upstream_dir,
                        hf,
                        os.path.join(tmp, "in.npz"),
                        os.path.join(tmp, "out.npz"),
                    ],
                    check=True,
                    capture_output=True,
                )
                up_logits = np.load(os.path.join(tmp, "out.npz"))["logits"]
                up = f"{np.max(np.abs(np.asarray(load_pretrained(hf)[0](ids).logits) - up_logits)):.2e}"
            print(f"| {name} | {d1:.2e} | {d2:.2e} | {up} |")


if __name__ == "__main__":
    main()
