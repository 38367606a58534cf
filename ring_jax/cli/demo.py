"""ring-jax-demo: build a model, run a forward pass, export it to a Hugging Face directory, reload it and check that
the reloaded model gives the same logits: the one-minute smoke check (the README's main job is ring-jax-pipeline)."""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags, logging

flags.DEFINE_string("preset", "small", "model preset: tiny, small or ling-lite-1.5 (abstract count only)")
flags.DEFINE_string("out_dir", "runs/demo", "where the HF directory is written")
flags.DEFINE_integer("seed", 0, "parameter seed")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    import jax
    import numpy as np

    from ring_jax.config import ConfigError, get_preset, human
    from ring_jax.hf import load_pretrained, save_pretrained
    from ring_jax.model import build_model

    try:
        cfg = get_preset(FLAGS.preset)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    counts = cfg.param_counts()
    print(f"preset {FLAGS.preset}: {human(counts['total'])} total / {human(counts['active'])} activated parameters")
    if FLAGS.preset == "ling-lite-1.5":
        return
    t0 = time.time()
    model = build_model(cfg, seed=FLAGS.seed)
    tokens = np.random.default_rng(FLAGS.seed).integers(0, cfg.vocab_size, (2, 64))
    logits = np.asarray(model(tokens).logits)
    print(
        f"forward [2, 64] -> logits {logits.shape} in {time.time() - t0:.1f}s (jax {jax.__version__}, "
        f"{jax.device_count()} {jax.default_backend()} devices)"
    )
    out = save_pretrained(model, os.path.join(FLAGS.out_dir, "hf"), dtype="float32")
    print(f"exported HF directory: {out} ({', '.join(sorted(os.listdir(out)))})")
    reloaded, _ = load_pretrained(out)
    diff = float(np.max(np.abs(np.asarray(reloaded(tokens).logits) - logits)))
    print(f"reloaded from HF: max |logit difference| = {diff:.2e}")
    if diff > 1e-5:
        sys.exit("error: the reloaded model does not reproduce the logits")
    logging.info("demo finished")


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
