"""experiments/bench/run_all.py: every benchmark's output (recorded from real --quick runs of the scripts) becomes the
right table rows; a missing peer, a crash, a timeout or unexpected output become rows instead of exceptions; the
markdown table reads back; and one real ``--quick`` run of the cheapest benchmark writes a table that parses."""

import os

from experiments.bench import run_all
from experiments.bench.run_all import Outcome, parse_table
from tests.flags import FAST_COMPILE

CTX = {"quick": False, "peer": None, "peer_missing": run_all.PEER_MISSING}

MOE_OUT = """MoE layer fwd+bwd, 2048 tokens, hidden 256, expert width 256, top-2, float32, 1 x cpu
| experts | dispatch ms | dispatch_gather ms | ragged ms | dense ms | dense / dispatch | dispatch GFLOP/s | dispatch min ms |
|---|---|---|---|---|---|---|---|
| 8 | 45.0 | 60.1 | 90.3 | 180.2 | 4.0x | 10.1 | 44.0 |
| 16 | 50.2 | 70.4 | 160.9 | 350.7 | 7.0x | 9.0 | 49.0 |
| 64 | 64.4 | 130.0 | 1500.0 | 1803.2 | 28.0x | 7.1 | 63.0 |
dispatch time at 64 experts / at 8: 1.43x median, 1.43x min
"""

SAMPLING_OUT = """jax 0.10.2 on cpu (2 CPUs, load average 7.0); sizes {'layers': 4}; batch 4, prompt 8, 16 new tokens, float32
[main] ring_jax engine (dispatch, chunk 32, cache 24): 0.47s -> 137 tokens/s (1 decode calls, 0.27 CPU-s)
[torch] skipped: pass --torch_python (an interpreter with torch and transformers)
RESULTS {"ring_jax_tokens_per_s": 136.72, "continuous_over_static": 1.11, "continuous_over_static_all": 0.83}
"""

GMM_OUT = """backend=cpu (cpu) T=64 k=2 E=8 H=64 F=32 M=128 dtype=float32 tiling=(32, 32, 32) fwd group sizes min/max=7/28
   pallas_gmm:     0.652 ms         98124 tokens/s     0.001 TFLOP/s
   ragged_dot:     1.447 ms         44229 tokens/s     0.000 TFLOP/s
 dense_einsum:     0.386 ms        165970 tokens/s     0.001 TFLOP/s
max |pallas - ragged_dot| = 1.192e-06 (max |ragged_dot| = 4.024e+00)
"""

RL_OUT = """jax 0.10.2 on cpu (2 CPUs, load average 6.6); model tiny (2 layers, hidden 32, 4 experts top-2, vocab 128); \
2 prompts x 4 samples x <= 8 new tokens; 8 stop ids (expected response length 6.3); Phi = 25; baselines take 4 \
responses; beta 0.001; 3 steps each
RESULTS {"budget": 25, "expected_response_len": 6.29, "c3po": {"tokens_mean": 25.0, "tokens_std": 0.0, \
"tokens_min": 25.0, "tokens_max": 25.0, "tokens": [25.0, 25.0, 25.0], "rows": [2, 2, 2], "step_s": 0.0453, \
"first_step_s": 22.29, "rollout_s": 0.0131, "reward_s": 0.0070, "reference_s": 0.0072, "train_s": 0.0176}, \
"seq_mean": {"tokens_mean": 26.67, "tokens_std": 5.56, "tokens_min": 19.0, "tokens_max": 32.0, \
"tokens": [19.0, 29.0, 32.0], "rows": [2, 2, 2], "step_s": 0.0409, "first_step_s": 11.43, "rollout_s": 0.0096, \
"reward_s": 0.0035, "reference_s": 0.0072, "train_s": 0.0201}}
"""

