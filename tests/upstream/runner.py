"""Runs the upstream (trust_remote_code) BailingMoe with PyTorch + transformers 4.46, for parity tests.

Invoked in a subprocess by tests/upstream/test_upstream_parity.py with the interpreter named by
RING_JAX_UPSTREAM_PYTHON, so the project's own environment needs neither torch nor transformers.

  runner.py logits   UPSTREAM_DIR HF_DIR IN.npz OUT.npz   # logits (+ greedy generate) of an HF dir
  runner.py init     UPSTREAM_DIR CONFIG.json OUT_DIR      # a randomly initialised upstream model, saved
"""

import os
import shutil
import sys
import tempfile

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM


def _with_code(upstream_dir, hf_dir):
    tmp = tempfile.mkdtemp()
    d = os.path.join(tmp, "m")
    shutil.copytree(hf_dir, d)
    for f in ("modeling_bailing_moe.py", "configuration_bailing_moe.py"):
        shutil.copy(os.path.join(upstream_dir, f), d)
    return d


def logits(upstream_dir, hf_dir, inp, out):
    d = _with_code(upstream_dir, hf_dir)
    model = AutoModelForCausalLM.from_pretrained(
        d, trust_remote_code=True, torch_dtype=torch.float32, attn_implementation="eager"
    ).eval()
    data = np.load(inp)
    ids, mask = torch.tensor(data["ids"]), torch.tensor(data["mask"])
    res = {}
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        res["logits"] = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float().numpy()
        n = int(data["generate"])
        if n:
            g = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
            res["generated"] = g[:, ids.shape[1] :].numpy()
    np.savez(out, **res)


def init(upstream_dir, config_json, out_dir):
    d = _with_code(upstream_dir, os.path.dirname(config_json))
    cfg = AutoConfig.from_pretrained(d, trust_remote_code=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=True, torch_dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    model.save_pretrained(out_dir, safe_serialization=True)


if __name__ == "__main__":
    {"logits": logits, "init": init}[sys.argv[1]](*sys.argv[2:])
