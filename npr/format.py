"""The parallel-reasoning format (spec/NPR.md §1-2): parse and validate text, score it, and build
the training layout (position ids, step ids, attention mask) of a token trajectory.

One state machine (`_parse_items`) checks the block grammar for both levels, so text and token
ids are judged by the same rules:

    response := block+ final
    block    := <guideline> plan{n} </guideline> step{n} <takeaway> text </takeaway> (1<=n<=N_max)
    plan     := <plan> "k:" text </plan>        step := <step> "k:" text </step>
    final    := free text holding \\boxed{answer}

Text level: whitespace is allowed between structural tags (models write "\\n"); the "k:" labels
and the boxed answer are checked. Token level (`layout`): tags are single token ids; labels and
the answer are not checked, the final part may be unterminated, and NO token may stand between
`</guideline>` and the first `<step>`, between steps, or between the last `</step>` and
`<takeaway>` (the engine injects those tags, and the §2 positions would be undefined).

Violation kinds (`FormatError.kind`, listed in KINDS; the error names the FIRST violation in
reading order, `.position` is a char offset for text and a token index for token ids):
    missing_block       no <guideline> at all (also: empty response)
    text_before_block   non-whitespace text before the first <guideline>
    unexpected_tag      a tag where the grammar allows none of its kind (e.g. a stray closer)
    nested              an opening tag inside an open plan/step/takeaway or guideline
    unclosed            a span/block not closed before its successor tag, or at the end of input
    empty_span          a guideline without plans, or a plan/step/takeaway without content
    bad_numbering       a plan/step label that is not "k:" with k = 1..n in order (text only)
    plan_step_mismatch  #steps != #plans in a block
    too_many_branches   more than max_branches plans in a guideline
    text_between_tags   content where only tags may stand (between steps, between plans, ...)
    missing_answer      the final part holds no non-empty \\boxed{...} (text only)
"""
from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from npr.tags import (
    GUIDELINE_CLOSE,
    GUIDELINE_OPEN,
    PLAN_CLOSE,
    PLAN_OPEN,
    STEP_CLOSE,
    STEP_OPEN,
    TAGS,
    TAKEAWAY_CLOSE,
    TAKEAWAY_OPEN,
)

__all__ = [
    "TAGS", "KINDS", "PENALTIES", "FormatError", "Block", "Trajectory", "Layout",
    "parse", "validate", "format_score", "extract_answer", "layout",
]

DEFAULT_MAX_BRANCHES = 8

# Stage-1 reward (spec §4): 0 when the format holds, else a penalty graded by how much of the
# structure is lost. -2: no structure at all; -1.5: the tag structure is broken (no layout could
# be built from it); -1.0: tags pair up but the block is inconsistent (counts, empty parts);
# -0.75: the structure is right but decorated wrongly (labels, stray text); -0.5: only the boxed
# answer is missing. Every value lies in [-2, 0).
PENALTIES: dict[str, float] = {
    "missing_block": -2.0,
    "text_before_block": -1.5,
    "unexpected_tag": -1.5,
    "nested": -1.5,
    "unclosed": -1.5,
    "empty_span": -1.0,
    "plan_step_mismatch": -1.0,
    "too_many_branches": -1.0,
    "bad_numbering": -0.75,
    "text_between_tags": -0.75,
    "missing_answer": -0.5,
}
KINDS: tuple[str, ...] = tuple(PENALTIES)

_OPENERS = frozenset((GUIDELINE_OPEN, PLAN_OPEN, STEP_OPEN, TAKEAWAY_OPEN))
_TAG_RE = re.compile("|".join(re.escape(t) for t in TAGS))
_LABEL_RE = re.compile(r"\s*(\d+)\s*:")
_BOXED = "\\boxed{"


class FormatError(ValueError):
    """A format violation: `.kind` (one of KINDS) and `.position` (char offset or token index)."""

    def __init__(self, kind: str, message: str, position: int) -> None:
        assert kind in PENALTIES, kind
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.position = position


