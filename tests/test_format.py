"""npr.format: text parsing, validation, format score, answer extraction and the §2 token layout.

Trajectories are generated as "piece lists" (tag strings and text pieces); the same list renders to
text (random whitespace between pieces) and to token ids (tags -> one id each, text -> a few ids),
so every corruption is checked at both levels.
"""
from __future__ import annotations

import random
import string

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npr import format as F
from npr.tags import (
    GUIDELINE_CLOSE as GC,
    GUIDELINE_OPEN as GO,
    PLAN_CLOSE as PC,
    PLAN_OPEN as PO,
    STEP_CLOSE as SC,
    STEP_OPEN as SO,
    TAKEAWAY_CLOSE as TC,
    TAKEAWAY_OPEN as TO,
)

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

TAG_IDS = {t: 3 + i for i, t in enumerate(F.TAGS)}  # a tiny synthetic vocabulary
TAG_OF = {v: k for k, v in TAG_IDS.items()}
NEWLINE_ID = 999
CLOSERS = (GC, PC, SC, TC)

# Text without tag characters, braces or backslashes (so no accidental tag or \boxed).
TEXT = st.text(string.ascii_letters + string.digits + " .,;:+-=()[]!?'\n", min_size=1,
               max_size=16).map(str.strip).filter(bool)
ANSWER = st.recursive(TEXT, lambda c: st.builds(lambda a, b: f"\\frac{{{a}}}{{{b}}}", c, c),
                      max_leaves=4)
SEP = st.sampled_from(["", "", "\n", " ", "\n\n", "\t "])


@st.composite
def blocks(draw, n_min=1, n_max=8):
    n = draw(st.integers(n_min, n_max))
    return F.Block(plans=draw(st.lists(TEXT, min_size=n, max_size=n)),
                   steps=draw(st.lists(TEXT, min_size=n, max_size=n)),
                   takeaway=draw(TEXT))


@st.composite
def trajectories(draw, n_min=1, n_max=8, max_blocks=3):
    bs = draw(st.lists(blocks(n_min, n_max), min_size=1, max_size=max_blocks))
    answer = draw(ANSWER)
    before, after = draw(st.one_of(st.just(""), TEXT)), draw(st.one_of(st.just(""), TEXT))
    final = f"{before} \\boxed{{{answer}}} {after}".strip()
    return F.Trajectory(blocks=bs, final=final, answer=answer)


def pieces_of(traj: F.Trajectory) -> list[str]:
    out: list[str] = []
    for b in traj.blocks:
        out.append(GO)
        for k, p in enumerate(b.plans, 1):
            out += [PO, f"{k}: {p}", PC]
        out.append(GC)
        for k, s in enumerate(b.steps, 1):
            out += [SO, f"{k}:{s}", SC]
        out += [TO, b.takeaway, TC]
    out.append(traj.final)
    return out


def render_text(pieces: list[str], seps: list[str]) -> tuple[str, list[int]]:
    """Text with seps[i] before piece i; returns it and each piece's char offset."""
    text, offs = "", []
    for i, p in enumerate(pieces):
        text += seps[i % len(seps)] if seps else ""
        offs.append(len(text))
        text += p
    return text, offs


def piece_tokens(p: str) -> list[int]:
    if p in TAG_IDS:
        return [TAG_IDS[p]]
    return [1000 + ord(c) for c in p[:10]]  # 1..10 ids; never a tag id


def render_tokens(pieces: list[str]) -> tuple[list[int], list[int]]:
    ids, offs = [], []
    for p in pieces:
        offs.append(len(ids))
        ids += piece_tokens(p)
    return ids, offs


def spans(pieces: list[str]) -> list[dict]:
    """Piece indices per block: g_open, plans [(open, close)], g_close, steps, t_open, t_close."""
    out, cur, op = [], None, -1
    for i, p in enumerate(pieces):
        if p == GO:
            cur = {"g_open": i, "plans": [], "steps": []}
        elif p in (PO, SO):
            op = i
        elif p == PC:
            cur["plans"].append((op, i))
        elif p == SC:
            cur["steps"].append((op, i))
        elif p == GC:
            cur["g_close"] = i
        elif p == TO:
            cur["t_open"] = i
        elif p == TC:
            cur["t_close"] = i
            out.append(cur)
    return out


# ----------------------------------------------------------------- independent oracle (spec §2)

