"""Group checksums: a synthetic task where decomposition genuinely pays.

A problem is k groups of m digits, e.g. "a=3527 b=8192 c=4460". The answer is the sum, over the
groups, of each group's checksum (the last digit of its digit sum): (3+5+2+7=17 -> 7) + (20 -> 0)
+ (14 -> 4) = 11. The groups are independent sub-problems, one parallel step each; the takeaway
combines their results. Every token of a solution is a small local operation a tiny model can
learn (a one-shot multi-digit sum written most-significant digit first is not):

    step "a 33 58 20 77 =7"   pairs (digit j of the group, running sum mod 10), then the result
    takeaway "a7=7 b0=7 c4=11"  per group: its letter, its result, the running total
    final "\\boxed{11}"

A pair's digit is the group's j-th digit (found by group letter and index), its running digit
is the previous pair's plus this digit mod 10 (fixed offsets), and the takeaway adds one digit to
a small number at a time. The knobs: k (groups = branches) and m (digits = step length).

Solutions are rendered in the parallel format of spec/NPR.md §1 (plans name the groups, steps do
the groups, the takeaway combines), as plain sequential text, or as imperfect attempts at the
format (the base model's pretraining mix, so stage 1 has format headroom).
"""
from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from npr.tags import (GUIDELINE_CLOSE, GUIDELINE_OPEN, PLAN_CLOSE, PLAN_OPEN, STEP_CLOSE,
                      STEP_OPEN, TAKEAWAY_CLOSE, TAKEAWAY_OPEN)

LETTERS = "abcdefgh"
# The instruction every prompt carries (stage 1's "prompt that describes the format").
INSTRUCTION = "Use plans, steps, takeaway."
# How imperfect attempts at the format go wrong (each maps to a format-check violation).
FLAWS = ("no_tags", "unclosed_plan", "bad_numbering", "missing_step", "text_between",
         "no_boxed", "no_takeaway")


@dataclass(frozen=True)
class Problem:
    groups: tuple[tuple[int, ...], ...]

    @property
    def k(self) -> int:
        return len(self.groups)

    @property
    def text(self) -> str:
        """The problem statement: "a=3527 b=8192 c=4460"."""
        return " ".join(f"{LETTERS[i]}={''.join(map(str, g))}" for i, g in enumerate(self.groups))

    @property
    def results(self) -> list[int]:
        """Each sub-problem's result: the last digit of its group's digit sum."""
        return [sum(g) % 10 for g in self.groups]

    @property
    def answer(self) -> str:
        return str(sum(self.results))


def parse_problem(text: str) -> Problem:
    """Inverse of Problem.text; raises ValueError naming what is wrong."""
    groups = []
    for i, part in enumerate(text.split()):
        name, eq, digits = part.partition("=")
        if i >= len(LETTERS) or name != LETTERS[i] or not eq or not digits.isdigit():
            raise ValueError(f"groupsum: bad group {part!r} in {text!r} (expected "
                             f"{LETTERS[min(i, len(LETTERS) - 1)]}=<digits>)")
        groups.append(tuple(int(c) for c in digits))
    if not groups:
        raise ValueError("groupsum: empty problem")
    return Problem(tuple(groups))


def running(values: Sequence[int]) -> list[int]:
    out, s = [], 0
    for v in values:
        s += v
        out.append(s)
    return out


def step_text(p: Problem, i: int) -> str:
    """Body of step i (0-based) after its "k: " label: "a 33 58 20 77 =7"."""
    g = p.groups[i]
    pairs = " ".join(f"{d}{s % 10}" for d, s in zip(g, running(g)))
    return f"{LETTERS[i]} {pairs} ={sum(g) % 10}"


def takeaway_text(p: Problem) -> str:
    """"a7=7 b0=7 c4=11": each group's result and the running total."""
    r = p.results
    return " ".join(f"{LETTERS[i]}{v}={s}" for i, (v, s) in enumerate(zip(r, running(r))))


def final_text(p: Problem) -> str:
    return f"\\boxed{{{p.answer}}}"


def parallel_solution(p: Problem) -> str:
    """The exact parallel format (spec §1), one block with one branch per group."""
    plans = "".join(f"{PLAN_OPEN}{i + 1}: {LETTERS[i]}{PLAN_CLOSE}" for i in range(p.k))
    steps = "".join(f"{STEP_OPEN}{i + 1}: {step_text(p, i)}{STEP_CLOSE}" for i in range(p.k))
    return (f"{GUIDELINE_OPEN}{plans}{GUIDELINE_CLOSE}{steps}"
            f"{TAKEAWAY_OPEN}{takeaway_text(p)}{TAKEAWAY_CLOSE}{final_text(p)}")


def sequential_solution(p: Problem) -> str:
    """The same work without tags: one group per line, then the sum."""
    lines = [step_text(p, i) for i in range(p.k)]
    return "\n".join(lines + [takeaway_text(p), final_text(p)])


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
        raise ValueError(f"groupsum: unknown flaw {flaw!r} (one of {', '.join(FLAWS)})")
    return f"{GUIDELINE_OPEN}{''.join(plan)}{GUIDELINE_CLOSE}{''.join(step)}{take}{final}"


def prompt_text(problem: str) -> str:
    """The model's prompt for a problem statement: the instruction, the problem, a newline."""
    return f"{INSTRUCTION}\n{problem}\n"


@dataclass(frozen=True)
class GroupSum:
    """The task family. k and m are drawn uniformly from [k_min, k_max] and [m_min, m_max]."""

    k_min: int = 2
    k_max: int = 4
    m_min: int = 3
    m_max: int = 5
    name: str = "groupsum"

    def __post_init__(self) -> None:
        if not 1 <= self.k_min <= self.k_max <= len(LETTERS):
            raise ValueError(f"GroupSum: need 1 <= k_min <= k_max <= {len(LETTERS)}, got "
                             f"k_min={self.k_min}, k_max={self.k_max}")
        if not 1 <= self.m_min <= self.m_max <= 12:
            raise ValueError(f"GroupSum: need 1 <= m_min <= m_max <= 12, got m_min={self.m_min}, "
                             f"m_max={self.m_max}")

    def sample(self, rng: random.Random) -> Problem:
        k = rng.randint(self.k_min, self.k_max)
        return Problem(tuple(tuple(rng.randint(0, 9) for _ in range(rng.randint(self.m_min, self.m_max)))
                             for _ in range(k)))

    def parse(self, text: str) -> Problem:
        return parse_problem(text)


def is_heldout(problem_text: str, buckets: int = 8) -> bool:
    """Held-out split by a stable hash of the statement: one bucket in `buckets` is reserved for
    evaluation sets and never drawn for training."""
    return zlib.crc32(problem_text.encode()) % buckets == 0
