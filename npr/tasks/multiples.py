"""Multiples: a synthetic task where decomposition genuinely pays.

A problem is k groups "x*n", e.g. "a=7*5 b=3*8 c=9*4". Group g's sub-problem: count n multiples
of x and keep the last digit of the last one (7*5 = 35 -> 5). The answer sums the groups'
results: 5 + 4 + 6 = 15. The groups are independent (one parallel step each) and the takeaway
combines their results. Every token of a solution is a small local operation a tiny model can
learn (a one-shot multi-digit sum written most-significant digit first is not):

    step      "a=7*5 5:7 4:14 3:21 2:28 1:35 a:5"   the group copied from the prompt, a
                                                   countdown from n (previous index - 1) beside
                                                   the running multiple (previous + x), then
                                                   the result (the last multiple's last digit)
    takeaway  "a:5=5 b:4=9 c:6=15"                 per group: its result, the running total
    final     "\\boxed{15}"

The group is copied after its "a=" (an induction copy), the countdown ends the step by itself
(no counting), and the takeaway finds each result after the "a:" that only a step's end holds. The knobs: k (groups = branches per block) and n (terms
= step length); x is drawn from 2..9.

Solutions are rendered in the parallel format of spec/NPR.md §1 (plans name the groups, steps do
them, the takeaway combines), as plain sequential text, or as imperfect attempts at the format
(the base model's pretraining mix, so stage 1 has format headroom).
"""
from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass

from npr.tags import (GUIDELINE_CLOSE, GUIDELINE_OPEN, PLAN_CLOSE, PLAN_OPEN, STEP_CLOSE,
                      STEP_OPEN, TAKEAWAY_CLOSE, TAKEAWAY_OPEN)

LETTERS = "abcdefgh"
# The instruction every prompt carries (stage 1's "prompt that describes the format").
INSTRUCTION = "Use plans, steps, takeaway."
# How imperfect attempts at the format go wrong (each fails the format check its own way).
FLAWS = ("no_tags", "unclosed_plan", "bad_numbering", "missing_step", "text_between",
         "no_boxed", "no_takeaway")
_GROUP = re.compile(r"([a-h])=([0-9])\*([0-9])")


@dataclass(frozen=True)
class Problem:
    groups: tuple[tuple[int, int], ...]   # (x, n) per group

    @property
    def k(self) -> int:
        return len(self.groups)

    @property
    def text(self) -> str:
        """The problem statement: "a=7*5 b=3*8 c=9*4"."""
        return " ".join(f"{LETTERS[i]}={x}*{n}" for i, (x, n) in enumerate(self.groups))

    @property
    def results(self) -> list[int]:
        """Each sub-problem's result: the last digit of x*n."""
        return [x * n % 10 for x, n in self.groups]

    @property
    def answer(self) -> str:
        return str(sum(self.results))


def parse_problem(text: str) -> Problem:
    """Inverse of Problem.text; raises ValueError naming what is wrong."""
    groups = []
    for i, part in enumerate(text.split()):
        m = _GROUP.fullmatch(part)
        if i >= len(LETTERS) or m is None or m.group(1) != LETTERS[i]:
            want = LETTERS[min(i, len(LETTERS) - 1)]
            raise ValueError(f"multiples: bad group {part!r} in {text!r} (expected {want}=x*n)")
        groups.append((int(m.group(2)), int(m.group(3))))
    if not groups:
        raise ValueError("multiples: empty problem")
    return Problem(tuple(groups))


def step_text(p: Problem, i: int) -> str:
    """Body of step i (0-based) after its "k: " label: "a=7*5 5:7 4:14 3:21 2:28 1:35 a:5"."""
    x, n = p.groups[i]
    g = LETTERS[i]
    terms = " ".join(f"{n - j}:{x * (j + 1)}" for j in range(n))
    return f"{g}={x}*{n} {terms} {g}:{x * n % 10}"


def takeaway_text(p: Problem) -> str:
    """"a:5=5 b:4=9 c:6=15": each group's result and the running total."""
    out, total = [], 0
    for i, r in enumerate(p.results):
        total += r
        out.append(f"{LETTERS[i]}:{r}={total}")
    return " ".join(out)


def final_text(p: Problem) -> str:
    return f"\\boxed{{{p.answer}}}"