def oracle(ids: list[int], prompt_len: int) -> tuple[list[int], list[int], list[int]]:
    """Position ids, step ids and block ids written token by token from the spec text."""
    pos, steps, blks = [], [], []
    last = -1  # position of the previous sequential token
    p = max_len = step_len = 0
    in_step = False
    n_steps = n_blocks = 0
    in_block = False
    for i, x in enumerate(ids):
        tag = TAG_OF.get(x) if i >= prompt_len else None
        if tag == GO:
            n_blocks += 1
            in_block = True
        blks.append(n_blocks if in_block else 0)
        if tag == TC:
            in_block = False
        if tag == SO:
            in_step, step_len = True, 0
            n_steps += 1
        if in_step:  # all siblings start at p+1
            step_len += 1
            max_len = max(max_len, step_len)
            pos.append(p + step_len)
            steps.append(n_steps)
            in_step = tag != SC
            continue
        steps.append(0)
        last = p + max_len + 1 if tag == TO else last + 1
        pos.append(last)
        if tag == GC:
            p, max_len = last, 0
    return pos, steps, blks


def check_layout(lay: F.Layout, ids: list[int], prompt_len: int, rng: random.Random) -> None:
    pos, steps, blks = oracle(ids, prompt_len)
    L = len(ids)
    assert lay.position_ids.dtype == torch.long and lay.position_ids.shape == (L,)
    assert lay.position_ids.tolist() == pos
    assert lay.step_ids.tolist() == steps
    assert lay.block_ids.tolist() == blks
    assert lay.total_tokens == L and lay.prompt_len == prompt_len
    # positions count depth: the last one ends the critical path (the prompt is not counted)
    assert lay.critical_path_tokens == pos[-1] + 1 - prompt_len
    assert lay.num_blocks == max(blks) and len(lay.branches) == lay.num_blocks
    assert sum(lay.branches) == max(steps)
    m = lay.mask()
    assert m.dtype == torch.bool and m.shape == (L, L)
    step_tok = [i for i in range(L) if steps[i]]
    pairs = [(rng.randrange(L), rng.randrange(L)) for _ in range(200)]
    if step_tok:
        pairs += [(rng.choice(step_tok), rng.choice(step_tok)) for _ in range(200)]
    for i, j in pairs:
        siblings = blks[i] == blks[j] and steps[i] and steps[j] and steps[i] != steps[j]
        assert bool(m[i, j]) == (j <= i and not siblings), (i, j)
    hs, he = lay.mask_holes()
    idx = torch.arange(L)
    holes = (idx[None, :] <= idx[:, None]) & ~((idx[None, :] >= hs[:, None]) &
                                               (idx[None, :] < he[:, None]))
    assert torch.equal(holes, m)


# ----------------------------------------------------------------- valid trajectories

@SETTINGS
@given(trajectories(), st.lists(SEP, min_size=1, max_size=7))
def test_text_round_trip(traj, seps):
    text, _ = render_text(pieces_of(traj), seps)
    got = F.parse(text)
    assert got == traj
    assert F.format_score(text) == 0.0
    F.validate(text)
    assert F.parse(got.to_text()) == traj
    assert F.extract_answer(text) == traj.answer


@SETTINGS
@given(trajectories(), st.lists(st.integers(0, 1200), max_size=6),
       st.randoms(use_true_random=False))
def test_token_layout_matches_spec(traj, prompt, rng):
    prompt = prompt + [TAG_IDS[GO], TAG_IDS[SO]]  # tags in the prompt are not validated
    resp, _ = render_tokens(pieces_of(traj))
    ids = prompt + resp
    lay = F.layout(ids, TAG_IDS, prompt_len=len(prompt))
    check_layout(lay, ids, len(prompt), rng)
    assert lay.branches == [len(b.plans) for b in traj.blocks]
    lay_t = F.layout(torch.tensor(ids), TAG_IDS, prompt_len=len(prompt))
    assert torch.equal(lay_t.position_ids, lay.position_ids)