@dataclass
class Block:
    plans: list[str]  # plan texts without their "k:" label, stripped
    steps: list[str]  # step texts without their "k:" label, stripped; len(steps) == len(plans)
    takeaway: str


@dataclass
class Trajectory:
    blocks: list[Block]
    final: str  # text after the last </takeaway>, stripped
    answer: str | None  # content of the last \boxed{...} in `final`

    def to_text(self) -> str:
        """Canonical text: no whitespace between structural tags, labels written as "k: "."""
        out: list[str] = []
        for b in self.blocks:
            out.append(GUIDELINE_OPEN)
            out += [f"{PLAN_OPEN}{k}: {p}{PLAN_CLOSE}" for k, p in enumerate(b.plans, 1)]
            out.append(GUIDELINE_CLOSE)
            out += [f"{STEP_OPEN}{k}: {s}{STEP_CLOSE}" for k, s in enumerate(b.steps, 1)]
            out.append(f"{TAKEAWAY_OPEN}{b.takeaway}{TAKEAWAY_CLOSE}")
        out.append(self.final)
        return "".join(out)


# ----------------------------------------------------------------------------- grammar

@dataclass
class _BlockIdx:
    """Item indices of one block's tags (plans/steps: (open, close) pairs)."""

    g_open: int
    g_close: int = -1
    plans: list[tuple[int, int]] = field(default_factory=list)
    steps: list[tuple[int, int]] = field(default_factory=list)
    t_open: int = -1
    t_close: int = -1


_START, _GUIDE, _PLAN, _GAP, _STEP, _TAKE, _FINAL = range(7)


