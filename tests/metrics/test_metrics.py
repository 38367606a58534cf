"""MetricsWriter, flops_per_token, the plot CLI and the token-efficiency table."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ring_jax.config import get_preset
from ring_jax.train.metrics import JSONL_NAME, MetricsWriter, flops_per_token, read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class FakeClock:
    def __init__(self, t=100.0):
        self.t = t

    def __call__(self):
        return self.t


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f.read().splitlines()]


# ------------------------------------------------------------------------------------------------ writer
def test_jsonl_records_what_was_written(tmp_path):
    clock = FakeClock()
    written = [
        (1, {"loss": 2.5, "lr": 1e-3}),
        (2, {"loss": np.float32(2.25), "lr": 1e-3, "acc": np.array(0.5)}),
        (3, {"loss": 2.0, "lr": 5e-4, "count": 7}),
    ]
    with MetricsWriter(str(tmp_path), total_steps=3, clock=clock, show_bar=False) as mw:
        for step, sc in written:
            clock.t += 1.5
            mw.write(step, sc)
            assert len(_lines(tmp_path / JSONL_NAME)) == step  # flushed at once, before close
    recs = _lines(tmp_path / JSONL_NAME)
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert [r["time"] for r in recs] == [1.5, 3.0, 4.5]
    for r, (_, sc) in zip(recs, written):
        assert set(r) == {"step", "time", *sc}
        for k, v in sc.items():
            assert r[k] == pytest.approx(float(v), rel=1e-7)
    assert isinstance(recs[2]["count"], int)
    assert read_jsonl(str(tmp_path / JSONL_NAME)) == recs
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))


def test_tokens_per_s_and_mfu_from_the_clock(tmp_path):
    clock = FakeClock(10.0)
    mw = MetricsWriter(
        str(tmp_path), 10, peak_flops=4.0e9, flops_per_token=1.0e6, clock=clock, show_bar=False, tensorboard=False
    )
    clock.t = 12.0  # 2 s since creation
    r1 = mw.write(1, {"loss": 1.0, "tokens": 4096})
    clock.t = 12.5  # 0.5 s since the previous write
    r2 = mw.write(2, {"loss": 1.0, "tokens": 1000})
    clock.t = 20.0
    mw.reset_clock()  # e.g. after a recompile: the interval restarts here
    clock.t = 24.0
    r3 = mw.write(3, {"tokens": 8000})
    mw.close()
    # hand computation: tokens / seconds; mfu = tokens/s * flops/token / peak
    assert r1["tokens_per_s"] == pytest.approx(2048.0) and r1["mfu"] == pytest.approx(2048.0 * 1e6 / 4e9)
    assert r2["tokens_per_s"] == pytest.approx(2000.0) and r2["mfu"] == pytest.approx(0.5)
    assert r3["tokens_per_s"] == pytest.approx(2000.0)
    recs = _lines(tmp_path / JSONL_NAME)
    assert [r["tokens_per_s"] for r in recs] == pytest.approx([2048.0, 2000.0, 2000.0])
    assert [r["mfu"] for r in recs] == pytest.approx([0.512, 0.5, 0.5])


def test_no_mfu_without_flops(tmp_path):
    clock = FakeClock()
    with MetricsWriter(str(tmp_path), 2, clock=clock, show_bar=False, tensorboard=False) as mw:
        clock.t += 2
        r = mw.write(1, {"tokens": 10})
    assert r["tokens_per_s"] == pytest.approx(5.0) and "mfu" not in r


def test_non_chief_writes_nothing(tmp_path, capsys):
    d = tmp_path / "run"
    with MetricsWriter(str(d), 5, peak_flops=1e9, flops_per_token=1e3, is_chief=False) as mw:
        for s in range(1, 4):
            mw.write(s, {"loss": 1.0, "tokens": 10, "expert_load": np.arange(4.0)})
    assert not d.exists()
    err = capsys.readouterr().err
    assert "train" not in err and "%" not in err  # no progress bar


def test_histograms_land_in_jsonl(tmp_path):
    load = np.array([[3.0, 1.0, 0.0, 4.0], [2.0, 2.0, 2.0, 2.0]], np.float32)  # [layers, experts]
    vec = np.array([0.25, np.inf, 1.0])
    with MetricsWriter(str(tmp_path), 1, show_bar=False) as mw:
        mw.write(1, {"expert_load": load, "vec": vec, "one": np.array([7.0])})
    (r,) = _lines(tmp_path / JSONL_NAME)
    assert r["expert_load"] == load.tolist()
    assert r["vec"] == [0.25, None, 1.0]  # strict JSON: non-finite -> null
    assert r["one"] == 7.0  # a one-element array is a scalar


def test_bar_shows_postfix(tmp_path, capsys):
    clock = FakeClock()
    with MetricsWriter(str(tmp_path), 4, clock=clock, tensorboard=False, desc="sft") as mw:
        clock.t += 1
        mw.write(2, {"loss": 1.23456, "tokens": 1000})
    err = capsys.readouterr().err
    assert "sft" in err and "loss=1.2346" in err and "tok/s=1,000" in err


def test_truncated_last_line_is_skipped(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    assert read_jsonl(str(p)) == [{"step": 1, "loss": 1.0}]


def test_flops_per_token_formula():
    cfg = get_preset("small")
    t = 256
    active = cfg.param_counts()["active"]
    h, v, L = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    assert flops_per_token(cfg, t) == 6 * (active - v * h) + 12 * L * cfg.num_attention_heads * cfg.head_size * t
    tied = cfg.replace(tie_word_embeddings=True)
    assert flops_per_token(tied, t) == 6 * tied.param_counts()["active"] + 12 * L * 8 * 32 * t


def test_measure_matmul_peak_is_positive():
    from ring_jax.train.metrics import measure_matmul_peak

    assert measure_matmul_peak(n=128, reps=2) > 0


# ------------------------------------------------------------------------------------------------ plot
def _write_run(d, n=20, reward=True):
    clock = FakeClock()
    with MetricsWriter(str(d), n, show_bar=False, tensorboard=False, clock=clock) as mw:
        for s in range(1, n + 1):
            clock.t += 0.5
            sc = {"loss": 3.0 / s, "tokens": 100, "expert_load": np.ones(4)}
            if reward:
                sc["reward_mean"] = s / n
            mw.write(s, sc)
    return str(d / JSONL_NAME)


def test_plot_png(tmp_path):
    import matplotlib.image as mpimg

    from ring_jax.cli.plot import plot_runs

    a, b = _write_run(tmp_path / "a"), _write_run(tmp_path / "b", reward=False)
    out = plot_runs([a, b], str(tmp_path / "all.png"), smooth=0.6)
    img = mpimg.imread(out)
    assert os.path.getsize(out) > 0 and img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    out2 = plot_runs([a], str(tmp_path / "loss.png"), keys=["loss"], x="tokens")
    assert mpimg.imread(out2).shape[0] > 100


def test_plot_errors(tmp_path):
    from ring_jax.cli.plot import PlotError, plot_runs

    a = _write_run(tmp_path / "a", n=3)
    with pytest.raises(PlotError, match="no such file"):
        plot_runs([str(tmp_path / "nope.jsonl")], str(tmp_path / "x.png"))
    with pytest.raises(PlotError, match=r"unknown key\(s\) nope.*loss"):
        plot_runs([a], str(tmp_path / "x.png"), keys=["loss", "nope"])


def test_plot_cli(tmp_path):
    a = _write_run(tmp_path / "a", n=5)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "cli.png"
    p = subprocess.run(
        [sys.executable, "-m", "ring_jax.cli.plot", f"--jsonl={a}", "--keys=loss,reward_mean", f"--out={out}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    assert out.stat().st_size > 0
    p = subprocess.run(
        [sys.executable, "-m", "ring_jax.cli.plot", f"--jsonl={a}", "--keys=bogus"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert p.returncode == 1 and p.stderr.strip().startswith("error: unknown key(s) bogus")
    assert len(p.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------ token efficiency
def test_token_efficiency_table(tmp_path):
    import matplotlib.image as mpimg

    from ring_jax.cli.token_efficiency import compute, markdown_table, plot_rows

    def rl_log(name, steps, tokens, rewards):
        p = tmp_path / name
        p.write_text(
            "".join(
                json.dumps({"step": s, "tokens": tokens, "reward_mean": r}) + "\n"
                for s, r in zip(range(1, steps + 1), rewards)
            )
        )
        return name  # relative to the input file

    ckpts = [
        {
            "name": "ep1",
            "sft_tokens": 1_000_000,
            "entropy": 0.62,
            "rl_jsonl": rl_log("a.jsonl", 3, 500, [0.1, 0.2, 0.3]),
        },
        {
            "name": "ep3",
            "sft_tokens": 3_000_000,
            "entropy": 0.41,
            "rl_jsonl": rl_log("b.jsonl", 4, 1500, [0.2, 0.4, 0.5, 0.6]),
        },
        {"name": "ep5", "sft_tokens": 5_000_000},
    ]
    inp = tmp_path / "ckpts.json"
    inp.write_text(json.dumps(ckpts))
    rows = compute(str(inp))
    assert [r.name for r in rows] == ["ep1", "ep3", "ep5"]
    assert [r.in_band for r in rows] == [False, True, None]
    assert [r.rl_tokens for r in rows] == [1500, 6000, None]
    assert rows[0].token_efficiency == pytest.approx(1500 / 1_000_000)
    assert rows[1].token_efficiency == pytest.approx(6000 / 3_000_000)
    assert rows[2].token_efficiency is None
    assert [r.final_reward for r in rows] == [0.3, 0.6, None]
    assert rows[1].curve == ((1500, 0.2), (3000, 0.4), (4500, 0.5), (6000, 0.6))
    md = markdown_table(rows)
    assert md.splitlines()[2] == "| ep1 | 1M | 0.620 | no | 1.5K | 0.0015 | 0.3000 |"
    assert md.splitlines()[3] == "| ep3 | 3M | 0.410 | yes | 6K | 0.002 | 0.6000 |"
    assert md.splitlines()[4] == "| ep5 | 5M | - | - | - | - | - |"
    # the same input as JSONL gives the same rows
    inp2 = tmp_path / "ckpts.jsonl"
    inp2.write_text("".join(json.dumps(c) + "\n" for c in ckpts))
    assert compute(str(inp2)) == rows
    out = plot_rows(rows, str(tmp_path / "te.png"))
    assert mpimg.imread(out).shape[0] > 100


def test_token_efficiency_errors(tmp_path):
    from ring_jax.cli.token_efficiency import TokenEffError, compute

    with pytest.raises(TokenEffError, match="no such file"):
        compute(str(tmp_path / "none.json"))
    p = tmp_path / "c.json"
    p.write_text(json.dumps([{"name": "x", "sft_tokens": 10, "rl_jsonl": "missing.jsonl"}]))
    with pytest.raises(TokenEffError, match="no such RL log"):
        compute(str(p))
    p.write_text(json.dumps([{"name": "x"}]))
    with pytest.raises(TokenEffError, match="lacks 'sft_tokens'"):
        compute(str(p))
