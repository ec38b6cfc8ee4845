"""npr.bench.forcing.ForcedStructure: its decisions against the scan that states them (one pass
over the context, tag by tag), on random contexts, and a whole forced completion's shape."""
import random

import pytest
import torch

from npr.bench.forcing import ForcedStructure
from npr.tags import TAGS

TAG_IDS = {t: 100 + i for i, t in enumerate(TAGS)}
LABELS = [[200 + k, 250] for k in range(1, 9)]  # "k" ":"
EOS = 99


def reference_next_token(f: ForcedStructure, visible):
    """The decision rules as one pass over the context (the implementation's first form)."""
    ids = list(visible[f.prompt_len:])
    T, tag = f.tag_ids, {v: k for k, v in f.tag_ids.items()}
    last = {t: -1 for t in TAGS}
    blocks_done = plans = 0
    for i, t in enumerate(ids):
        name = tag.get(t)
        if name is None:
            continue
        last[name] = i
        if name == "</takeaway>":
            blocks_done += 1
        elif name == "<guideline>":
            plans = 0
        elif name == "</plan>":
            plans += 1
    n_here = f.branches[blocks_done] if blocks_done < len(f.branches) else 0
    if last["<step>"] > last["</step>"]:
        start = last["<step>"]
        k = f._step_index(ids, start)
        if len(ids) - start - 1 - len(f.labels[k - 1]) >= f._step_len(blocks_done, k):
            return T["</step>"]
        return None
    if last["<takeaway>"] > last["</takeaway>"]:
        return T["</takeaway>"] if len(ids) - last["<takeaway>"] - 1 >= f.takeaway_tokens else None
    if last["<guideline>"] > last["</guideline>"]:
        if last["<plan>"] > last["</plan>"] and last["<plan>"] > last["<guideline>"]:
            label = list(f.labels[plans])
            done = len(ids) - last["<plan>"] - 1
            if done < len(label):
                return label[done]
            return T["</plan>"] if done - len(label) >= f.plan_tokens else None
        return T["<plan>"] if plans < n_here else T["</guideline>"]
    since = len(ids) - (last["</takeaway>"] + 1)
    if blocks_done < len(f.branches):
        return T["<guideline>"] if since >= f.prefix_tokens else None
    return f.eos_id if since >= f.final_tokens else None


def forcer(rng: random.Random, prompt_len: int) -> ForcedStructure:
    lens = {(b, k): rng.randint(1, 5) for b in range(3) for k in range(1, 9)}
    return ForcedStructure(tag_ids=TAG_IDS, labels=LABELS, eos_id=EOS, prompt_len=prompt_len,
                           branches=[rng.randint(1, 4) for _ in range(rng.randint(1, 3))],
                           step_tokens=lambda b, k: lens[(b, k)], plan_tokens=rng.randint(1, 2),
                           prefix_tokens=rng.randint(0, 2), takeaway_tokens=rng.randint(1, 3),
                           final_tokens=rng.randint(1, 3))


def decide(fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # malformed soup (a step without its label, ...): the same refusal
        return (type(e).__name__, str(e))


@pytest.mark.parametrize("seed", range(4))
def test_decisions_equal_the_reference_scan(seed):
    rng = random.Random(seed)
    pool = list(TAG_IDS.values()) + [l for lab in LABELS for l in lab] + list(range(10))
    for _ in range(300):
        P = rng.randint(0, 4)
        f = forcer(rng, P)
        # forced completions (the contexts the engine shows), cut anywhere ...
        ctx = [rng.randint(0, 9) for _ in range(P)]
        while len(ctx) < P + 120:
            t = f.next_token(ctx)
            if t == EOS:
                break
            ctx.append(t if t is not None else rng.randint(0, 9))
        cut = ctx[:rng.randint(0, len(ctx))]
        assert decide(f.next_token, cut) == decide(reference_next_token, f, cut)
        # ... and random token soup with tags anywhere
        soup = [rng.choice(pool) for _ in range(rng.randint(0, 60))]
        assert decide(f.next_token, soup) == decide(reference_next_token, f, soup)


def test_a_forced_guideline_and_the_processor_form():
    f = ForcedStructure(tag_ids=TAG_IDS, labels=LABELS, eos_id=EOS, prompt_len=2, branches=[2],
                        step_tokens=3, plan_tokens=1, prefix_tokens=1, takeaway_tokens=2,
                        final_tokens=1)
    T = TAG_IDS
    ctx, free = [7, 7], iter(range(10))
    for _ in range(13):  # up to </guideline> (the engine injects each step's <step> and label)
        t = f.next_token(ctx)
        ctx.append(t if t is not None else next(free, 9))
    # one free token, then a guideline of 2 plans, each its label and 1 free token
    assert ctx[2:] == [0, T["<guideline>"], T["<plan>"], 201, 250, 1, T["</plan>"], T["<plan>"],
                       202, 250, 2, T["</plan>"], T["</guideline>"]]
    # inside step 2 (as its branch sees it): 3 content tokens, then </step>
    step = ctx + [T["<step>"], 202, 250]
    for k in range(3):
        assert f.next_token(step) is None
        step.append(5)
    assert f.next_token(step) == T["</step>"]
    # the processor form: a forced token keeps its logit alone; a free one bans tags and EOS
    logits = torch.arange(300, dtype=torch.float32)
    out = f(ctx[:3], logits.clone())
    assert torch.isfinite(out).sum() == 1 and out[T["<guideline>"]] == T["<guideline>"]
    out = f(ctx[:2], logits.clone())
    banned = list(T.values()) + [EOS]
    assert torch.isinf(out[banned]).all() and int(torch.isfinite(out).sum()) == 300 - len(banned)