def _parse_items(
    tags: Sequence[str | None],
    blank: Sequence[bool],
    pos: Sequence[int],
    end_pos: int,
    unit: str,
    *,
    max_branches: int,
    gap_blank_ok: bool,
    on_span: Callable[[str, int, int, int], None],
) -> tuple[list[_BlockIdx], int]:
    """Checks the block grammar over items (a tag string, or None for content).

    blank[i]: content item i may stand between tags (whitespace). gap_blank_ok: blank content is
    also allowed between </guideline>, the steps and <takeaway>. on_span(kind, k, lo, hi) checks a
    closed plan/step/takeaway whose content items are lo..hi-1 (k: 1-based index, 0 for takeaway).
    Returns the blocks and the index of the first item of the final part.
    """
    def fail(kind: str, i: int, msg: str) -> FormatError:
        p = end_pos if i >= len(pos) else pos[i]
        return FormatError(kind, f"{msg} ({unit} {p})", p)

    def where(i: int) -> str:
        return f"{unit} {pos[i]}"

    has_guideline = GUIDELINE_OPEN in tags
    state = _START
    blocks: list[_BlockIdx] = []
    cur = _BlockIdx(-1)
    span_open = -1
    final_start = 0
    final_text = -1  # first non-blank content item after the last </takeaway>

    def intruder(i: int, t: str, what: str, followers: tuple[str, ...]) -> FormatError:
        opened = f"{what} opened at {where(span_open)}"
        if t in followers:
            return fail("unclosed", i, f"{opened} is not closed before {t}")
        if t in _OPENERS:
            return fail("nested", i, f"{t} inside the {opened}")
        return fail("unexpected_tag", i, f"{t} inside the {opened}")

    for i, t in enumerate(tags):
        if t is None:
            if state in (_PLAN, _STEP, _TAKE):
                continue
            if blank[i] and (state != _GAP or gap_blank_ok):
                continue
            if state == _FINAL:
                if final_text < 0:
                    final_text = i
                continue
            if state == _START:
                if not has_guideline:
                    raise fail("missing_block", i, f"no {GUIDELINE_OPEN} block in the response")
                raise fail("text_before_block", i, f"text before the first {GUIDELINE_OPEN}")
            where_ = "inside the guideline, outside its plans" if state == _GUIDE else (
                f"between {GUIDELINE_CLOSE}, the steps and {TAKEAWAY_OPEN}")
            raise fail("text_between_tags", i, f"content {where_}")
        if state in (_START, _FINAL):
            if t == GUIDELINE_OPEN:
                if final_text >= 0:
                    raise fail("text_between_tags", final_text, "text between blocks")
                cur = _BlockIdx(i)
                state = _GUIDE
                continue
            if state == _START and not has_guideline:
                raise fail("missing_block", i, f"no {GUIDELINE_OPEN} block in the response")
            ctx = "before the first block" if state == _START else "after a block's takeaway"
            raise fail("unexpected_tag", i, f"{t} {ctx}")
        elif state == _GUIDE:
            if t == PLAN_OPEN:
                if len(cur.plans) >= max_branches:
                    raise fail("too_many_branches", i,
                               f"plan {len(cur.plans) + 1} exceeds max_branches={max_branches}")
                span_open, state = i, _PLAN
            elif t == GUIDELINE_CLOSE:
                if not cur.plans:
                    raise fail("empty_span", i, "a guideline without plans")
                cur.g_close, state = i, _GAP
            elif t in (STEP_OPEN, TAKEAWAY_OPEN):
                raise fail("unclosed", i,
                           f"the guideline opened at {where(cur.g_open)} is not closed before {t}")
            elif t in _OPENERS:
                raise fail("nested", i, f"{t} inside the guideline opened at {where(cur.g_open)}")
            else:
                raise fail("unexpected_tag", i, f"{t} inside a guideline")
        elif state == _PLAN:
            if t != PLAN_CLOSE:
                raise intruder(i, t, f"plan {len(cur.plans) + 1}", (PLAN_OPEN, GUIDELINE_CLOSE))
            on_span("plan", len(cur.plans) + 1, span_open + 1, i)
            cur.plans.append((span_open, i))
            state = _GUIDE
        elif state == _GAP:
            n, s = len(cur.plans), len(cur.steps)
            if t == STEP_OPEN:
                if s >= n:
                    raise fail("plan_step_mismatch", i, f"step {s + 1} in a block with {n} plans")
                span_open, state = i, _STEP
            elif t == TAKEAWAY_OPEN:
                if s < n:
                    raise fail("plan_step_mismatch", i,
                               f"{TAKEAWAY_OPEN} after {s} of {n} steps (one per plan)")
                cur.t_open, state = i, _TAKE
            else:
                raise fail("unexpected_tag", i, f"{t} where a {STEP_OPEN} or {TAKEAWAY_OPEN} "
                           "must follow")
        elif state == _STEP:
            if t != STEP_CLOSE:
                raise intruder(i, t, f"step {len(cur.steps) + 1}", (STEP_OPEN, TAKEAWAY_OPEN))
            on_span("step", len(cur.steps) + 1, span_open + 1, i)
            cur.steps.append((span_open, i))
            state = _GAP
        else:  # _TAKE
            span_open = cur.t_open
            if t != TAKEAWAY_CLOSE:
                raise intruder(i, t, "takeaway", (GUIDELINE_OPEN,))
            on_span("takeaway", 0, cur.t_open + 1, i)
            cur.t_close = i
            blocks.append(cur)
            state, final_start, final_text = _FINAL, i + 1, -1
    if state == _START:
        raise fail("missing_block", len(tags), f"no {GUIDELINE_OPEN} block in the response")
    if state != _FINAL:
        what = {_GUIDE: "guideline", _PLAN: "plan", _GAP: "block (steps/takeaway missing)",
                _STEP: "step", _TAKE: "takeaway"}[state]
        raise fail("unclosed", len(tags), f"the response ends inside a {what}")
    return blocks, final_start


# ----------------------------------------------------------------------------- text level