def parallel_solution(p: Problem) -> str:
    """The exact parallel format (spec §1): one block, one branch per group."""
    plans = "".join(f"{PLAN_OPEN}{i + 1}: {LETTERS[i]}{PLAN_CLOSE}" for i in range(p.k))
    steps = "".join(f"{STEP_OPEN}{i + 1}: {step_text(p, i)}{STEP_CLOSE}" for i in range(p.k))
    return (f"{GUIDELINE_OPEN}{plans}{GUIDELINE_CLOSE}{steps}"
            f"{TAKEAWAY_OPEN}{takeaway_text(p)}{TAKEAWAY_CLOSE}{final_text(p)}")


def sequential_solution(p: Problem) -> str:
    """The same work without tags: one group per line, then the combination."""
    return "\n".join([step_text(p, i) for i in range(p.k)] + [takeaway_text(p), final_text(p)])


def flawed_solution(p: Problem, flaw: str, rng: random.Random) -> str:
    """An attempt at the format that fails the check in one way (FLAWS)."""
    k = p.k
    plan = [f"{PLAN_OPEN}{i + 1}: {LETTERS[i]}{PLAN_CLOSE}" for i in range(k)]
    step = [f"{STEP_OPEN}{i + 1}: {step_text(p, i)}{STEP_CLOSE}" for i in range(k)]
    take = f"{TAKEAWAY_OPEN}{takeaway_text(p)}{TAKEAWAY_CLOSE}"
    final = final_text(p)
    j = rng.randrange(k)
    if flaw == "no_tags":
        return sequential_solution(p)
    if flaw == "unclosed_plan":
        plan[j] = plan[j].replace(PLAN_CLOSE, "")
    elif flaw == "bad_numbering":
        step = [f"{STEP_OPEN}1: {step_text(p, i)}{STEP_CLOSE}" for i in range(k)]
        if k == 1:
            plan[0] = plan[0].replace("1:", "2:")
    elif flaw == "missing_step":
        del step[j]
    elif flaw == "text_between":
        step[j] = step[j] + "then"
    elif flaw == "no_boxed":
        final = p.answer
    elif flaw == "no_takeaway":
        take = takeaway_text(p) + "\n"
    else:
        raise ValueError(f"multiples: unknown flaw {flaw!r} (one of {', '.join(FLAWS)})")
    return f"{GUIDELINE_OPEN}{''.join(plan)}{GUIDELINE_CLOSE}{''.join(step)}{take}{final}"


def prompt_text(problem: str) -> str:
    """The model's prompt for a problem statement: the instruction, the problem, a newline."""
    return f"{INSTRUCTION}\n{problem}\n"


@dataclass(frozen=True)
class Multiples:
    """The task family: k, n, x drawn uniformly from [k_min, k_max], [n_min, n_max], [x_min, 9]."""

    k_min: int = 2
    k_max: int = 4
    n_min: int = 2
    n_max: int = 6
    x_min: int = 2
    name: str = "multiples"

    def __post_init__(self) -> None:
        if not 1 <= self.k_min <= self.k_max <= len(LETTERS):
            raise ValueError(f"Multiples: need 1 <= k_min <= k_max <= {len(LETTERS)}, got "
                             f"k_min={self.k_min}, k_max={self.k_max}")
        if not 1 <= self.n_min <= self.n_max <= 9:
            raise ValueError(f"Multiples: need 1 <= n_min <= n_max <= 9, got n_min={self.n_min}, "
                             f"n_max={self.n_max}")
        if not 0 <= self.x_min <= 9:
            raise ValueError(f"Multiples: need 0 <= x_min <= 9, got {self.x_min}")

    def sample(self, rng: random.Random) -> Problem:
        k = rng.randint(self.k_min, self.k_max)
        return Problem(tuple((rng.randint(self.x_min, 9), rng.randint(self.n_min, self.n_max))
                             for _ in range(k)))

    def parse(self, text: str) -> Problem:
        return parse_problem(text)

    @property
    def spec(self) -> str:
        return f"{self.name}:k={self.k_min}-{self.k_max},n={self.n_min}-{self.n_max}"


def is_heldout(problem_text: str, buckets: int = 8) -> bool:
    """Held-out split by a stable hash of the statement: one bucket in `buckets` is reserved for
    evaluation sets and never drawn for training."""
    return zlib.crc32(problem_text.encode()) % buckets == 0
