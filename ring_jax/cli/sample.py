"""ring-jax-sample: generate from a Hugging Face BailingMoe directory with the ring_jax sampling engine.

    python -m ring_jax.cli.sample --hf_dir runs/demo/hf --prompt "Hello" --max_new_tokens 64 --temperature 0.7
    python -m ring_jax.cli.sample --hf_dir DIR --prompts_jsonl prompts.jsonl --n 4 --output_jsonl out.jsonl

``--prompts_jsonl`` records carry ``prompt`` (text, needs a tokenizer) or ``prompt_ids`` (token ids).  Output
records: prompt_index, sample_index, prompt_ids, ids, text (null without a tokenizer), logprobs (sampling
distribution), raw_logprobs (temperature-1 policy), finish_reason.  Text streams to the terminal after every decode
chunk.  Bad input exits with a one-line ``error: ...`` and status 1.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from absl import app, flags

if TYPE_CHECKING:
    from ring_jax.data.tokenizer import Tokenizer

flags.DEFINE_string("hf_dir", None, "Hugging Face directory (config.json + safetensors) to sample from")
flags.DEFINE_string("checkpoint_dir", None, "orbax run or ckpt directory (ring-jax-sft / ring-jax-rl); newest step")
flags.DEFINE_string("tokenizer", None, "tokenizer.json / tokenizer.model / directory (default: the one in --hf_dir)")
flags.DEFINE_multi_string("prompt", [], "prompt text (repeatable)")
flags.DEFINE_multi_string("prompt_ids", [], "prompt as comma-separated token ids (repeatable)")
flags.DEFINE_string("prompts_jsonl", None, "JSONL file of records with 'prompt' (text) or 'prompt_ids'")
flags.DEFINE_float("temperature", 1.0, "sampling temperature; 0 = greedy")
flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass (1 = off)")
flags.DEFINE_integer("top_k", 0, "top-k sampling (0 = off)")
flags.DEFINE_integer("max_new_tokens", 128, "tokens to generate at most per sample")
flags.DEFINE_integer("n", 1, "samples per prompt (they share one prefill)")
flags.DEFINE_integer("seed", 0, "PRNG seed")
flags.DEFINE_bool("ignore_eos", False, "do not stop on the model's / tokenizer's eos")
flags.DEFINE_list("stop_ids", [], "extra stop token ids")
flags.DEFINE_string("output_jsonl", None, "write one record per sample here")
flags.DEFINE_integer("num_slots", 16, "concurrent sequences (continuous batching)")
flags.DEFINE_integer("chunk", 16, "decode steps per jitted call (streaming granularity)")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")
flags.DEFINE_string("moe_impl", None, "MoE compute path for sampling (dispatch, dense, ragged, pallas)")
flags.DEFINE_bool("stream", True, "stream generated text to the terminal")
FLAGS = flags.FLAGS


class UsageError(ValueError):
    pass


def _ids(text: str, where: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise UsageError(f"{where}: token ids must be integers, got {text!r}") from None


# Any: without ring_jax.data (never in a normal install) the result is the duck-typed _Tok below, not a Tokenizer
def load_any_tokenizer(path: str) -> Tokenizer | Any:
    try:
        from ring_jax.data.tokenizer import load_tokenizer
    except ImportError:  # pragma: no cover - the data package predates this CLI in the normal install
        load_tokenizer = None
    if load_tokenizer is not None:
        return load_tokenizer(path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file {path!r} does not exist")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(path)

    class _Tok:
        eos_id = None

        def encode(self, text):
            return tok.encode(text, add_special_tokens=False).ids

        def decode(self, ids, skip_special_tokens=False):
            return tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    return _Tok()


def read_prompts(tokenizer: Tokenizer | Any | None) -> list[tuple[str | None, list[int]]]:
    """(text or None, ids) for every prompt from --prompt, --prompt_ids and --prompts_jsonl."""
    out = []

    def from_text(text, where):
        if tokenizer is None:
            raise UsageError(
                f"{where}: text prompts need a tokenizer (--tokenizer, or tokenizer.json in --hf_dir); "
                f"or pass prompt_ids"
            )
        return text, list(tokenizer.encode(text))

    for i, t in enumerate(FLAGS.prompt):
        out.append(from_text(t, f"--prompt #{i}"))
    for i, t in enumerate(FLAGS.prompt_ids):
        out.append((None, _ids(t, f"--prompt_ids #{i}")))
    if FLAGS.prompts_jsonl:
        if not os.path.isfile(FLAGS.prompts_jsonl):
            raise UsageError(f"--prompts_jsonl {FLAGS.prompts_jsonl!r} does not exist")
        with open(FLAGS.prompts_jsonl) as f:
            for ln, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{FLAGS.prompts_jsonl}:{ln}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UsageError(f"{where}: not JSON ({e.msg})") from None
                if isinstance(rec, dict) and "prompt_ids" in rec:
                    ids = rec["prompt_ids"]
                    if not isinstance(ids, list) or not all(isinstance(x, int) for x in ids):
                        raise UsageError(f"{where}: 'prompt_ids' must be a list of integers")
                    out.append((rec.get("prompt"), ids))
                elif isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
                    out.append(from_text(rec["prompt"], where))
                else:
                    raise UsageError(f"{where}: a record needs 'prompt' (text) or 'prompt_ids'")
    if not out:
        raise UsageError("no prompts: give --prompt, --prompt_ids or --prompts_jsonl")
    for i, (_, ids) in enumerate(out):
        if not ids:
            raise UsageError(f"prompt {i} is empty")
    return out


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    try:
        _main()
    except KeyboardInterrupt:
        sys.exit("interrupted")


def _main():
    from ring_jax.config import ConfigError
    from ring_jax.hf import CheckpointError
    from ring_jax.sampling import SamplingError

    expected = (UsageError, SamplingError, CheckpointError, ConfigError, FileNotFoundError)
    try:
        _generate()
    except expected as e:
        sys.exit(f"error: {e}")
    except ValueError as e:  # tokenizer parse errors and the like
        sys.exit(f"error: {e}")


def _generate():
    ckpt_model = None
    if FLAGS.checkpoint_dir:
        if not os.path.exists(FLAGS.checkpoint_dir):
            raise UsageError(f"checkpoint not found: --checkpoint_dir {FLAGS.checkpoint_dir!r} does not exist")
        from ring_jax.cli.export import restore_model
        from ring_jax.train.checkpoint import CheckpointError

        try:
            ckpt_model, run_dir, _ = restore_model(FLAGS.checkpoint_dir, dtype=FLAGS.dtype)
        except (CheckpointError, FileNotFoundError, ValueError) as e:
            raise UsageError(f"--checkpoint_dir: {e}") from None
        src = os.path.join(run_dir, "tokenizer")
    else:
        if not FLAGS.hf_dir:
            raise UsageError("give --hf_dir (a Hugging Face directory) or --checkpoint_dir (an orbax run)")
        if not os.path.isfile(os.path.join(FLAGS.hf_dir, "config.json")):
            raise UsageError(f"checkpoint not found: no config.json in --hf_dir {FLAGS.hf_dir!r}")
        src = FLAGS.hf_dir

    tok_path = FLAGS.tokenizer
    if tok_path is None:
        for name in ("tokenizer.json", "tokenizer.model"):
            if os.path.isfile(os.path.join(src, name)):
                tok_path = src
                break
    tokenizer = load_any_tokenizer(tok_path) if tok_path else None
    prompts = read_prompts(tokenizer)

    from ring_jax.hf import load_config
    from ring_jax.sampling import SamplingParams

    cfg = ckpt_model.config if ckpt_model is not None else load_config(FLAGS.hf_dir)
    for i, (_, ids) in enumerate(prompts):  # fail before loading weights / compiling
        if len(ids) >= cfg.max_position_embeddings:
            raise UsageError(
                f"prompt {i} has {len(ids)} tokens: longer than the context "
                f"(max_position_embeddings={cfg.max_position_embeddings})"
            )
    stops = tuple(_ids(x, "--stop_ids")[0] for x in FLAGS.stop_ids)
    tok_eos = getattr(tokenizer, "eos_id", None) if tokenizer is not None else None
    if tok_eos is not None and not FLAGS.ignore_eos:
        stops += (int(tok_eos),)
    sp = SamplingParams(
        temperature=FLAGS.temperature,
        top_p=FLAGS.top_p,
        top_k=FLAGS.top_k,
        max_new_tokens=FLAGS.max_new_tokens,
        n=FLAGS.n,
        stop_token_ids=stops,
        ignore_eos=FLAGS.ignore_eos,
    )

    import jax

    from ring_jax.hf import load_pretrained
    from ring_jax.sampling import SamplingEngine

    t0 = time.time()
    if ckpt_model is not None:
        model = ckpt_model
    else:
        model, cfg = load_pretrained(FLAGS.hf_dir, dtype=FLAGS.dtype)
    engine = SamplingEngine.from_model(model, num_slots=FLAGS.num_slots, chunk=FLAGS.chunk, moe_impl=FLAGS.moe_impl)
    print(
        f"loaded {FLAGS.checkpoint_dir or FLAGS.hf_dir} in {time.time() - t0:.1f}s; "
        f"{len(prompts)} prompt(s) x {FLAGS.n} sample(s) "
        f"on {jax.default_backend()}",
        file=sys.stderr,
    )

    single = len(prompts) * FLAGS.n == 1
    streamed: dict[tuple[int, int], list[int]] = {}

    def render(ids):
        return tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids))

    def on_tokens(p, s, new, finished):
        if not FLAGS.stream:
            return
        ids = streamed.setdefault((p, s), [])
        before = render(ids) if tokenizer is not None else None
        ids.extend(new)
        if tokenizer is not None:
            text = render(ids)
            delta = text[len(before) :] if text.startswith(before) else text
        else:
            delta = (" " if before is None and len(ids) > len(new) else "") + render(new)
        if single:
            sys.stdout.write(delta + ("\n" if finished else ""))
        else:
            sys.stdout.write(f"[{p}.{s}{' done' if finished else ''}] {delta}\n")
        sys.stdout.flush()

    t1 = time.time()
    out = engine.generate([ids for _, ids in prompts], sp, key=FLAGS.seed, on_tokens=on_tokens)
    dt = time.time() - t1
    ntok = sum(len(c.token_ids) for c in out)
    print(
        f"generated {ntok} tokens in {dt:.2f}s ({ntok / max(dt, 1e-9):.1f} tokens/s incl. compilation); "
        f"finish: " + ", ".join(f"{r}={sum(c.finish_reason == r for c in out)}" for r in ("stop", "length")),
        file=sys.stderr,
    )
    if FLAGS.output_jsonl:
        d = os.path.dirname(os.path.abspath(FLAGS.output_jsonl))
        os.makedirs(d, exist_ok=True)
        with open(FLAGS.output_jsonl, "w") as f:
            for c in out:
                ids = c.token_ids.tolist()
                f.write(
                    json.dumps(
                        {
                            "prompt_index": c.prompt_index,
                            "sample_index": c.sample_index,
                            "prompt": prompts[c.prompt_index][0],
                            "prompt_ids": c.prompt_ids,
                            "ids": ids,
                            "text": tokenizer.decode(ids) if tokenizer is not None else None,
                            "logprobs": c.logprobs.tolist(),
                            "raw_logprobs": c.raw_logprobs.tolist(),
                            "finish_reason": c.finish_reason,
                        }
                    )
                    + "\n"
                )
        print(f"wrote {len(out)} records to {FLAGS.output_jsonl}", file=sys.stderr)


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
