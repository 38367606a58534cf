"""ring-jax-pipeline: the README's main job.  The whole Ring-lite recipe, small, on a CPU:

  1. generate verifiable tasks (reasoning-gym chain sums of one-digit terms and countdown with numbers up to 15) with
     complete step-by-step worked solutions, split by problem: SFT solutions and RL prompts come from the train
     side, the held-out set (500 distinct problems per family) from the other (``ring_jax.data.splits``); the
     three files are written to ``data/`` (``--sft_truncated`` cuts a share of the solutions before their answer
     line: an ablation, off by default);
  2. train a BPE tokenizer on that corpus;
  3. long-CoT-style SFT of the ``small`` MoE preset on the worked solutions (ring-jax-sft), keeping
     ``--sft_checkpoints`` evenly spaced checkpoints, and each one's entropy on the RL prompts with the pick by
     Ring-lite's rule (ring-jax-sft-entropy; RL starts from the last one unless ``--rl_from=picked``);
  4. C3PO RL on the train-side prompts with verifiable rewards, measuring on the held-out set before and after:
     pass@1 (temperature 1.0, top-p 0.95), pass@8, greedy accuracy, length and unfinished answers, with 95%
     intervals (ring-jax-rl);
  5. export the final orbax checkpoint to a Hugging Face directory (ring-jax-export), reload it and sample from it
     (ring-jax-sample);
  6. write ``report.md`` and PNG plots (loss, reward, response length, held-out pass@1) into the run folder.

Each stage is the project's own CLI, run as a subprocess exactly as a user would run it; a stage whose output
already exists is skipped, so an interrupted pipeline continues where it stopped (--fresh starts over).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable

from absl import app, flags

FLAGS = flags.FLAGS
DEFAULT_FAMILIES = ["chain_sum_1d", "countdown_15"]


def define_flags() -> None:
    flags.DEFINE_string("out_dir", "runs/pipeline", "run folder")
    flags.DEFINE_integer("seed", 0, "seed of the whole run (model init, data order, sampling)")
    flags.DEFINE_list("families", DEFAULT_FAMILIES, "task families (ring_jax.data.tasks.FAMILIES)")
    flags.DEFINE_integer("sft_examples", 3000, "worked solutions per family for SFT (train-side problems)")
    flags.DEFINE_integer("rl_prompts", 2000, "RL prompts per family (train-side problems)")
    flags.DEFINE_float(
        "sft_truncated",
        0.0,
        "ablation: fraction of SFT worked solutions cut before their <answer> "
        "line (SFT imitates the habit, RL's verifier does not reward it); 0 = complete solutions",
        lower_bound=0.0,
        upper_bound=0.95,
    )
    flags.DEFINE_integer(
        "sft_steps",
        800,
        "SFT steps (copying operands from the prompt is learned at ~250-350; "
        "seed 0 at 800: held-out pass@1 0.296 chain_sum_1d, 0.059 countdown_15)",
    )
    flags.DEFINE_integer(
        "sft_checkpoints",
        4,
        "SFT checkpoints kept, evenly spaced (the RL start point is chosen "
        "among them by entropy on the RL prompts, as Ring-lite does)",
    )
    flags.DEFINE_enum(
        "rl_from",
        "last",
        ["last", "picked"],
        "SFT checkpoint RL starts from: the last, or the one "
        "ring-jax-sft-entropy picks by entropy (Ring-lite's rule; BUILD_NOTES, issue 16, compares them)",
    )
    flags.DEFINE_integer("sft_batch", 8, "SFT rows per step")
    flags.DEFINE_integer("seq_len", 256, "SFT row length")
    flags.DEFINE_float("sft_lr", 2e-3, "SFT peak learning rate")
    flags.DEFINE_integer("rl_steps", 45, "C3PO steps (BUILD_NOTES, issue 16: what they buy on the held-out set)")
    flags.DEFINE_enum(
        "selection_order",
        "informative_first",
        ["random", "informative_first"],
        "C3PO greedy order (informative_first: responses with non-zero advantage fill Phi first)",
    )
    flags.DEFINE_float("rl_lr", 5e-5, "RL learning rate (Ring-lite uses 3e-6 at 16.8B; a 22M model needs more)")
    flags.DEFINE_integer("rl_warmup_steps", 3, "RL warm-up steps (linear from 0, then constant: Ring-lite's schedule)")
    flags.DEFINE_integer("updates_per_rollout", 1, "C3PO updates per rollout, each on its own --budget tokens")
    flags.DEFINE_integer(
        "prompts_per_step",
        64,
        "RL prompts per step: the C3PO budget stays --budget tokens, filled "
        "informative responses first, so more prompts mean more prompts with signal in each update "
        "(BUILD_NOTES, issue 16: 64 against 16 on the same checkpoint)",
    )
    flags.DEFINE_integer("samples_per_prompt", 8, "RL responses per prompt")
    flags.DEFINE_integer("budget", 2048, "C3PO token budget per step")
    flags.DEFINE_integer(
        "max_new_tokens", 64, "response length limit (one token per digit: the longest worked solution is ~45 tokens)"
    )
    flags.DEFINE_integer(
        "eval_prompts",
        500,
        "held-out problems per family (distinct). Standard error of pass@1 "
        "measured: 0.008 / 0.004 (chain_sum_1d / countdown_15) at 1,000, 0.014 / 0.006 at 500",
    )
    flags.DEFINE_integer("eval_n", 8, "samples per held-out prompt (pass@1 and pass@eval_n)")
    flags.DEFINE_integer("eval_seed", 99_000, "seed of the held-out draw (the same for every --seed, so runs compare)")
    flags.DEFINE_string("preset", "small", "model preset")
    flags.DEFINE_bool("fresh", False, "delete the run folder first")
    flags.DEFINE_bool("progress_bar", True, "progress bars in the stages")


COMMANDS: list[tuple[str, str, str]] = []  # (stage, command line, what happened): the report's "Commands"


def _stage(name, argv, done_marker=None):
    cmd = "python -m " + " ".join(argv)
    if done_marker and os.path.exists(done_marker):
        print(f"== {name}: already done ({done_marker}), skipped", flush=True)
        COMMANDS.append((name, cmd, "skipped: already done"))
        return
    print(f"== {name}: {' '.join(argv)}", flush=True)
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", *argv])
    if r.returncode:
        print(f"error: stage {name} failed with exit status {r.returncode}", file=sys.stderr, flush=True)
        sys.exit(r.returncode)
    print(f"== {name}: done in {time.time() - t0:.0f}s", flush=True)
    COMMANDS.append((name, cmd, f"{time.time() - t0:.0f}s"))


def write_task_files(
    data_dir: str,
    families: Iterable[str],
    sft_examples: int,
    rl_prompts: int,
    eval_prompts: int,
    seed: int,
    eval_seed: int = 99_000,
    sft_truncated: float = 0.0,
) -> dict:
    """The pipeline's three data files: ``sft.jsonl`` (chat records of worked solutions), ``rl_prompts.jsonl`` and
    ``eval.jsonl`` (reward-ready prompt records).  SFT and RL problems are train-side, eval problems held-out-side
    and distinct (``ring_jax.data.splits``), so no eval problem is in either training file whatever the seeds.
    Returns their paths and the SFT records."""
    from ring_jax.data.tasks import make_task_records, truncate_solutions

    os.makedirs(data_dir, exist_ok=True)
    sft, rl, ev = [], [], []
    for i, fam in enumerate(families):
        sft += make_task_records(fam, sft_examples, seed=10_000 * (i + 1) + seed, split="train")
        rl += make_task_records(fam, rl_prompts, seed=10_000 * (i + 1) + 5_000 + seed, split="train")
        ev += make_task_records(fam, eval_prompts, seed=eval_seed + 1_000 * i, split="eval", distinct=True)
    cut = truncate_solutions(sft, sft_truncated, seed=seed) if sft_truncated else 0
    paths = {k: os.path.join(data_dir, f"{k}.jsonl") for k in ("sft", "rl_prompts", "eval")}
    with open(paths["sft"], "w") as f:
        for r in sft:
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": r["prompt"]},
                            {"role": "assistant", "content": r["solution"]},
                        ],
                        "family": r["family"],
                        "problem_key": r["problem_key"],
                    }
                )
                + "\n"
            )
    for name, recs in (("rl_prompts", rl), ("eval", ev)):
        with open(paths[name], "w") as f:
            for r in recs:
                f.write(
                    json.dumps({k: r[k] for k in ("task", "prompt", "answer", "gym", "family", "problem_key")}) + "\n"
                )
    return {"paths": paths, "sft": sft, "cut": cut}


def _write_data(out):
    from ring_jax.data import train_bpe

    if os.path.exists(os.path.join(out, "data", "eval.jsonl")):
        print(f"== data: already written ({out}/data), kept", flush=True)
        paths = {k: os.path.join(out, "data", f"{k}.jsonl") for k in ("sft", "rl_prompts", "eval")}
        sft = None
    else:
        t0 = time.time()
        w = write_task_files(
            os.path.join(out, "data"),
            FLAGS.families,
            FLAGS.sft_examples,
            FLAGS.rl_prompts,
            FLAGS.eval_prompts,
            FLAGS.seed,
            FLAGS.eval_seed,
            FLAGS.sft_truncated,
        )
        paths, sft = w["paths"], w["sft"]
        print(
            f"== data: {len(sft)} worked solutions ({w['cut']} cut before their answer, --sft_truncated="
            f"{FLAGS.sft_truncated}), {FLAGS.rl_prompts} RL prompts and {FLAGS.eval_prompts} distinct held-out "
            f"problems per family, disjoint by problem ({time.time() - t0:.0f}s)",
            flush=True,
        )
    tok_dir = os.path.join(out, "tokenizer")
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        if sft is None:
            sft = [
                {"prompt": m["messages"][0]["content"], "solution": m["messages"][1]["content"]}
                for m in map(json.loads, open(paths["sft"]))
            ]
        # the chat template's role words are in the corpus too, so "assistant" is one token, not four
        tok = train_bpe([f"user\n{r['prompt']}\nassistant\n{r['solution']}" for r in sft], vocab_size=512)
        tok.save(tok_dir)
    return paths, tok_dir


def _chat_prompts(tok_dir, texts, out):
    """Prompts rendered with the chat template the model was trained on, as prompt_ids records."""
    from ring_jax.data import load_tokenizer
    from ring_jax.data.chat import ChatRenderer

    r = ChatRenderer(load_tokenizer(tok_dir))
    path = os.path.join(out, "data", "sample_prompts.jsonl")
    with open(path, "w") as f:
        for t in texts:
            ids = [int(i) for i in r.render_prompt([{"role": "user", "content": t}])]
            f.write(json.dumps({"prompt": t, "prompt_ids": ids}) + "\n")
    return path, ",".join(map(str, r.stop_ids))


def main(argv: list[str]) -> None:
    del argv
    out = os.path.abspath(FLAGS.out_dir)
    if FLAGS.fresh:
        shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    t_start = time.time()
    print(f"== data + tokenizer -> {out}", flush=True)
    paths, tok_dir = _write_data(out)
    sft_jsonl = paths["sft"]
    bar = f"--progress_bar={str(FLAGS.progress_bar).lower()}"
    _stage(
        "SFT",
        [
            "ring_jax.cli.sft",
            f"--preset={FLAGS.preset}",
            f"--train_jsonl={sft_jsonl}",
            f"--tokenizer={tok_dir}",
            f"--steps={FLAGS.sft_steps}",
            f"--global_batch={FLAGS.sft_batch}",
            f"--seq_len={FLAGS.seq_len}",
            f"--lr={FLAGS.sft_lr}",
            "--warmup_ratio=0.02",
            f"--ckpt_every={max(1, FLAGS.sft_steps // max(1, FLAGS.sft_checkpoints))}",
            "--keep=0",
            f"--seed={FLAGS.seed}",
            f"--data_seed={FLAGS.seed}",
            f"--out_dir={out}/sft",
            "--peak_flops=0",
            bar,
        ],
        done_marker=os.path.join(out, "sft", "ckpt", str(FLAGS.sft_steps)),
    )
    entropy_json = os.path.join(out, "sft", "checkpoints.json")
    _stage(
        "SFT checkpoint entropy",
        [
            "ring_jax.cli.sft_entropy",
            f"--sft_dir={out}/sft",
            f"--prompts_jsonl={paths['rl_prompts']}",
            f"--tokenizer={tok_dir}",
            f"--max_new_tokens={FLAGS.max_new_tokens}",
            f"--seq_len={FLAGS.seq_len}",
            f"--seed={FLAGS.seed}",
        ],
        done_marker=entropy_json,
    )
    init_ckpt = f"{out}/sft/ckpt"
    if FLAGS.rl_from == "picked":
        with open(entropy_json) as f:
            init_ckpt = json.load(f)["picked_ckpt"]
    _stage(
        "C3PO RL",
        [
            "ring_jax.cli.rl",
            f"--init_ckpt={init_ckpt}",
            f"--tokenizer={tok_dir}",
            f"--prompts_jsonl={paths['rl_prompts']}",
            f"--eval_jsonl={paths['eval']}",
            f"--eval_n={FLAGS.eval_n}",
            f"--eval_seed={FLAGS.eval_seed}",
            "--eval_slots=256",
            # every response of a step in one engine batch (1.26x the rollout of 32 slots, issue 15), up
            # to 256 rows, the largest decode batch measured (issue 15)
            f"--num_slots={min(256, FLAGS.prompts_per_step * FLAGS.samples_per_prompt)}",
            f"--steps={FLAGS.rl_steps}",
            f"--lr={FLAGS.rl_lr}",
            f"--warmup_steps={FLAGS.rl_warmup_steps}",
            f"--updates_per_rollout={FLAGS.updates_per_rollout}",
            f"--prompts_per_step={FLAGS.prompts_per_step}",
            f"--samples_per_prompt={FLAGS.samples_per_prompt}",
            f"--budget={FLAGS.budget}",
            f"--selection_order={FLAGS.selection_order}",
            f"--max_new_tokens={FLAGS.max_new_tokens}",
            f"--seed={FLAGS.seed}",
            f"--ckpt_every={FLAGS.rl_steps}",
            f"--out_dir={out}/rl",
            bar,
        ],
        done_marker=os.path.join(out, "rl", "ckpt", str(FLAGS.rl_steps)),
    )
    _stage(
        "export",
        ["ring_jax.cli.export", f"--ckpt_dir={out}/rl", f"--out_dir={out}/hf", "--dtype=float32"],
        done_marker=os.path.join(out, "hf", "config.json"),
    )
    samples = os.path.join(out, "samples.jsonl")
    prompts, stop = _chat_prompts(tok_dir, ["7 + 5 - 9 =", "Use 3 7 5 to make 26."], out)
    _stage(
        "reload + sample",
        [
            "ring_jax.cli.sample",
            f"--hf_dir={out}/hf",
            f"--prompts_jsonl={prompts}",
            f"--stop_ids={stop}",
            "--temperature=0",
            f"--max_new_tokens={FLAGS.max_new_tokens}",
            f"--output_jsonl={samples}",
        ],
    )
    from ring_jax.cli.report import write_report

    top = " ".join(["ring-jax-pipeline", *sys.argv[1:]])
    path = write_report(out, elapsed_s=time.time() - t_start, commands=[("pipeline", top, "")] + COMMANDS)
    print(f"== report: {path} (total {time.time() - t_start:.0f}s)", flush=True)


def run() -> None:
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