def test_layout_hand_example():
    G, g, P, p, S, s, T, t = (TAG_IDS[x] for x in F.TAGS)
    ids = [50, 51, G, P, 60, p, P, 61, 62, p, g, S, 70, 71, s, S, 72, s, T, 80, t, 90, 91]
    lay = F.layout(ids, TAG_IDS, prompt_len=2)
    # </guideline> at position 10; step 1 (4 tokens) 11..14, step 2 (3 tokens) 11..13;
    # <takeaway> at 10 + max(4, 3) + 1 = 15.
    assert lay.position_ids.tolist() == list(range(15)) + [11, 12, 13] + list(range(15, 20))
    assert lay.step_ids.tolist() == [0] * 11 + [1] * 4 + [2] * 3 + [0] * 5
    assert lay.block_ids.tolist() == [0, 0] + [1] * 19 + [0, 0]
    assert lay.step_lengths == [[4, 3]] and lay.branches == [2]
    assert lay.critical_path_tokens == 18 and lay.total_tokens == 23  # 20 positions - 2 prompt
    m = lay.mask()
    assert not m[15:18, 11:15].any() and m[15:18, :11].all() and m[18:, :].tril().sum() > 0
    assert m[18, :19].all()  # the takeaway sees every step


def test_layout_multi_block_and_one_branch():
    G, g, P, p, S, s, T, t = (TAG_IDS[x] for x in F.TAGS)
    blk1 = [G, P, 60, p, g, S, 70, 71, s, T, 80, t]  # n = 1
    blk2 = [G, P, 61, p, P, 62, p, g, S, 72, s, S, 73, 74, 75, s, T, 81, t]
    lay = F.layout(blk1 + blk2 + [90], TAG_IDS)
    assert lay.branches == [1, 2] and lay.num_blocks == 2
    assert lay.step_ids.max().item() == 3  # ids unique across blocks
    check_layout(lay, blk1 + blk2 + [90], 0, random.Random(0))


def test_space_ids_where_text_allows_whitespace():
    G, g, P, p, S, s, T, t = (TAG_IDS[x] for x in F.TAGS)
    nl = NEWLINE_ID
    ok = [nl, G, nl, P, 60, p, nl, g, S, 70, s, T, 80, t, nl, G, P, 61, p, g, S, 71, s, T, 81, t]
    lay = F.layout(ok, TAG_IDS, space_ids={nl})
    check_layout(lay, ok, 0, random.Random(1))
    with pytest.raises(F.FormatError) as e:
        F.layout(ok, TAG_IDS)  # without space_ids the newline is content
    assert e.value.kind == "text_before_block" and e.value.position == 0
    bad = [G, P, 60, p, g, nl, S, 70, s, T, 80, t]
    with pytest.raises(F.FormatError) as e:
        F.layout(bad, TAG_IDS, space_ids={nl})  # never between </guideline> and <step>
    assert e.value.kind == "text_between_tags" and e.value.position == 5


def test_layout_bad_arguments():
    ids = [TAG_IDS[GO]]
    with pytest.raises(ValueError, match="lacks"):
        F.layout(ids, {k: v for k, v in TAG_IDS.items() if k != SO})
    with pytest.raises(ValueError, match="two tags"):
        F.layout(ids, {**TAG_IDS, SO: TAG_IDS[SC]})
    with pytest.raises(ValueError, match="prompt_len"):
        F.layout(ids, TAG_IDS, prompt_len=2)
    with pytest.raises(ValueError, match="1-D"):
        F.layout(torch.zeros(2, 2, dtype=torch.long), TAG_IDS)


# ----------------------------------------------------------------- corruptions, both levels

