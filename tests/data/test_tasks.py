"""Worked solutions must be right by the task's own scorer (reasoning-gym), and the steps must be true."""

from fractions import Fraction

import pytest

from ring_jax.data.tasks import expression_steps, make_task_records
from ring_jax.rewards.registry import score


@pytest.mark.parametrize("family", ["chain_sum", "countdown", "chain_sum_1d", "countdown_10", "countdown_15"])
def test_worked_solutions_score_full_reward(family):
    recs = make_task_records(family, 40, seed=3)
    for r in recs:
        assert score(r, r["solution"], timeout_s=30).reward == 1.0, (r["prompt"], r["solution"])
        assert len(r["prompt"]) < 40


def test_expression_steps_are_true_equations():
    steps, value = expression_steps("5*(65 + 35) - 12 / 4")
    assert value == Fraction(497)
    for s in steps:
        lhs, rhs = s.split(" = ")
        assert Fraction(eval(lhs)) == Fraction(rhs)  # noqa: S307 - test oracle on our own strings


def test_held_out_seeds_differ():
    a = {r["prompt"] for r in make_task_records("chain_sum", 50, seed=1)}
    b = {r["prompt"] for r in make_task_records("chain_sum", 50, seed=2)}
    assert a != b


def test_easy_families_stay_in_their_ranges():
    for r in make_task_records("chain_sum_1d", 60, seed=4):
        terms = r["prompt"].rstrip(" =").replace("-", "+").split("+")
        assert 2 <= len(terms) <= 3 and all(0 <= int(t) <= 9 for t in terms), r["prompt"]
    for r in make_task_records("countdown_10", 60, seed=4):
        meta = r["gym"]["entry"]["metadata"]
        assert len(meta["numbers"]) == 3 and all(1 <= n <= 10 for n in meta["numbers"])
        assert 5 <= meta["target"] <= 30
    for r in make_task_records("countdown_15", 60, seed=4):
        meta = r["gym"]["entry"]["metadata"]
        assert len(meta["numbers"]) == 3 and all(1 <= n <= 15 for n in meta["numbers"])
        assert 5 <= meta["target"] <= 40


def test_truncate_solutions_cuts_only_the_answer_line():
    from ring_jax.data.tasks import truncate_solutions

    recs = make_task_records("chain_sum_1d", 400, seed=5)
    full = [r["solution"] for r in recs]
    cut = truncate_solutions(recs, 0.3, seed=1)
    assert 90 <= cut <= 150  # ~30% of 400
    n_cut = 0
    for r, f in zip(recs, full):
        if r["solution"] != f:
            n_cut += 1
            assert f == r["solution"] + "\n" + f.rsplit("\n", 1)[1] and f.rsplit("\n", 1)[1].startswith("<answer>")
            assert score(r, r["solution"], timeout_s=30).reward < 1.0  # no answer, no reward
    assert n_cut == cut
    again = make_task_records("chain_sum_1d", 400, seed=5)
    assert truncate_solutions(again, 0.3, seed=1) == cut  # seeded
    with pytest.raises(ValueError):
        truncate_solutions(recs, 1.0, seed=0)
