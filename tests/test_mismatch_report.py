"""experiments/mismatch_report.py: the table of issue 30's experiment comes from the compact data alone, with
figures equal to ones computed here by hand on a small fixture (two seeds of two arms, four held-out prompts)."""

import json

import numpy as np

from experiments import mismatch_report as mr


def _steps(dlogp, grad_norms, rewards):
    return [
        {
            "step": i + 1,
            "mismatch/logp_abs_mean": d,
            "mismatch/logp_abs_max": 10 * d,
            "mismatch/kl": d / 2,
            "mismatch/ratio_out_2x_frac": 0.0,
            "mismatch/routing_disagree_frac": d / 10,
            "mismatch/routing_disagree_token_frac": d / 5,
            "icepop/masked_frac": 0.0,
            "grad_norm": g,
            "reward_mean": r,
            "time/rollout_s": 1.0,
            "time/trainer_logp_s": 0.5,
            "time/train_s": 2.0,
        }
        for i, (d, g, r) in enumerate(zip(dlogp, grad_norms, rewards))
    ]


def test_table_from_a_fixture(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    before = {f"f|{i}": ["f", s, g] for i, (s, g) in enumerate([(0.0, 0), (0.5, 1), (0.25, 0), (1.0, 1)])}
    json.dump(before, open(data / "before.json", "w"))
    afters = {  # (arm, seed) -> per-prompt (solved, greedy)
        ("f32", 0): [(0.125, 1), (0.5, 1), (0.25, 0), (1.0, 1)],
        ("f32", 1): [(0.0, 0), (0.75, 1), (0.5, 1), (1.0, 1)],
        ("bf16", 0): [(0.0, 0), (0.5, 1), (0.25, 0), (0.875, 1)],
        ("bf16", 1): [(0.0, 0), (0.5, 0), (0.25, 0), (1.0, 1)],
    }
    for (arm, seed), rows in afters.items():
        d = 1e-3 if arm == "bf16" else 1e-7
        rec = {
            "arm": arm,
            "seed": seed,
            "steps": _steps([d] * 5 + [3 * d] * 5, [1.0] * 5 + [3.0] * 5, [0.2] * 5 + [0.4] * 5),
            "after": {f"f|{i}": ["f", s, g] for i, (s, g) in enumerate(rows)},
        }
        json.dump(rec, open(data / f"{arm}_s{seed}.json", "w"))
    text = mr.table(str(data))
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    mism = [line for line in text.splitlines() if line.startswith("| bf16 rollouts, nothing |")]
    assert mism[0].split(" | ")[1] == f"{2e-3:.2e}"  # mean of 1e-3 and 3e-3 over steps and seeds
    assert mism[0].split(" | ")[2] == f"{3e-2:.2e}"  # the largest per-step max
    train_rows = [line for line in text.splitlines() if line.startswith("| float32 rollouts (baseline) |")]
    cells = train_rows[1].split(" | ")
    assert cells[1] == "0.50"  # grad norms 1, 3: std 1 / mean 2
    assert cells[2] == "0.200 -> 0.400"
    assert cells[3] == "3.5"  # step time after the first step: 1 + 0.5 + 2
    # seed 0: pass@1 change (0.125 + 0 + 0 + 0) / 4 = +3.1 points; greedy +1/4 = +25.0; mean over the two seeds'
    # per-prompt changes: seed 1 (0, 0.25, 0.25, 0) / 4 = +12.5 -> mean +7.8
    assert cells[4].startswith("+3.1 [") and " / +12.5 [" in cells[4]
    assert cells[5].startswith("+25.0 [")
    assert cells[6].startswith("+7.8 [")
    s1 = np.array([0.125, 0.0, 0.0, 0.0])
    s2 = np.array([0.0, 0.25, 0.25, 0.0])
    m = (s1 + s2) / 2
    lo = m.mean() - 1.96 * m.std(ddof=1) / 2
    assert cells[6] == f"+{100 * m.mean():.1f} [{100 * lo:+.1f}, {100 * (m.mean() + 1.96 * m.std(ddof=1) / 2):+.1f}]"
    assert "bf16 rollouts, nothing" in rows and "float32 rollouts (baseline)" in rows
