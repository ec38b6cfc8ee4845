"""Rewards and answer checkers: math-verify in a worker process with a per-answer timeout."""
from __future__ import annotations

import time

import pytest

from npr.train.rewards import (ExactMatch, MathVerifier, Stage1Reward, Stage3Reward,
                               soft_overlong_penalty)

pytest.importorskip("math_verify")

EQUAL = [  # (answer as the model boxes it, gold)
    ("2", "2"), (r"\frac{1}{2}", "0.5"), ("0.5", r"\frac12"), ("(x+1)^2", "x^2+2x+1"),
    (r"\{1,2\}", r"\{2,1\}"), ("[0,1)", "[0,1)"), (r"\frac{2}{\sqrt{2}}", r"\sqrt{2}"),
    (r"10\%", "0.1"), ("x=3", "3"), (r"\pi", r"\pi"), ("3/4", r"\frac{3}{4}"), ("1,000", "1000"),
]
UNEQUAL = [
    ("3", "4"), (r"\frac{1}{3}", "0.33"), ("x^2", "2x"), ("[0,1]", "[0,1)"), (r"\sqrt{3}", r"\sqrt{2}"),
    ("-1", "1"), ("12", "1 2 3"), ("", "1"),
]


@pytest.fixture(scope="module")
def mv():
    with MathVerifier(timeout_s=3.0) as v:
        yield v


def test_math_verify_table(mv):
    got = mv([a for a, _ in EQUAL + UNEQUAL], [g for _, g in EQUAL + UNEQUAL])
    assert got == [True] * len(EQUAL) + [False] * len(UNEQUAL), list(zip(EQUAL + UNEQUAL, got))
    assert mv.check(None, "1") is False


def test_math_verify_pathological_answer_times_out_and_checker_recovers(mv):
    # sympy evaluates the tower 9^(9^(9^9)): minutes and memory without the parent's timeout;
    # SIGALRM could not interrupt it (one C-level power). It must come back False in ~timeout.
    before = mv.timeouts
    t0 = time.perf_counter()
    assert mv.check(r"9^{9^{9^{9}}}", "1") is False
    took = time.perf_counter() - t0
    assert mv.timeouts == before + 1
    assert took < mv.timeout_s + 2.0, took
    assert mv.check(r"\frac{1}{2}", "0.5") is True  # a fresh worker serves the next answer


def test_math_verify_in_a_thread(mv):
    # math-verify's own timeouts would raise "main thread only" here; the worker does not care.
    import threading

    out = []
    th = threading.Thread(target=lambda: out.append(mv.check("4", "2+2")))
    th.start()
    th.join(30)
    assert out == [True]


def test_bad_inputs():
    with pytest.raises(ValueError, match="timeout_s"):
        MathVerifier(timeout_s=0)
    with pytest.raises(ValueError, match="fork"):
        MathVerifier(start_method="fork")
    with pytest.raises(ValueError, match="2 answers but 1 gold"):
        ExactMatch()(["a", "b"], ["a"])


def test_exact_match():
    assert ExactMatch()(["12", " 1  2 ", None, "12 "], ["12", "1 2", "12", "13"]) == [
        True, True, False, False]


GOOD = ("<guideline><plan>1: a</plan><plan>2: b</plan></guideline><step>1: x</step>"
        "<step>2: y</step><takeaway>z</takeaway> so \\boxed{7}")


def test_stage_rewards():
    r1 = Stage1Reward(ExactMatch())
    s = r1([GOOD, GOOD.replace("7}", "8}"), "no format \\boxed{7}", GOOD.replace("\\boxed{7}", "")],
           ["7", "7", "7", "7"])
    assert [x.reward for x in s] == [1.0, -1.0, -2.0, -0.5]
    assert [x.correct for x in s] == [True, False, True, False]
    assert [x.format_ok for x in s] == [True, True, False, False]
    r3 = Stage3Reward(ExactMatch())
    assert [x.reward for x in r3([GOOD, "junk \\boxed{8}"], ["7", "8"])] == [1.0, 1.0]
    assert [x.reward for x in r3([GOOD], ["8"])] == [-1.0]


def test_soft_overlong_penalty():
    assert soft_overlong_penalty(80, 100, 20) == 0.0
    assert soft_overlong_penalty(90, 100, 20) == pytest.approx(-0.5)
    assert soft_overlong_penalty(100, 100, 20) == pytest.approx(-1.0)
    assert soft_overlong_penalty(101, 100, 20) == -1.0
    with pytest.raises(ValueError, match="cache_len"):
        soft_overlong_penalty(1, 10, 20)
