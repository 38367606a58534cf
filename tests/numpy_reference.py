"""An independent NumPy forward of the upstream BailingMoeForCausalLM (eval mode), for parity tests.

It reads the HF state dict (upstream names, torch [out, in] layouts) and the HF config dict, and follows the
upstream modeling_bailing_moe.py step by step: fused query_key_value split into Q|K|V head blocks, rotate-half RoPE
from a float32 cos/sin table, q / sqrt(d), float32 softmax, top-k on float32 router probabilities, a per-expert
loop, unweighted shared experts, norm_head applied to lm_head columns.  It shares no code with ring_jax.
"""

import numpy as np


def _rmsnorm(x, w, eps):
    x = x.astype(np.float64)
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _mlp(x, sd, prefix):
    g = x @ sd[prefix + "gate_proj.weight"].T
    u = x @ sd[prefix + "up_proj.weight"].T
    return (_silu(g) * u) @ sd[prefix + "down_proj.weight"].T


def _rope_tables(c, positions, seq_len):
    heads = c["num_attention_heads"]
    d = c.get("head_dim") or c["hidden_size"] // heads
    base = float(c["rope_theta"])
    rs = c.get("rope_scaling")
    t = positions.astype(np.float64)
    if rs is not None and rs["type"] == "linear":
        t = t / rs["factor"]
    if rs is not None and rs["type"] == "dynamic" and seq_len > c["max_position_embeddings"]:
        f = rs["factor"]
        base = base * ((f * seq_len / c["max_position_embeddings"]) - (f - 1)) ** (d / (d - 2))
    inv = 1.0 / base ** (np.arange(0, d, 2, dtype=np.float64) / d)
    fr = t[..., None] * inv
    emb = np.concatenate([fr, fr], -1)
    return np.cos(emb), np.sin(emb)


def _rot(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], -1)


def forward(c, sd, input_ids, attention_mask=None, forced_ids=None):
    """Logits [B, T, V] (float64) of the upstream model for ``input_ids`` [B, T]; ``attention_mask`` [B, T] of 0/1
    (left padding), positions = cumsum(mask) - 1 as the upstream generate does.  ``forced_ids`` [B, T, L, k]
    (routing replay, not an upstream feature): MoE layer l sends token (b, t) to experts forced_ids[b, t, l] instead
    of its top-k, weighted by its router probabilities there (renormalised as the top-k are); rows of -1 route by
    their own top-k."""
    b, t = input_ids.shape
    if attention_mask is None:
        attention_mask = np.ones((b, t), np.int64)
    positions = np.maximum(np.cumsum(attention_mask, -1) - 1, 0)
    heads = c["num_attention_heads"]
    kvh = c["num_key_value_heads"]
    d = c.get("head_dim") or c["hidden_size"] // heads
    eps = c["rms_norm_eps"]
    x = sd["model.word_embeddings.weight"][input_ids].astype(np.float64)
    cos, sin = _rope_tables(c, positions, t)
    causal = np.tril(np.ones((t, t), bool))
    allowed = causal[None] & (attention_mask[:, None, :] > 0)  # [B, T, T]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        hn = _rmsnorm(x, sd[p + "input_layernorm.weight"], eps)
        qkv = hn @ sd[p + "attention.query_key_value.weight"].T
        if c.get("use_qkv_bias"):
            qkv = qkv + sd[p + "attention.query_key_value.bias"]
        qkv = qkv.reshape(b, t, heads + 2 * kvh, d)
        q, k, v = qkv[:, :, :heads], qkv[:, :, heads : heads + kvh], qkv[:, :, heads + kvh :]
        q = q * cos[:, :, None] + _rot(q) * sin[:, :, None]
        k = k * cos[:, :, None] + _rot(k) * sin[:, :, None]
        out = np.zeros((b, t, heads, d))
        for hh in range(heads):
            kk, vv = k[:, :, hh // (heads // kvh)], v[:, :, hh // (heads // kvh)]
            s = np.einsum("btd,bsd->bts", q[:, :, hh] / np.sqrt(d), kk)
            s = np.where(allowed, s, np.finfo(np.float64).min)  # finite, as HF masks (pad rows stay finite)
            s = s - s.max(-1, keepdims=True)
            pr = np.exp(s)
            pr = pr / pr.sum(-1, keepdims=True)
            out[:, :, hh] = np.einsum("bts,bsd->btd", pr, vv)
        a = out.reshape(b, t, heads * d) @ sd[p + "attention.dense.weight"].T
        if c.get("use_bias"):
            a = a + sd[p + "attention.dense.bias"]
        x = x + a
        hn = _rmsnorm(x, sd[p + "post_attention_layernorm.weight"], eps)
        if c.get("num_experts") is not None and i >= c.get("first_k_dense_replace", 0):
            flat = hn.reshape(b * t, -1)
            logits = flat @ sd[p + "mlp.gate.weight"].T
            pr = np.exp(logits - logits.max(-1, keepdims=True))
            pr = pr / pr.sum(-1, keepdims=True)
            kk = c["num_experts_per_tok"]
            idx = np.argsort(-pr, axis=-1, kind="stable")[:, :kk]
            if forced_ids is not None:
                li = i - c.get("first_k_dense_replace", 0)
                f = np.asarray(forced_ids)[:, :, li].reshape(b * t, kk).astype(np.int64)
                idx = np.where(f[:, :1] >= 0, f, idx)
            w = np.take_along_axis(pr, idx, -1)
            if kk > 1 and c.get("norm_topk_prob", True):
                w = w / w.sum(-1, keepdims=True)
            y = np.zeros_like(flat)
            for e in range(c["num_experts"]):
                rows, slot = np.nonzero(idx == e)
                if len(rows):
                    y[rows] += w[rows, slot][:, None] * _mlp(flat[rows], sd, p + f"mlp.experts.{e}.")
            y = y.reshape(b, t, -1)
            if c.get("num_shared_experts") is not None:
                y = y + _mlp(hn, sd, p + "mlp.shared_experts.")
        else:
            y = _mlp(hn, sd, p + "mlp.")
        x = x + y
    x = _rmsnorm(x, sd["model.norm.weight"], eps)
    head = sd["model.word_embeddings.weight"] if c.get("tie_word_embeddings") else sd["lm_head.weight"]
    head = head.astype(np.float64)
    if c.get("norm_head"):
        head = head / (np.linalg.norm(head, axis=0, keepdims=True) + 1e-7)
    return x @ head.T


def load_state_dict(hf_dir):
    """All tensors of an HF directory as float64 NumPy arrays (safetensors, numpy framework)."""
    import json
    import os

    from safetensors.numpy import load_file

    sd = {}
    idx = os.path.join(hf_dir, "model.safetensors.index.json")
    files = sorted(set(json.load(open(idx))["weight_map"].values())) if os.path.exists(idx) else ["model.safetensors"]
    for f in files:
        sd.update({k: v.astype(np.float64) for k, v in load_file(os.path.join(hf_dir, f)).items()})
    return sd