DECODE_OUT = """jax 0.10.2 on cpu (2 CPUs, load average 4.2); sizes {'layers': 4}; prompt 32, 8 new tokens, cache 40, \
float32, rows [4, 8]
RESULTS {"rows": [4, 8], "matmul_peak_gflops": 61.4, "read_gb_s": 6.88, "limit_ms_4": 4.80, "limit_kv_ms_4": 4.85, \
"limit_ms_8": 4.80, "limit_kv_ms_8": 4.90, "engine": {"4": {"rows": 4, "tok_s": 234.4, "ms_step": 14.78, \
"decode_moe": "capacity", "frac": 0.325, "frac_kv": 0.328, "hf_tok_s": 128.3, "noshared_tok_s": 407.8, \
"tunix_tok_s": 105.1}, "8": {"rows": 8, "tok_s": 578.7, "ms_step": 13.22, "decode_moe": "capacity", "frac": 0.60, \
"frac_kv": 0.61, "hf_tok_s": 208.6, "tunix_error": "(exit 1): boom"}}, "scaling": 2.47}
"""


def _train_json(with_peer: bool) -> dict:
    mine = {"tokens_per_s": 569.0, "tokens_per_s_cpu_norm": 3464.0, "mfu_cpu_norm": 0.32}
    res = {
        "ring_jax[dispatch]": mine,
        "ring_jax[dense]": {"tokens_per_s": 308.0, "tokens_per_s_cpu_norm": 1794.0, "mfu_cpu_norm": 0.17},
    }
    if with_peer:
        mine.update(x_transformers=0.64, x_transformers_cpu=0.59)
        res["transformers"] = {"tokens_per_s": 987.0, "tokens_per_s_cpu_norm": 5878.0, "mfu_cpu_norm": 0.57}
    return {"args": {"batch": 8, "seq": 256}, "results": res}


def _by(rows, word):
    hits = [r for r in rows if word in r.benchmark]
    assert len(hits) == 1, [r.benchmark for r in rows]
    return hits[0]


def test_moe_rows_scaling_and_dense_ratio():
    rows = run_all.parse_moe(MOE_OUT, None, CTX)
    scale = _by(rows, "/ at 8")
    assert scale.ratio == "1.43x" and scale.met == "no" and "64.4 ms / 45.0 ms" in scale.ring_jax
    assert "2048 tokens" in scale.benchmark
    dense = _by(rows, "dense all-experts")
    assert dense.ratio == "28.0x faster" and dense.met == "yes" and dense.peer == "dense 1803.2 ms"
    quick = run_all.parse_moe(MOE_OUT, None, dict(CTX, quick=True))
    assert {r.met for r in quick} == {"n/a (--quick)"}


def test_train_rows_with_and_without_the_peer():
    rows = run_all.parse_train("", _train_json(True), CTX)
    hf = _by(rows, "vs HF transformers")
    assert hf.ratio.startswith("0.64x") and hf.met == "no" and hf.peer.startswith("987 tok/s")
    assert "569 tok/s" in hf.ring_jax and "MFU 32%" in hf.ring_jax
    assert _by(rows, "ring_jax[dense] vs").ratio == "0.54x"
    assert _by(rows, "Tunix").met == "not measured"
    alone = _by(run_all.parse_train("", _train_json(False), CTX), "vs HF transformers")
    assert alone.peer == run_all.PEER_MISSING and "pip install torch==2.13.0 transformers==4.46.3" in alone.peer
    assert alone.ratio == "-" and alone.met == "not measured"
    fast_wall = _train_json(True)
    fast_wall["results"]["ring_jax[dispatch]"].update(x_transformers=1.3, x_transformers_cpu=1.05)
    assert _by(run_all.parse_train("", fast_wall, CTX), "vs HF transformers").met == "no"  # wall alone is not enough
    fast_wall["results"]["ring_jax[dispatch]"].update(x_transformers_cpu=1.25)
    assert _by(run_all.parse_train("", fast_wall, CTX), "vs HF transformers").met == "yes"