def extract_answer(text: str) -> str | None:
    """Content of the last \\boxed{...} (balanced braces; \\{ \\} are escaped), stripped.

    Nested boxes count once: in \\boxed{\\boxed{1}} the answer is "\\boxed{1}". None when the
    text holds no complete \\boxed{...}.
    """
    answer: str | None = None
    i = text.find(_BOXED)
    while i >= 0:
        start = j = i + len(_BOXED)
        depth = 1
        while j < len(text):
            c = text[j]
            if c == "\\":
                j += 2
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        if depth == 0:
            answer = text[start:j].strip()
            i = text.find(_BOXED, j + 1)
        else:  # unbalanced: look for a complete box inside it
            i = text.find(_BOXED, start)
    return answer


def parse(text: str, max_branches: int = DEFAULT_MAX_BRANCHES) -> Trajectory:
    """Parses a response (spec §1); raises FormatError naming the first violation."""
    if not isinstance(text, str):
        raise TypeError(f"parse expects str, got {type(text).__name__}")
    if max_branches < 1:
        raise ValueError(f"max_branches must be >= 1, got {max_branches}")
    tags: list[str | None] = []
    texts: list[str] = []
    pos: list[int] = []
    last = 0

    def content(a: int, b: int) -> None:
        seg = text[a:b]
        tags.append(None)
        texts.append(seg)
        pos.append(a + len(seg) - len(seg.lstrip()))  # first non-whitespace char

    for m in _TAG_RE.finditer(text):
        if m.start() > last:
            content(last, m.start())
        tags.append(m.group())
        texts.append(m.group())
        pos.append(m.start())
        last = m.end()
    if last < len(text):
        content(last, len(text))
    blank = [t is None and not s.strip() for t, s in zip(tags, texts)]

    def body(lo: int, hi: int) -> str:
        return "".join(texts[lo:hi])  # at most one content item between two tags

    def check_span(kind: str, k: int, lo: int, hi: int) -> None:
        b = body(lo, hi)
        if not b.strip():
            raise FormatError("empty_span", f"empty {kind} (char {pos[lo - 1]})", pos[lo - 1])
        if kind == "takeaway":
            return
        m = _LABEL_RE.match(b)
        if m is None or int(m.group(1)) != k:
            got = f'"{m.group(1)}:"' if m else "no label"
            raise FormatError("bad_numbering", f'{kind} {k} must start with "{k}:", got {got} '
                              f"(char {pos[lo]})", pos[lo])
        if not b[m.end():].strip():
            raise FormatError("empty_span", f"{kind} {k} has a label but no text "
                              f"(char {pos[lo]})", pos[lo])

    idx, final_start = _parse_items(tags, blank, pos, len(text), "char",
                                    max_branches=max_branches, gap_blank_ok=True,
                                    on_span=check_span)

    def labelled(lo: int, hi: int) -> str:
        b = body(lo, hi)
        return b[_LABEL_RE.match(b).end():].strip()  # type: ignore[union-attr]

    blocks = [
        Block(plans=[labelled(a + 1, b) for a, b in bi.plans],
              steps=[labelled(a + 1, b) for a, b in bi.steps],
              takeaway=body(bi.t_open + 1, bi.t_close).strip())
        for bi in idx
    ]
    final = body(final_start, len(tags)).strip()
    answer = extract_answer(final)
    if not answer:
        p = pos[final_start] if final_start < len(tags) else len(text)
        raise FormatError("missing_answer",
                          f"the final part holds no non-empty \\boxed{{...}} (char {p})", p)
    return Trajectory(blocks=blocks, final=final, answer=answer)


def validate(text: str, max_branches: int = DEFAULT_MAX_BRANCHES) -> None:
    """Raises FormatError naming the first violation; returns None when the format holds."""
    parse(text, max_branches=max_branches)