def _corrupt(kind: str, pieces: list[str], r: random.Random):
    """Applies one corruption. Returns (pieces, text kind, token kind or None=valid, piece index
    where the violation is reported or None, max_branches)."""
    sp = spans(pieces)
    b = r.choice(sp)
    out = list(pieces)
    if kind == "drop_step_close":
        o, c = r.choice(b["steps"])
        del out[c]
        return out, "unclosed", "unclosed", c, 8
    if kind == "add_step":
        at = b["steps"][-1][1] + 1
        out[at:at] = [SO, "9: extra", SC]
        return out, "plan_step_mismatch", "plan_step_mismatch", at, 8
    if kind == "remove_plan":
        o, c = b["plans"][-1]
        del out[o:c + 1]
        if len(b["plans"]) == 1:  # no plan left: an empty guideline
            return out, "empty_span", "empty_span", o, 8
        at = b["steps"][-1][0] - 3  # the last <step>, shifted by the removed plan
        return out, "plan_step_mismatch", "plan_step_mismatch", at, 8
    if kind == "nest_guideline":
        at = r.choice(b["steps"])[0] + 2  # after the step's text
        out[at:at] = [GO, PO, "1: x", PC, GC]
        return out, "nested", "nested", at, 8
    if kind == "empty_step":
        o, c = r.choice(b["steps"])
        del out[o + 1]
        return out, "empty_span", "empty_span", o, 8
    if kind == "text_between_tags":
        gaps = [b["g_open"] + 1, b["g_close"], b["t_open"]]  # insert before these pieces
        gaps += [o for o, _ in b["plans"][1:]] + [o for o, _ in b["steps"]]
        nxt = [s for s in sp if s["g_open"] > b["t_close"]]
        if nxt:
            gaps.append(nxt[0]["g_open"])
        at = r.choice(gaps)
        out.insert(at, "stray")
        return out, "text_between_tags", "text_between_tags", at, 8
    if kind == "missing_answer":
        out[-1] = out[-1].replace("\\boxed", "boxed")
        return out, "missing_answer", None, None, 8
    if kind == "no_block":
        return [out[-1]], "missing_block", "missing_block", 0, 8
    if kind == "too_many_branches":
        n = max(len(s["plans"]) for s in sp)
        if n >= 2 and r.random() < 0.5:  # lower max_branches: the first widest block violates
            first = next(s for s in sp if len(s["plans"]) == n)
            return out, "too_many_branches", "too_many_branches", first["plans"][n - 1][0], n - 1
        b = next(s for s in sp if len(s["plans"]) == n)  # add plans up to 9 to the widest block
        at = b["plans"][-1][1] + 1
        extra = [x for k in range(n + 1, 10) for x in (PO, f"{k}: more", PC)]
        out[at:at] = extra  # 9 plans
        return out, "too_many_branches", "too_many_branches", at + 3 * (8 - n), 8
    if kind == "unexpected_closer":
        where = r.choice(["final", "gap", "step"])
        if where == "final":
            at, tag = len(out), r.choice(CLOSERS)
        elif where == "gap":
            at, tag = r.choice(b["steps"])[1] + 1, r.choice(CLOSERS)
        else:
            at, tag = r.choice(b["steps"])[0] + 2, r.choice([GC, PC, TC])
        out.insert(at, tag)
        return out, "unexpected_tag", "unexpected_tag", at, 8
    if kind == "bad_numbering":
        k = r.randrange(len(b["plans"]))
        o = (b["plans"] if r.random() < 0.5 else b["steps"])[k][0]
        out[o + 1] = f"{k + 2}:" + out[o + 1].split(":", 1)[1]
        return out, "bad_numbering", None, o + 1, 8
    if kind == "text_before_block":
        return ["hello"] + out, "text_before_block", "text_before_block", 0, 8
    if kind == "truncated":
        last = sp[-1]
        cut = r.randrange(last["g_open"] + 1, last["t_close"])
        return out[:cut], "unclosed", "unclosed", None, 8
    raise AssertionError(kind)


CORRUPTIONS = ["drop_step_close", "add_step", "remove_plan", "nest_guideline", "empty_step",
               "text_between_tags", "missing_answer", "no_block", "too_many_branches",
               "unexpected_closer", "bad_numbering", "text_before_block", "truncated"]