def test_sampling_rows_with_and_without_the_peer():
    rows = run_all.parse_sampling(SAMPLING_OUT, None, CTX)
    main = _by(rows, "HF transformers generate")
    assert main.ring_jax == "137 tok/s" and main.peer == run_all.PEER_MISSING and "batch 4, prompt 8" in main.benchmark
    assert _by(rows, "continuous vs static").ratio == "1.11x"
    with_peer = SAMPLING_OUT.replace('"continuous_over_static"', '"hf_tokens_per_s": 50.0, "continuous_over_static"')
    main = _by(run_all.parse_sampling(with_peer, None, dict(CTX, peer="/some/python")), "HF transformers generate")
    assert main.peer == "50 tok/s" and main.ratio == "2.73x" and main.met == "no"


def test_decode_scaling_rows():
    rows = run_all.parse_decode_scaling(
        DECODE_OUT, None, dict(CTX, peer="/some/python", tunix=None, tunix_missing=run_all.TUNIX_MISSING)
    )
    hf4 = _by(rows, "4 rows (prompt 32, 8 new): ring_jax vs HF")
    assert hf4.ratio == "1.83x" and hf4.met == "no" and "32% of the limit (4.8 ms)" in hf4.ring_jax
    hf8 = _by(rows, "8 rows (prompt 32, 8 new): ring_jax vs HF")
    assert hf8.ratio == "2.77x" and hf8.met == "yes"  # >= 2x HF and >= 50% of the limit
    assert _by(rows, "4 rows: ring_jax vs Tunix").ratio == "3.88x"
    tunix8 = _by(rows, "8 rows: ring_jax vs Tunix")
    assert tunix8.met == "not measured" and "boom" in tunix8.peer
    assert _by(rows, "at 8 rows / at 4 rows").met == "no"  # 2.47x < 6x


def test_gmm_and_rl_rows():
    gmm = run_all.parse_gmm(GMM_OUT, None, CTX)[0]
    assert gmm.ratio == "2.22x" and gmm.met.startswith("n/a (CPU") and "1.192e-06" in gmm.ring_jax
    rows = run_all.parse_rl(RL_OUT, None, CTX)
    budget = _by(rows, "tokens per optimiser step")
    assert budget.met == "yes" and budget.ring_jax == "c3po 25 +- 0.0 (25-25)" and budget.ratio == "std 0.0 vs 5.6"
    step = _by(rows, "RL step")
    assert "2 prompts x 4 samples x <= 8 tokens" in step.benchmark and step.ring_jax.startswith("0.05 s/step")
    # a C3PO run that missed the budget on some step is reported as not met
    off = RL_OUT.replace('"tokens_std": 0.0, "tokens_min": 25.0', '"tokens_std": 1.0, "tokens_min": 23.0')
    assert _by(run_all.parse_rl(off, None, CTX), "tokens per optimiser step").met == "no"


def test_failures_become_rows_not_exceptions():
    bench = run_all.BY_NAME["rl"]
    crashed = run_all.rows_for(bench, Outcome(["x"], 1, 3.0, "", "Traceback ...\nMemoryError"), CTX)
    assert len(crashed) == 1 and crashed[0].met == "error" and "MemoryError" in crashed[0].ring_jax
    hung = run_all.rows_for(bench, Outcome(["x"], None, 600.0, "", ""), CTX)
    assert hung[0].ring_jax == "timed out after 600 s"
    garbled = run_all.rows_for(bench, Outcome(["x"], 0, 1.0, "RESULTS {not json", ""), CTX)
    assert garbled[0].met == "error" and "not understood" in garbled[0].ring_jax


def test_missing_peer_interpreter_is_reported():
    py, why = run_all.find_peer("/nonexistent/python")
    assert py is None and "/nonexistent/python" in why


def test_table_reads_back_with_pipes_in_cells():
    rows = run_all.parse_gmm(GMM_OUT, None, CTX) + [run_all.Row("a | b", "x", ratio="1.0x")]
    back = parse_table("intro\n\n" + run_all.markdown_table(rows) + "\n\nafter")
    assert [b["benchmark"] for b in back] == [r.benchmark for r in rows]
    assert back[0]["ratio"] == "2.22x" and back[1]["peer"] == "-"