def format_score(text: str, max_branches: int = DEFAULT_MAX_BRANCHES) -> float:
    """Stage-1 format reward: 0.0 when the format holds, else PENALTIES[kind] in [-2, 0)."""
    try:
        parse(text, max_branches=max_branches)
    except FormatError as e:
        return PENALTIES[e.kind]
    return 0.0


# ----------------------------------------------------------------------------- token level

def critical_path_tokens(response_positions: Sequence[int] | torch.Tensor, prompt_len: int) -> int:
    """Tokens of a response on its critical path: the decode steps it needs when the steps of
    every block run in parallel (spec §3: the prefix, the longest step of each block, the
    takeaways and what follows). The prompt is not counted: it is prefilled, not decoded; the
    ideal speedup of the response is its token count / this. response_positions: the §2
    position ids of the response's tokens (prompt excluded), which count the depth along that
    path, so this is max position + 1 - prompt_len (0 for an empty response). The one
    definition behind Layout.critical_path_tokens and the engine's
    CompletionOutput.stats["critical_path_tokens"]."""
    if len(response_positions) == 0:
        return 0
    top = (int(response_positions.max()) if isinstance(response_positions, torch.Tensor)
           else max(int(p) for p in response_positions))
    return top + 1 - prompt_len


@dataclass(frozen=True, eq=False)  # tensors: no elementwise __eq__
class Layout:
    """Training layout of one token trajectory (spec §2). Tensors are torch.long on CPU, [L]."""

    position_ids: torch.Tensor  # [L] spec §2 positions
    step_ids: torch.Tensor  # [L] 0 outside steps, else a 1-based id unique across blocks
    block_ids: torch.Tensor  # [L] 0 outside blocks (<guideline> .. </takeaway>), else 1-based
    hole_start: torch.Tensor  # [L] token i never sees j in [hole_start[i], hole_end[i])
    hole_end: torch.Tensor  # [L] (its earlier sibling steps); empty hole: start == end == 0
    prompt_len: int
    step_lengths: list[list[int]]  # per block, L_k of each step (tags included)

    @property
    def total_tokens(self) -> int:
        """Prompt and response."""
        return int(self.position_ids.numel())

    @property
    def response_tokens(self) -> int:
        return self.total_tokens - self.prompt_len

    @property
    def critical_path_tokens(self) -> int:
        """Response tokens on the critical path (module function critical_path_tokens; the
        prompt is not counted)."""
        return critical_path_tokens(self.position_ids[self.prompt_len:], self.prompt_len)

    @property
    def ideal_speedup(self) -> float:
        """spec §3: response tokens / critical-path tokens (1.0 for an empty response)."""
        crit = self.critical_path_tokens
        return self.response_tokens / crit if crit else 1.0

    @property
    def num_blocks(self) -> int:
        return len(self.step_lengths)

    @property
    def branches(self) -> list[int]:
        return [len(ls) for ls in self.step_lengths]

    def mask(self) -> torch.Tensor:
        """Dense reference mask: bool [L, L], True = query i may attend key j (spec §2)."""
        idx = torch.arange(self.total_tokens)
        causal = idx[None, :] <= idx[:, None]
        s, b = self.step_ids, self.block_ids
        siblings = (s[:, None] > 0) & (s[None, :] > 0) & (s[:, None] != s[None, :]) & (
            b[:, None] == b[None, :])
        return causal & ~siblings

    def mask_holes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Memory-light mask: i may attend j  <=>  j <= i and not hole_start[i] <= j < hole_end[i].

        Steps are contiguous in canonical order, so the keys a step token must not see (its earlier
        siblings) form one interval. Returns (hole_start [L], hole_end [L]).
        """
        return self.hole_start, self.hole_end


def layout(
    token_ids: Sequence[int] | torch.Tensor,
    tag_ids: Mapping[str, int],
    prompt_len: int = 0,
    max_branches: int = DEFAULT_MAX_BRANCHES,
    *,
    space_ids: Collection[int] = (),
) -> Layout:
    """Builds the §2 layout of a canonical trajectory; raises FormatError if its structure is bad.

    token_ids: [L] prompt then response, steps of a block one after another. The first prompt_len
    tokens are a causal prefix and are not validated. tag_ids: {tag string: token id} for all eight
    tags. space_ids: tokens (e.g. "\\n") tolerated like whitespace where text may hold it: before
    the first block, inside a guideline around its plans, between blocks; never between
    </guideline>, the steps and <takeaway>. FormatError.position is an index into token_ids.
    """
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() != 1:
            raise ValueError(f"token_ids must be 1-D, got shape {tuple(token_ids.shape)}")
        ids = [int(x) for x in token_ids.tolist()]
    else:
        ids = [int(x) for x in token_ids]
    missing = [t for t in TAGS if t not in tag_ids]
    if missing:
        raise ValueError(f"tag_ids lacks the token id of {missing}")
    id_to_tag = {int(tag_ids[t]): t for t in TAGS}
    if len(id_to_tag) != len(TAGS):
        raise ValueError(f"tag_ids maps two tags to one token id: {dict(tag_ids)}")
    L = len(ids)
    if not 0 <= prompt_len <= L:
        raise ValueError(f"prompt_len must be in [0, {L}], got {prompt_len}")
    if max_branches < 1:
        raise ValueError(f"max_branches must be >= 1, got {max_branches}")

    resp = ids[prompt_len:]
    tags = [id_to_tag.get(x) for x in resp]
    spaces = frozenset(int(x) for x in space_ids)
    blank = [x in spaces for x in resp]
    pos = range(prompt_len, L)

    def check_span(kind: str, k: int, lo: int, hi: int) -> None:
        if hi == lo:
            what = f"{kind} {k}" if k else kind
            raise FormatError("empty_span", f"{what} holds no token (token {pos[lo - 1]})",
                              pos[lo - 1])

    idx, _ = _parse_items(tags, blank, pos, L, "token", max_branches=max_branches,
                          gap_blank_ok=False, on_span=check_span)

    position_ids = torch.empty(L, dtype=torch.long)
    step_ids = torch.zeros(L, dtype=torch.long)
    block_ids = torch.zeros(L, dtype=torch.long)
    hole_start = torch.zeros(L, dtype=torch.long)
    hole_end = torch.zeros(L, dtype=torch.long)
    step_lengths: list[list[int]] = []
    cursor, next_pos, step_id = 0, 0, 0  # cursor: first token not yet placed
    for b, bi in enumerate(idx, 1):
        g_close = prompt_len + bi.g_close
        n = g_close + 1 - cursor
        position_ids[cursor:g_close + 1] = torch.arange(next_pos, next_pos + n)
        p = next_pos + n - 1  # position id of </guideline>
        lens = []
        first = prompt_len + bi.steps[0][0]
        for a, e in bi.steps:
            a, e = prompt_len + a, prompt_len + e + 1
            step_id += 1
            position_ids[a:e] = torch.arange(p + 1, p + 1 + e - a)
            step_ids[a:e] = step_id
            hole_start[a:e], hole_end[a:e] = first, a
            lens.append(e - a)
        block_ids[prompt_len + bi.g_open:prompt_len + bi.t_close + 1] = b
        step_lengths.append(lens)
        cursor, next_pos = prompt_len + bi.t_open, p + max(lens) + 1
    position_ids[cursor:] = torch.arange(next_pos, next_pos + L - cursor)
    empty = hole_start == hole_end  # first steps: empty hole, written as 0..0
    hole_start[empty] = 0
    hole_end[empty] = 0
    return Layout(position_ids=position_ids, step_ids=step_ids, block_ids=block_ids,
                  hole_start=hole_start, hole_end=hole_end, prompt_len=prompt_len,
                  step_lengths=step_lengths)
