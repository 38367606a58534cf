"""ring-jax-rl-schedule: RL in stages, each stage a ring-jax-rl run that starts from the previous stage's final
checkpoint (Ring-lite-2507: long-CoT SFT -> reasoning RL -> general RL).

    ring-jax-rl-schedule --stages=experiments/flags/rl_two_stage_small_cpu.json --init_ckpt=runs/pipeline/sft \\
        --out_dir=runs/rl_two_stage
    ring-jax-rl-schedule --stages=... --out_dir=... -- --steps=2 --progress_bar=false   # flags for every stage
    ring-jax-rl-schedule --stages=... --out_dir=... --stop_after=reasoning              # only the first stage

Stages file (JSON)::

    {"description": "...",                           # optional
     "init_ckpt": "runs/pipeline/sft",               # optional: where stage 1 starts (--init_ckpt wins)
     "common": {"flagfile": "experiments/flags/rl_small_cpu.flags", "seed": 0},   # optional, every stage
     "stages": [{"name": "reasoning", "flags": {"tasks": ["chain_sum", "countdown"], "steps": 40}},
                {"name": "general", "flags": {"prompts_jsonl": "experiments/data/ifeval_small.jsonl"}}]}

Flags are ring-jax-rl flag names without dashes; a value is a string, number, boolean or list (joined with commas;
a list of flagfiles gives one ``--flagfile`` each).  Order on the command line: common, the stage's own, then the
extra flags after ``--``, so later ones win.  ``out_dir``, ``init_ckpt`` and ``resume`` belong to the driver: stage
``k`` runs in ``<out_dir>/<name>`` with ``--init_ckpt=<out_dir>/<previous name>/ckpt:<its final step>``.  Relative
paths are relative to the current directory (like every flagfile in ``experiments/``).

Before anything runs, every stage's command line is parsed with ring-jax-rl's own flag definitions (in a child
process) and the files it names are checked: a bad stages file, an unknown flag, a bad value or a missing file fails
in one line, exit status 2, with nothing started.

Resume: a stage whose final checkpoint (``ckpt/<steps>``) exists is skipped; one with earlier checkpoints continues
with ``--resume``.  So an interrupted schedule, or one with a stage appended, continues where it stopped.

Provenance: ring-jax-rl writes ``init.json`` (the checkpoint step it started from and the per-array checksums of the
parameters it loaded); after each stage the driver checks them against the checksums stored in the previous stage's
final checkpoint and fails if they differ, and a finished stage whose recorded start is not the previous stage's
current final checkpoint (the previous stage was re-run longer, say) stops the schedule with a one-line error.
``<out_dir>/schedule.json`` records each stage's command, start checkpoint, final step and status.

Each stage is a fresh process, so JAX would compile the same model programs again; the stages share a persistent
compilation cache in ``<out_dir>/jax_cache`` (``--compile_cache``; JAX_COMPILATION_CACHE_DIR set in the environment
wins).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

from absl import app, flags

from ring_jax.cli.common import die, usage

FLAGS = flags.FLAGS

DRIVER_OWNED = ("out_dir", "init_ckpt", "resume")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TOP_KEYS = {"description", "init_ckpt", "common", "stages"}
_STAGE_KEYS = {"name", "flags", "description"}
_PATH_FLAGS = ("prompts_jsonl", "eval_jsonl", "tokenizer", "hf_dir")


def define_flags() -> None:
    flags.DEFINE_string("stages", None, "stages file (JSON; see the module docstring)")
    flags.DEFINE_string("out_dir", "runs/rl_schedule", "run folder; stage k runs in <out_dir>/<stage name>")
    flags.DEFINE_string("init_ckpt", None, "checkpoint the first stage starts from (overrides the file's init_ckpt)")
    flags.DEFINE_string("stop_after", "", "run the stages up to and including this one")
    flags.DEFINE_bool("dry_run", False, "print each stage's command and state, run nothing")
    flags.DEFINE_bool("compile_cache", True, "share a persistent JAX compilation cache between the stages")


class StagesError(ValueError):
    """A stages file that cannot be run."""


# ---------------------------------------------------------------------------------------------- the stages file
def _flag_args(where: str, d) -> list[str]:
    if not isinstance(d, dict):
        raise StagesError(f"{where}: flags must be a JSON object of flag name -> value, got {type(d).__name__}")
    out = []
    for name, value in d.items():
        if not isinstance(name, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
            raise StagesError(f"{where}: bad flag name {name!r} (write it without dashes)")
        if name in DRIVER_OWNED:
            raise StagesError(f"{where}: flag {name!r} is set by the schedule itself; remove it")
        if name == "flagfile":
            files = value if isinstance(value, list) else [value]
            if not files or not all(isinstance(f, str) and f for f in files):
                raise StagesError(f"{where}: flagfile must be a path or a list of paths, got {value!r}")
            out += [f"--flagfile={f}" for f in files]
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float, str)):
            text = str(value)
        elif isinstance(value, list) and all(
            isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in value
        ):
            text = ",".join(str(v) for v in value)
        else:
            raise StagesError(
                f"{where}: flag {name!r} has an unsupported value {value!r} (string, number, boolean "
                "or a list of strings/numbers)"
            )
        out.append(f"--{name}={text}")
    return out


def load_stages(path: str) -> dict:
    """Parse and check a stages file -> {"init_ckpt", "stages": [{"name", "args"}]} (args without the driver's
    flags).  Raises StagesError with a one-line message."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise StagesError(f"stages file {path}: {e.strerror or e}") from None
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise StagesError(f"stages file {path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(spec, dict):
        raise StagesError(f"stages file {path}: the top level must be a JSON object with a 'stages' list")
    unknown = sorted(set(spec) - _TOP_KEYS)
    if unknown:
        raise StagesError(f"stages file {path}: unknown key(s) {unknown}; known: {sorted(_TOP_KEYS)}")
    init = spec.get("init_ckpt", "")
    if not isinstance(init, str):
        raise StagesError(f"stages file {path}: init_ckpt must be a string")
    common = _flag_args(f"stages file {path}: common", spec.get("common", {}))
    stages = spec.get("stages")
    if not isinstance(stages, list) or not stages:
        raise StagesError(f"stages file {path}: 'stages' must be a non-empty list")
    out, seen = [], set()
    for i, st in enumerate(stages):
        where = f"stages file {path}: stage {i + 1}"
        if not isinstance(st, dict):
            raise StagesError(f"{where}: must be an object with 'name' and 'flags'")
        unknown = sorted(set(st) - _STAGE_KEYS)
        if unknown:
            raise StagesError(f"{where}: unknown key(s) {unknown}; known: {sorted(_STAGE_KEYS)}")
        name = st.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise StagesError(
                f"{where}: 'name' must be a non-empty string of letters, digits, '_', '-', '.', got {name!r}"
            )
        if name in seen:
            raise StagesError(f"{where}: duplicate stage name {name!r}")
        seen.add(name)
        out.append({"name": name, "args": common + _flag_args(f"{where} ({name})", st.get("flags", {}))})
    return {"init_ckpt": init, "stages": out}


# ---------------------------------------------------------------------------------------------- flag validation
def _validate_child() -> None:
    """Child process: parse each stage's arguments with ring-jax-rl's flags; print {name: {"steps": n}} as JSON or
    one error line (exit 2).  Input on stdin: [[name, args], ...]."""
    from ring_jax.cli import rl
    from ring_jax.data.tasks import FAMILIES

    rl.define_flags()
    jobs = json.load(sys.stdin)
    out = {}
    for name, args in jobs:
        FLAGS.unparse_flags()
        try:
            rest = FLAGS(["ring-jax-rl", *args])
        except flags.Error as e:
            usage(f"stage {name!r}: {' '.join(str(e).split()).removeprefix('ERROR:: ')}")
        if len(rest) > 1:
            usage(f"stage {name!r}: unexpected arguments {rest[1:]}")
        for f in _PATH_FLAGS:
            p = getattr(FLAGS, f)
            if p and not os.path.exists(p):
                usage(f"stage {name!r}: --{f}={p}: no such file or directory")
        for fam in FLAGS.tasks + FLAGS.eval_tasks:
            if fam not in FAMILIES:
                usage(f"stage {name!r}: unknown task family {fam!r}; known: {', '.join(sorted(FAMILIES))}")
        if not FLAGS.tasks and not FLAGS.prompts_jsonl:
            usage(f"stage {name!r}: give tasks and/or prompts_jsonl")
        if FLAGS.steps < 1:
            usage(f"stage {name!r}: steps must be >= 1, got {FLAGS.steps}")
        out[name] = {"steps": FLAGS.steps}
    print(json.dumps(out))


def validate_stage_args(jobs: list[tuple[str, list[str]]], extra: list[str]) -> dict:
    """{name: {"steps": n}} for every stage, parsed by ring-jax-rl's own flag definitions; StagesError if any
    command line is bad."""
    code = "from ring_jax.cli.rl_schedule import _validate_child; _validate_child()"
    payload = json.dumps([[n, a + extra] for n, a in jobs])
    r = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True, text=True)
    if r.returncode:
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        msg = lines[-1] if lines else f"flag check failed with exit status {r.returncode}"
        raise StagesError(msg[len("error: ") :] if msg.startswith("error: ") else msg)
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- running
def _ckpt_steps(ckpt_dir: str) -> list[int]:
    """Committed checkpoint steps (orbax renames a step directory into place only when it is complete)."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit() and os.path.isdir(os.path.join(ckpt_dir, d)))


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _final_checksums(ckpt_dir: str, step: int) -> list[int]:
    from ring_jax.train.checkpoint import Checkpointer

    with Checkpointer(ckpt_dir, read_only=True) as c:
        return list((c.read_meta(step).get("checksums") or {}).get("params") or [])


def _stage_state(out: str, name: str, steps: int) -> str:
    done = _ckpt_steps(os.path.join(out, name, "ckpt"))
    if steps in done:
        return "done"
    return "partial" if done else "new"


def main(argv: list[str]) -> None:
    extra = list(argv[1:])
    if extra and extra[0] == "--":
        extra = extra[1:]
    if any(not a.startswith("--") for a in extra):
        die(f"extra arguments must be ring-jax-rl flags after '--', got {extra}", 2)
    if not FLAGS.stages:
        die("give --stages=FILE (a JSON stages file)", 2)
    try:
        spec = load_stages(FLAGS.stages)
        for a in extra:
            if a.lstrip("-").split("=", 1)[0] in DRIVER_OWNED + tuple("no" + d for d in DRIVER_OWNED):
                raise StagesError(f"extra flag {a!r} is set by the schedule itself; remove it")
        names = [s["name"] for s in spec["stages"]]
        if FLAGS.stop_after and FLAGS.stop_after not in names:
            raise StagesError(f"--stop_after={FLAGS.stop_after}: no such stage; stages: {', '.join(names)}")
        parsed = validate_stage_args([(s["name"], s["args"]) for s in spec["stages"]], extra)
    except StagesError as e:
        die(str(e), 2)
    init = FLAGS.init_ckpt if FLAGS.init_ckpt is not None else spec["init_ckpt"]
    if init and not os.path.exists(init.rsplit(":", 1)[0] if re.search(r":\d+$", init) else init):
        die(f"init_ckpt {init}: no such directory", 2)

    out = os.path.abspath(FLAGS.out_dir)
    env = dict(os.environ)
    if FLAGS.compile_cache and "JAX_COMPILATION_CACHE_DIR" not in env:
        env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(out, "jax_cache")
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    record_path = os.path.join(out, "schedule.json")
    record = {"stages_file": os.path.abspath(FLAGS.stages), "extra_flags": extra, "stages": []}
    prev_ckpt, prev_step = (init or None), None
    t_all = time.time()
    for k, st in enumerate(spec["stages"], 1):
        name, steps = st["name"], parsed[st["name"]]["steps"]
        run_dir = os.path.join(out, name)
        ckpt_dir = os.path.join(run_dir, "ckpt")
        init_ref = None
        if prev_ckpt:
            init_ref = f"{prev_ckpt}:{prev_step}" if prev_step is not None else prev_ckpt
        state = _stage_state(out, name, steps)
        cmd = [sys.executable, "-m", "ring_jax.cli.rl", *st["args"], *extra, f"--out_dir={run_dir}"]
        if init_ref:
            cmd.append(f"--init_ckpt={init_ref}")
        if state == "partial":
            cmd.append("--resume")
        entry = {"name": name, "out_dir": run_dir, "steps": steps, "init_ckpt": init_ref, "command": cmd[1:]}
        header = f"== stage {k}/{len(spec['stages'])} {name}"
        if FLAGS.dry_run:
            print(f"{header} [{state}]: {' '.join(cmd[1:])}", flush=True)
        elif state == "done":
            _check_recorded_start(name, run_dir, prev_ckpt, prev_step)
            print(f"{header}: already done ({ckpt_dir}/{steps}), skipped", flush=True)
            entry["status"] = "skipped (done)"
        else:
            print(f"{header}{' (resuming)' if state == 'partial' else ''}: {' '.join(cmd[1:])}", flush=True)
            os.makedirs(run_dir, exist_ok=True)
            t0 = time.time()
            r = subprocess.run(cmd, env=env)
            if r.returncode:
                entry["status"] = f"failed (exit status {r.returncode})"
                _write_record(record_path, record, entry)
                die(
                    f"stage {name} failed with exit status {r.returncode}; fix it and run the same command again "
                    "to continue from there",
                    r.returncode,
                )
            if steps not in _ckpt_steps(ckpt_dir):
                die(f"stage {name} exited without its final checkpoint {ckpt_dir}/{steps}")
            entry["status"] = "done"
            entry["seconds"] = round(time.time() - t0, 1)
            if prev_ckpt and prev_step is not None:
                entry["start_verified"] = _verify_start(name, run_dir, prev_ckpt, prev_step)
            print(f"{header}: done in {time.time() - t0:.0f}s; final checkpoint {ckpt_dir}/{steps}", flush=True)
        entry["final_ckpt"] = f"{ckpt_dir}:{steps}"
        if not FLAGS.dry_run:
            _write_record(record_path, record, entry)
        prev_ckpt, prev_step = ckpt_dir, steps
        if name == FLAGS.stop_after:
            break
    if not FLAGS.dry_run:
        print(
            f"== schedule done in {time.time() - t_all:.0f}s; final checkpoint {prev_ckpt}:{prev_step}; "
            f"record {record_path}",
            flush=True,
        )


def _write_record(path: str, record: dict, entry: dict) -> None:
    from ring_jax.cli.common import write_json

    record["stages"].append(entry)
    write_json(path, record)


def _check_recorded_start(name: str, run_dir: str, prev_ckpt, prev_step) -> None:
    """A finished stage must have started from the previous stage's CURRENT final checkpoint."""
    if not prev_ckpt or prev_step is None:
        return
    rec = _read_json(os.path.join(run_dir, "init.json"))
    want = (os.path.abspath(prev_ckpt), prev_step)
    got = (rec.get("init_ckpt"), rec.get("step")) if isinstance(rec, dict) else None
    if got != want:
        die(
            f"stage {name} is finished but started from {got[0] + ':' + str(got[1]) if got else 'an unknown point'}, "
            f"not from {want[0]}:{want[1]}; delete {run_dir} to run it again from there"
        )


def _verify_start(name: str, run_dir: str, prev_ckpt: str, prev_step: int) -> bool:
    """init.json of the stage == the checksums stored in the previous stage's final checkpoint."""
    rec = _read_json(os.path.join(run_dir, "init.json"))
    if not isinstance(rec, dict) or "params_checksums" not in rec:
        die(f"stage {name}: {run_dir}/init.json is missing; cannot show it started from {prev_ckpt}:{prev_step}")
    want = _final_checksums(prev_ckpt, prev_step)
    if (rec.get("init_ckpt"), rec.get("step")) != (os.path.abspath(prev_ckpt), prev_step) or rec[
        "params_checksums"
    ] != want:
        die(
            f"stage {name} did not start from {prev_ckpt}:{prev_step} (init.json: {rec.get('init_ckpt')}:"
            f"{rec.get('step')}, checksums {'equal' if rec['params_checksums'] == want else 'differ'})"
        )
    print(
        f"== stage {name} started from {prev_ckpt}:{prev_step}: {len(want)} parameter arrays, checksums equal",
        flush=True,
    )
    return True


def run() -> None:
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
