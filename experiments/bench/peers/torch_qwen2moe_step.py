"""Peer side of bench_train.py: a Hugging Face transformers Qwen2-MoE training step (forward + backward + torch
AdamW, float32, CPU), driven over stdin/stdout so the parent can interleave its timings with ring_jax's.

Run by the peer interpreter (/work/refvenv/bin/python: torch + transformers 4.46, which has Qwen2-MoE but not
Qwen3-MoE).  Protocol, one JSON object per line:
  child -> parent, once ready:  {"ready": true, "params": ..., "active_params": ..., "torch": ..., ...}
  parent -> child:              {"cmd": "time", "steps": K}
  child -> parent:              {"seconds": [wall s per step], "cpu_seconds": process CPU s of the K steps, "loss"}
  parent -> child:              {"cmd": "peak", "n": 2048, "reps": 5}   child -> parent: {"flops": ...}
  parent -> child:              {"cmd": "quit"}
"""

import argparse
import json
import sys
import time


def main():
    p = argparse.ArgumentParser()
    for name, default in (
        ("vocab", 1024),
        ("hidden", 256),
        ("layers", 4),
        ("heads", 8),
        ("kv_heads", 2),
        ("experts", 8),
        ("topk", 2),
        ("moe_ffn", 256),
        ("shared_ffn", 0),
        ("batch", 8),
        ("seq", 256),
        ("threads", 2),
        ("seed", 0),
        ("warmup", 2),
    ):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--rope_theta", type=float, default=10000.0)
    p.add_argument("--attn", default="sdpa", help="attn_implementation: sdpa or eager")
    a = p.parse_args()

    import torch
    import transformers
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    cfg = Qwen2MoeConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.moe_ffn,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        max_position_embeddings=max(1024, a.seq),
        rope_theta=a.rope_theta,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        use_sliding_window=False,
        decoder_sparse_step=1,
        moe_intermediate_size=a.moe_ffn,
        shared_expert_intermediate_size=a.shared_ffn,
        num_experts_per_tok=a.topk,
        num_experts=a.experts,
        norm_topk_prob=True,
        output_router_logits=False,
        mlp_only_layers=[],
        initializer_range=0.02,
        attn_implementation=a.attn,
        torch_dtype=torch.float32,
    )
    model = Qwen2MoeForCausalLM(cfg).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(a.seed)
    tokens = torch.randint(0, a.vocab, (a.batch, a.seq), generator=gen)

    def step():
        out = model(input_ids=tokens, labels=tokens, use_cache=False)  # CE over the next token (shift inside)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    for _ in range(a.warmup):
        step()
    n_params = sum(t.numel() for t in model.parameters())
    expert = 3 * a.hidden * a.moe_ffn
    active = n_params - a.layers * (a.experts - a.topk) * expert
    send(
        {
            "ready": True,
            "params": n_params,
            "active_params": active,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "attn": model.config._attn_implementation,
        }
    )
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "time":
            secs, loss = [], None
            c0 = time.process_time()
            for _ in range(cmd["steps"]):
                t0 = time.perf_counter()
                loss = step()
                secs.append(time.perf_counter() - t0)
            send({"seconds": secs, "cpu_seconds": time.process_time() - c0, "loss": loss})
        elif cmd["cmd"] == "peak":
            n = cmd.get("n", 2048)
            x, y = torch.randn(n, n), torch.randn(n, n)
            torch.mm(x, y)
            best = float("inf")
            for _ in range(cmd.get("reps", 5)):
                t0 = time.perf_counter()
                torch.mm(x, y)
                best = min(best, time.perf_counter() - t0)
            send({"flops": 2.0 * n**3 / best})
        elif cmd["cmd"] == "quit":
            break


def send(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