def test_quick_run_of_the_cheapest_benchmark_writes_a_table(tmp_path, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", FAST_COMPILE)  # one CPU device, fast compiles
    out = tmp_path / "RESULTS.md"
    assert run_all.main(["--quick", "--only", "gmm", "--out", str(out)]) == 0
    text = out.read_text()
    assert "Machine: " in text and "jax " in text and "cores" in text
    (row,) = parse_table(text)
    assert row["benchmark"].startswith("grouped matmul (cpu)") and row["met"].startswith("n/a")
    assert float(row["ratio"].rstrip("x")) > 0 and row["ring_jax"].startswith("pallas_gmm ")
    assert "bench_gmm.py --iters 1` (exit 0" in text and os.path.isfile(out)


def test_tunix_rows_filled_failed_or_missing():
    """With --tunix_python the scripts' Tunix figures become ratios; a failed Tunix run says why; without it, the
    rows say 'not measured' (never a made-up figure)."""
    js = _train_json(True)
    js["results"]["ring_jax[dispatch]"].update(x_tunix=3.9, x_tunix_cpu=3.2)
    js["results"]["tunix"] = {"tokens_per_s": 961.0, "tokens_per_s_cpu_norm": 1900.0, "mfu_cpu_norm": 0.1}
    row = _by(run_all.parse_train("", js, CTX), "Tunix")
    assert row.peer.startswith("961 tok/s") and row.ratio.startswith("3.90x") and row.met == "yes"
    js["results"]["ring_jax[dispatch]"].update(x_tunix_cpu=2.5)  # met needs the wall AND the CPU-normalised ratio
    assert _by(run_all.parse_train("", js, CTX), "Tunix").met == "no"
    failed = dict(_train_json(True), tunix_error="RuntimeError: Tunix import failed: No module named 'tunix'")
    row = _by(run_all.parse_train("", failed, CTX), "Tunix")
    assert "No module named 'tunix'" in row.peer and row.met == "not measured" and row.ratio == "-"

    with_tunix = SAMPLING_OUT.replace(
        '"continuous_over_static"',
        '"ring_jax_noshared_tokens_per_s": 120.0, "tunix_tokens_per_s": 60.0, "continuous_over_static"',
    )
    row = _by(run_all.parse_sampling(with_tunix, None, CTX), "Tunix")
    assert row.ratio == "2.00x" and row.peer == "60 tok/s" and row.met == "no" and "120 tok/s" in row.ring_jax
    cpu = with_tunix.replace(
        '"tunix_tokens_per_s": 60.0', '"tunix_tokens_per_s": 60.0, "tunix_cpu_s": 3.0, "ring_jax_noshared_cpu_s": 2.0'
    )
    assert _by(run_all.parse_sampling(cpu, None, CTX), "Tunix").ratio == "2.00x (CPU 1.50x)"
    failed = SAMPLING_OUT.replace("RESULTS", "[tunix] failed (exit 1): ValueError: no\nRESULTS")
    assert "ValueError: no" in _by(run_all.parse_sampling(failed, None, CTX), "Tunix").peer
    assert _by(run_all.parse_sampling(SAMPLING_OUT, None, CTX), "Tunix").met == "not measured"

    tunix_rl = RL_OUT.replace(
        '"seq_mean":',
        '"tunix_grpo": {"step_s_median": 0.2, "step_s_mean": 0.25, '
        '"step_s": [9.0, 0.2, 0.3, 0.2], "rows_per_step": 8}, "seq_mean":',
    )
    row = _by(run_all.parse_rl(tunix_rl, None, CTX), "RL step")
    assert row.ratio == "4.42x faster" and row.met == "yes" and "0.20 s/step" in row.peer and "3 steps" in row.peer
    assert _by(run_all.parse_rl(RL_OUT, None, CTX), "RL step").met == "not measured"


def test_missing_tunix_interpreter_is_reported():
    py, why = run_all.find_tunix("/nonexistent/python")
    assert py is None and "/nonexistent/python" in why