@pytest.mark.parametrize("kind", CORRUPTIONS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(traj=trajectories(max_blocks=2), seps=st.lists(SEP, min_size=1, max_size=5),
       r=st.randoms(use_true_random=False))
def test_corruption_rejected(kind, traj, seps, r):
    pieces, text_kind, tok_kind, at, max_b = _corrupt(kind, pieces_of(traj), r)
    text, offs = render_text(pieces, seps)
    with pytest.raises(F.FormatError) as e:
        F.parse(text, max_branches=max_b)
    assert e.value.kind == text_kind, str(e.value)
    assert isinstance(e.value, ValueError) and text_kind in str(e.value)
    if at is not None:
        assert e.value.position == (offs[at] if at < len(offs) else len(text)), str(e.value)
    score = F.format_score(text, max_branches=max_b)
    assert -2.0 <= score < 0.0 and score == F.PENALTIES[text_kind]

    ids, toffs = render_tokens(pieces)
    prompt = [1, 2, TAG_IDS[SC]]
    if tok_kind is None:
        check_layout(F.layout(prompt + ids, TAG_IDS, len(prompt), max_b), prompt + ids,
                     len(prompt), r)
        return
    with pytest.raises(F.FormatError) as e:
        F.layout(prompt + ids, TAG_IDS, prompt_len=len(prompt), max_branches=max_b)
    assert e.value.kind == tok_kind, str(e.value)
    if at is not None:
        want = toffs[at] if at < len(toffs) else len(ids)
        assert e.value.position == len(prompt) + want, str(e.value)


def test_simple_rejections():
    ok = "<guideline><plan>1: a</plan></guideline><step>1: b</step><takeaway>c</takeaway>\\boxed{1}"
    assert F.format_score(ok) == 0.0
    cases = {
        "": "missing_block",
        "   \n": "missing_block",
        "just an answer \\boxed{3}": "missing_block",
        ok.replace("</takeaway>", ""): "unclosed",
        ok.replace("1: b", "b"): "bad_numbering",
        ok.replace("1: a", "1:  "): "empty_span",
        ok.replace("<takeaway>c", "<takeaway> "): "empty_span",
        ok.replace("\\boxed{1}", "\\boxed{ }"): "missing_answer",
        ok.replace("\\boxed{1}", "\\boxed{1"): "missing_answer",
        ok.replace("<takeaway>", "<step>2: d</step><takeaway>"): "plan_step_mismatch",
        ok.replace("</guideline>", ""): "unclosed",
        ok.replace("<guideline>", "<guideline><guideline>"): "nested",
        ok.replace("<step>", "<plan>"): "unexpected_tag",
        ok + ok: "text_between_tags",  # the first final's text stands between two blocks
        ok.replace("</takeaway>", "</takeaway></takeaway>"): "unexpected_tag",
        ok + "<guideline>": "text_between_tags",
        "</step>" + ok: "unexpected_tag",
    }
    for text, kind in cases.items():
        with pytest.raises(F.FormatError) as e:
            F.validate(text)
        assert e.value.kind == kind, (text, str(e.value))
        assert -2.0 <= F.format_score(text) < 0.0


def test_penalties_graded():
    assert set(F.KINDS) == set(F.PENALTIES)
    assert all(-2.0 <= v < 0.0 for v in F.PENALTIES.values())
    assert F.PENALTIES["missing_block"] == -2.0 == min(F.PENALTIES.values())
    assert F.PENALTIES["missing_answer"] == max(F.PENALTIES.values())


# ----------------------------------------------------------------- fuzz: never crash, levels agree

FUZZ_PIECE = list(F.TAGS) + ["1: a", "2: b", "x", "\\boxed{7}"]


@SETTINGS
@given(trajectories(n_max=4, max_blocks=2), st.integers(0, 4), st.randoms(use_true_random=False))
def test_fuzz_levels_agree(traj, n_edits, r):
    pieces = pieces_of(traj)  # a valid trajectory, then random edits: delete, insert, replace
    for _ in range(n_edits):
        op, at = r.randrange(3), r.randrange(len(pieces) + 1)
        if op == 0 and at < len(pieces):
            del pieces[at]
        elif op == 1:
            pieces.insert(at, r.choice(FUZZ_PIECE))
        elif at < len(pieces):
            pieces[at] = r.choice(FUZZ_PIECE)
    text = "".join(pieces)
    try:
        F.parse(text, max_branches=4)
        text_kind = None
    except F.FormatError as e:
        text_kind = e.kind
        assert 0 <= e.position <= len(text)
    ids, _ = render_tokens(pieces)
    try:
        lay = F.layout(ids, TAG_IDS, max_branches=4)
        check_layout(lay, ids, 0, r)
        tok_kind = None
    except F.FormatError as e:
        tok_kind = e.kind
        assert 0 <= e.position <= len(ids)
    # Text checks the same structure plus labels, non-empty text and the answer.
    assert text_kind == tok_kind or text_kind in ("bad_numbering", "empty_span", "missing_answer")
    assert (F.format_score(text, max_branches=4) == 0.0) == (text_kind is None)


# ----------------------------------------------------------------- extract_answer

@pytest.mark.parametrize("text,answer", [
    ("so \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("first \\boxed{1} then \\boxed{ 2 } end", "2"),
    ("\\boxed{a{b{c}}d}", "a{b{c}}d"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("\\boxed{\\boxed{3}}", "\\boxed{3}"),
    ("\\boxed{5} and an unfinished \\boxed{6", "5"),
    ("\\boxed{x \\boxed{9}", "9"),
    ("no answer here", None),
    ("\\boxed{unclosed", None),
    ("", None),
])
def test_extract_answer(text, answer):
    assert F.extract_answer(text) == answer


def test_public_names():
    import npr

    assert npr.format.TAGS == F.TAGS and len(F.TAGS) == 8
    assert issubclass(F.FormatError, ValueError)
