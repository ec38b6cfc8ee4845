"""npr.Engine under random load, and engine-level edges.

The fuzz drives an engine step by step with random requests (plain decoding, forced native and
sequential structures of 1-8 branches and 1-3 blocks, unforced native decoding, n = 1..3 samples,
greedy and seeded sampling, random token budgets and per-branch caps) arriving over time, random
aborts (some in the middle of a fork) and a KV pool so small that requests are preempted. After
EVERY step it checks the pool and scheduler invariants and every live sample's token ledger; at
the end every output against the same request run alone on a fresh engine with room to spare
(preemption and batch composition must not change greedy or seeded tokens).

The edge tests cover stop strings and stop token ids (plain and native), max_branch_tokens,
top-k 1 / tiny top-p against greedy, logprobs=False, half-precision KV cache and decode weights,
the model's context length, and aborting in the middle of a fork.
"""
from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter
from typing import Any

import pytest
import torch

import npr
from npr import _ext
from npr import format as fmt
from npr.bench.forcing import ForcedStructure
from npr.engine.outputs import fork_ids
from test_engine import labels, model, tag_ids, tok  # noqa: F401  (the engine tests' fixtures)

pytestmark = pytest.mark.skipif(not _ext.available(), reason="npr._C not built")

FINISH_REASONS = {"stop", "length", "abort", "invalid_structure"}
LENGTH_DETAILS = (
    "max_new_tokens reached", "max_new_tokens reached at the join", "a step reached max_branch_tokens",
    "max_branch_tokens is too small for a step", "does not fit the remaining max_new_tokens",
    "reached the model's context length",
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny model's kernels on one thread: on a shared 2-CPU machine, two threads spend
    most of each step waiting for each other (x50 slower). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def forcer(tok, tag_ids, labels, prompt_len, branches, rng, *, step_max=6, prefix=None):
    """A ForcedStructure with random span lengths (steps of 1..step_max content tokens)."""
    lens = {(b, k): rng.randint(1, step_max) for b in range(len(branches)) for k in range(1, 9)}
    return ForcedStructure(tag_ids=tag_ids, labels=labels, eos_id=tok.eos_token_id, prompt_len=prompt_len,
                           branches=list(branches), step_tokens=lambda b, k: lens[(b, k)],
                           plan_tokens=rng.randint(1, 2),
                           prefix_tokens=rng.randint(0, 2) if prefix is None else prefix,
                           takeaway_tokens=rng.randint(1, 3), final_tokens=rng.randint(1, 3))


def by_branch(token_ids, branch_ids) -> dict[int, list[int]]:
    """branch id (0: the trunk) -> that branch's tokens in order."""
    out: dict[int, list[int]] = {}
    for t, b in zip(token_ids, branch_ids):
        out.setdefault(int(b), []).append(int(t))
    return out


def fork_branch_counts(branch_ids) -> list[int]:
    """Number of distinct steps in each fork of a completion, in order."""
    forks: dict[int, set[int]] = {}
    for f, b in zip(fork_ids(branch_ids), branch_ids):
        if f:
            forks.setdefault(f, set()).add(int(b))
    return [len(forks[f]) for f in sorted(forks)]


# ------------------------------------------------------------------------------------------ fuzz
@dataclasses.dataclass
class FuzzRequest:
    ids: list[int]
    params: npr.SamplingParams
    kind: str                           # "off" | "forced" | "unforced"
    branches: list[int] | None = None   # forced: branches per block
    abort_at_fork: bool = False         # abort the first step it is seen in the middle of a fork
    prefix: int = 0                     # forced: free tokens before each block (0: a valid format)
    rid: int = -1
    seen: dict[int, dict[int, list[int]]] = dataclasses.field(default_factory=dict)  # sample -> by_branch
    out: Any = None                     # its RequestOutput
    aborted: bool = False
    unfinished_at_abort: set[int] = dataclasses.field(default_factory=set)

    want: Any = None                    # its RequestOutput when run alone
    bound: int = 0                      # KV blocks it can ever hold (from want)

    def set_want(self, want, block_size: int) -> None:
        """Records the alone output and, from it, the most KV blocks the request can hold: its
        tokens, plus one partly filled block per table segment (root, trunk between forks, each
        step) and one of slack. Each branch of another run of it is a prefix of the alone one's,
        or (a budget ended it inside a fork, see assert_same_completion) at most one token
        longer, so the bound holds at every step of any run."""
        self.want = want
        per_sample = []
        for c in want.outputs:
            forks = fork_branch_counts(c.branch_ids)
            tokens = 1 + len(c.token_ids) + sum(forks)
            per_sample.append(-(-tokens // block_size) + 2 + sum(n + 1 for n in forks))
        self.bound = -(-(len(self.ids) - 1) // block_size) + 1 + sum(per_sample)


def random_request(rng: random.Random, tok, tag_ids, labels) -> FuzzRequest:
    ids = [rng.randint(3, 50) for _ in range(rng.randint(1, 14))]
    n = rng.choice([1, 1, 2, 3])
    sampled = rng.random() < 0.35
    common: dict[str, Any] = dict(n=n, temperature=1.0 if sampled else 0.0,
                                  seed=rng.randint(0, 10**6) if sampled else None)
    if sampled:
        common.update(top_k=rng.choice([-1, -1, 7]), top_p=rng.choice([1.0, 1.0, 0.9]))
    u = rng.random()
    if u < 0.2:
        sp = npr.SamplingParams(parallel="off", max_new_tokens=rng.randint(1, 40), **common)
        return FuzzRequest(ids, sp, "off")
    if u < 0.28:
        sp = npr.SamplingParams(parallel="native", max_new_tokens=rng.randint(1, 40), **common)
        return FuzzRequest(ids, sp, "unforced")
    branches = [rng.randint(1, 8) for _ in range(rng.randint(1, 3))]
    if n * sum(branches) > 24:  # keep requests of one size class: the pool fits the largest alone
        common["n"] = 1
    prefix = rng.choice([0, 0, 0, 2])  # text before a block: the engine forks, the format is broken
    f = forcer(tok, tag_ids, labels, len(ids), branches, rng, prefix=prefix)
    # Mostly a budget the whole structure fits in; else one that runs out somewhere inside it.
    max_new = 500 if rng.random() < 0.6 else rng.randint(3, 120)
    max_branch = rng.choice([None, None, None, rng.randint(3, 10)])
    sp = npr.SamplingParams(parallel="sequential" if rng.random() < 0.15 else "native",
                            max_new_tokens=max_new, max_branch_tokens=max_branch,
                            step_repetition_penalty=rng.choice([1.0, 1.0, 1.3]),
                            logits_processors=[f], **common)
    return FuzzRequest(ids, sp, "forced", branches, abort_at_fork=rng.random() < 0.2, prefix=prefix)


class FuzzRun:
    """One engine, its requests, the per-step checks, and counts of what happened."""

    def __init__(self, eng: npr.Engine, tag_ids: dict[str, int], labels):
        self.eng = eng
        self.tag_ids = tag_ids
        self.injectable = {tag_ids["<step>"], tag_ids["<takeaway>"]} | {t for lab in labels for t in lab}
        self.live: dict[int, FuzzRequest] = {}
        self.done: list[FuzzRequest] = []
        self.events: Counter = Counter()

    def add(self, r: FuzzRequest) -> None:
        r.rid = self.eng.add_request(None, r.params, input_ids=r.ids)
        self.live[r.rid] = r

    def mid_fork(self, r: FuzzRequest) -> bool:
        """Some sample of r has forked and not joined yet (its steps come last in canonical order)."""
        for s in range(r.params.n):
            o = self.eng.scheduler.output(r.rid, s)
            if not o["finish_reason"] and o["branch_ids"] and o["branch_ids"][-1] > 0:
                return True
        return False

    def abort(self, r: FuzzRequest) -> None:
        if self.mid_fork(r):
            self.events["abort_mid_fork"] += 1
        r.unfinished_at_abort = {s for s in range(r.params.n)
                                 if not self.eng.scheduler.output(r.rid, s)["finish_reason"]}
        outs = self.eng.abort([r.rid])
        assert [o.request_id for o in outs] == [r.rid]
        r.aborted = True
        self.events["abort"] += 1
        self.finished(outs[0])
        # Aborting it again (or an id that never existed) changes nothing.
        before = self.eng.pool_stats()
        assert self.eng.abort([r.rid, 10**9]) == []
        assert self.eng.pool_stats() == before

    def finished(self, out) -> None:
        r = self.live.pop(out.request_id)
        r.out = out
        self.done.append(r)
        check_output(r, self.eng, self.tag_ids, self.injectable)
        self.events["mode_" + r.params.parallel] += 1
        self.events["multi_sample"] += r.params.n > 1
        self.events["seeded"] += r.params.temperature > 0
        for c in out.outputs:
            self.events["finish_" + c.finish_reason] += 1
            self.events["forks"] += c.stats["forks"]
            if c.finish_detail == "a step reached max_branch_tokens":
                self.events["branch_cap"] += 1

    def step(self) -> None:
        for out in self.eng.step():
            self.finished(out)
        self.check()

    def check(self) -> None:
        """The invariants that must hold between any two steps."""
        eng, sched = self.eng, self.eng.scheduler
        ps = eng.pool_stats()
        assert ps == sched.pool_stats()
        assert ps["free_blocks"] + ps["used_blocks"] == ps["total_blocks"] == eng.num_blocks
        assert ps["free_blocks"] >= 0 and ps["used_blocks"] >= 0
        assert ps["block_size"] == eng.block_size
        sched.check_invariants()  # the C++ pool's own (refcounts, free list, tables)
        assert sched.num_running() + sched.num_waiting() == len(self.live)
        assert eng.has_unfinished_requests() == bool(self.live)
        if not self.live:
            assert ps["used_blocks"] == 0, "KV blocks leaked with no request left"
        if sched.num_running():
            assert ps["used_blocks"] > 0  # a running request holds its computed tokens' KV
        # Blocks held never exceed what the live requests can hold (finished ones hold none).
        bound = sum(r.bound for r in self.live.values())
        assert ps["used_blocks"] <= bound
        for r in self.live.values():
            p = r.params
            for s in range(p.n):
                o = sched.output(r.rid, s)
                # Ledger: every token of every branch counts, injected ones too.
                assert o["generated_tokens"] == len(o["token_ids"]) <= p.max_new_tokens
                assert len(o["position_ids"]) == len(o["branch_ids"]) == len(o["injected"]) == len(o["token_ids"])
                runs = by_branch(o["token_ids"], o["branch_ids"])
                # Tokens are never lost or rewritten (preemption keeps them): each branch grows.
                for b, old in r.seen.get(s, {}).items():
                    assert runs.get(b, [])[:len(old)] == old, f"request {r.rid} sample {s} branch {b} changed"
                r.seen[s] = runs
                if p.max_branch_tokens is not None:
                    assert all(len(t) <= p.max_branch_tokens for b, t in runs.items() if b)
                assert all(q < eng.max_context for q in o["position_ids"])


def check_output(r: FuzzRequest, eng: npr.Engine, tag_ids, injectable) -> None:
    """Per finished sample: lists line up, the ledger holds, the finish reason is explained."""
    p = r.params
    P = len(r.ids)
    assert r.out.prompt_token_ids == r.ids and len(r.out.outputs) == p.n
    for c in r.out.outputs:
        L = len(c.token_ids)
        assert len(c.position_ids) == len(c.branch_ids) == len(c.injected) == len(c.logprobs) == L
        assert c.finish_reason in FINISH_REASONS, c.finish_reason
        assert c.stats["generated_tokens"] == L <= p.max_new_tokens
        assert c.text == eng.tokenizer.decode(c.token_ids, skip_special_tokens=False)
        for t, inj, lp in zip(c.token_ids, c.injected, c.logprobs):
            if inj:
                assert lp is None and t in injectable
            else:
                assert lp is not None and math.isfinite(lp) and lp <= 1e-5
        if r.aborted and c.index in r.unfinished_at_abort:
            assert c.finish_reason == "abort" and c.finish_detail == "aborted"
        if c.finish_reason in ("abort", "invalid_structure"):
            assert not c.structure_valid
        if c.finish_reason == "stop":
            assert c.token_ids and c.token_ids[-1] in eng.eos_ids, "no stop strings or ids here"
        if c.finish_reason == "length":
            d = c.finish_detail
            assert any(x in d for x in LENGTH_DETAILS), d
            if d == "max_new_tokens reached":
                assert L == p.max_new_tokens
            if d == "a step reached max_branch_tokens":
                assert max(len(t) for b, t in by_branch(c.token_ids, c.branch_ids).items() if b) \
                    == p.max_branch_tokens
            if d == "max_branch_tokens is too small for a step":
                assert p.max_branch_tokens < 1 + 2 + 2  # <step> "k:" one token </step>
        if p.parallel == "off":
            assert not any(c.injected) and not any(c.branch_ids) and c.stats["forks"] == 0
            assert c.position_ids == list(range(P, P + L))
        if r.kind == "forced":
            assert c.finish_reason in ("stop", "length", "abort"), (c.finish_reason, c.finish_detail)
            assert c.stats["forks"] <= len(r.branches)
            assert fork_branch_counts(c.branch_ids) == r.branches[:len(fork_branch_counts(c.branch_ids))]
            if c.finish_reason == "stop":
                assert c.stats["forks"] == len(r.branches)
                # The format allows no text before a block (spec §1): valid iff none was forced.
                assert c.structure_valid == (r.prefix == 0)
                if r.prefix == 0:
                    lay = fmt.layout(r.ids + c.token_ids, tag_ids, prompt_len=P)
                    assert lay.branches == r.branches
                    assert lay.position_ids[P:].tolist() == c.position_ids


def ends_inside_a_fork(c) -> bool:
    """A budget (max_new_tokens, max_branch_tokens) ended the sample while its steps decoded."""
    return c.finish_reason == "length" and bool(c.branch_ids) and c.branch_ids[-1] > 0


def assert_same_completion(got, want, *, aborted: bool) -> None:
    """got equals want: tokens, positions, branches, finish, logprobs.

    Where got was aborted, each of its branches is a prefix of want's same branch. Where a budget
    ended the sample inside a fork, the steps had decoded as far as the rows each step gave them
    (batch composition, row budget, recompute after preemption decide that), so only the trunk
    is equal and of each step one run's tokens are a prefix of the other's."""
    g, w = by_branch(got.token_ids, got.branch_ids), by_branch(want.token_ids, want.branch_ids)
    if aborted:
        for b, toks in g.items():
            assert w.get(b, [])[:len(toks)] == toks, f"branch {b}"
        return
    assert (got.finish_reason, got.finish_detail) == (want.finish_reason, want.finish_detail)
    if ends_inside_a_fork(want) or ends_inside_a_fork(got):
        assert ends_inside_a_fork(want) and ends_inside_a_fork(got)
        assert g.keys() == w.keys() and g[0] == w[0]
        for b in g:
            short, long_ = sorted((g[b], w[b]), key=len)
            assert long_[:len(short)] == short, f"branch {b}"
        if got.finish_detail == "max_new_tokens reached":
            assert len(got.token_ids) == len(want.token_ids)
        return
    assert got.token_ids == want.token_ids
    assert got.position_ids == want.position_ids
    assert got.branch_ids == want.branch_ids and got.injected == want.injected
    assert got.structure_valid == want.structure_valid
    lp = [(a, b) for a, b in zip(got.logprobs, want.logprobs) if a is not None or b is not None]
    assert all(a is not None and b is not None for a, b in lp)
    assert [a for a, _ in lp] == pytest.approx([b for _, b in lp], rel=1e-3, abs=1e-3)


_FUZZ_EVENTS: dict[int, Counter] = {}  # seed -> what happened in that case
FUZZ_CASES = [  # seed, block_size, max_rows, max_tokens_per_step, requests
    (0, 4, 256, 2048, 28),
    (1, 1, 9, 64, 22),
    (2, 8, 32, 48, 24),
    (3, 16, 256, 2048, 28),
    (4, 2, 16, 37, 24),
]


@pytest.mark.parametrize("seed,block_size,max_rows,max_tokens,num_requests", FUZZ_CASES)
def test_fuzz_engine_invariants_every_step(model, tok, tag_ids, labels, seed, block_size, max_rows,
                                           max_tokens, num_requests):
    """Random requests, arrivals, aborts and preemption; invariants after every step; every
    output equal to the request run alone."""
    rng = random.Random(seed)
    reqs = [random_request(rng, tok, tag_ids, labels) for _ in range(num_requests)]
    # Each request alone first, on a fresh engine with the same block size and room to spare.
    ref = npr.Engine(model, tok, block_size=block_size, kv_cache_tokens=1 << 15)
    for r in reqs:
        r.set_want(ref.generate(input_ids=[r.ids], sampling_params=r.params)[0], block_size)
    assert ref.scheduler.num_preemptions() == 0 and ref.pool_stats()["used_blocks"] == 0
    # Room for the largest request alone (so none ends for lack of blocks), far from all at once.
    num_blocks = max(r.bound for r in reqs)
    eng = npr.Engine(model, tok, block_size=block_size, kv_cache_tokens=num_blocks * block_size,
                     max_rows=max_rows, max_tokens_per_step=max_tokens)
    run = FuzzRun(eng, tag_ids, labels)
    pending = list(reqs)
    run.check()
    steps = 0
    while pending or run.live:
        # Arrivals: half at once, then bursts and a trickle.
        k = len(reqs) // 2 if steps == 0 else rng.choice([0, 0, 0, 1, 2, 8])
        for _ in range(min(k, len(pending))):
            run.add(pending.pop(0))
        if not run.live and pending:
            run.add(pending.pop(0))
        for r in list(run.live.values()):
            if (r.abort_at_fork and run.mid_fork(r)) or rng.random() < 0.002:
                run.abort(r)
        run.check()
        if run.live:
            run.step()
        steps += 1
        assert steps < 20000, "the engine stopped making progress"
    run.events["preemptions"] = eng.scheduler.num_preemptions()
    assert eng.pool_stats()["used_blocks"] == 0 and len(run.done) == num_requests

    for r in run.done:
        for c, w in zip(r.out.outputs, r.want.outputs):
            aborted = r.aborted and c.index in r.unfinished_at_abort
            run.events["budget_inside_fork"] += ends_inside_a_fork(c) and not aborted
            try:
                assert_same_completion(c, w, aborted=aborted)
            except AssertionError as e:
                raise AssertionError(f"request {r.rid} ({r.kind}, {r.params}) sample {c.index} "
                                     f"differs from the same request alone: {e}") from None
    _FUZZ_EVENTS[seed] = ev = run.events
    # It cannot pass vacuously: every kind of event happened in this run.
    assert ev["preemptions"] > 0, ev
    assert ev["abort"] > 0 and ev["abort_mid_fork"] > 0, ev
    assert ev["forks"] > 0 and ev["finish_stop"] > 0 and ev["finish_length"] > 0, ev


def test_fuzz_covered_every_kind_of_event():
    """Over all fuzz cases (run first, in file order): budgets that end a sample inside a fork,
    per-branch caps, invalid structures, sequential mode, several samples, seeded sampling."""
    if len(_FUZZ_EVENTS) < len(FUZZ_CASES):
        pytest.skip("not every fuzz case ran in this session (deselected or failed)")
    total = sum(_FUZZ_EVENTS.values(), Counter())
    for kind in ("branch_cap", "budget_inside_fork", "finish_invalid_structure", "mode_sequential",
                 "mode_off", "multi_sample", "seeded", "preemptions", "abort_mid_fork"):
        assert total[kind] > 0, (kind, total)


# ------------------------------------------------------------------------------------ edge tests
def engine_for(model, tok, **kw):
    kw.setdefault("kv_cache_tokens", 4096)
    return npr.Engine(model, tok, **kw)


def trunk_text_upto(c, tok) -> list[str]:
    """Per token index i: the text of the trunk's sampled tokens through i (steps and injected
    tokens left out): a string of content characters that occurs here first at i is first
    completed by the trunk token i."""
    out, text = [], ""
    for t, b, inj in zip(c.token_ids, c.branch_ids, c.injected):
        if b == 0 and not inj:
            text += tok.decode([t], skip_special_tokens=False)
        out.append(text)
    return out


@pytest.fixture(scope="module")
def native_ref(model, tok, tag_ids, labels):
    """A seeded native request of two blocks (with a long final answer) and its two samples."""
    ids = tok.encode("stop here", add_special_tokens=False)
    f = ForcedStructure(tag_ids=tag_ids, labels=labels, eos_id=tok.eos_token_id, prompt_len=len(ids),
                        branches=[3, 2], step_tokens=5, prefix_tokens=0, takeaway_tokens=3, final_tokens=12)
    kw = dict(temperature=1.0, seed=11, n=2, max_new_tokens=400, logits_processors=[f])
    outs = engine_for(model, tok).generate(input_ids=[ids], sampling_params=npr.SamplingParams(**kw))[0]
    assert all(c.finish_reason == "stop" and c.structure_valid for c in outs.outputs)
    return ids, kw, outs.outputs


def final_part(c, tag_ids) -> int:
    """Index of the first token after the last </takeaway>."""
    return max(i for i, t in enumerate(c.token_ids) if t == tag_ids["</takeaway>"]) + 1


@pytest.mark.parametrize("parallel", ["native", "sequential"])
def test_stop_strings_in_native_mode_skip_steps_and_cut_the_trunk(model, tok, tag_ids, native_ref, parallel):
    """A stop string that only occurs inside steps changes nothing; one that occurs in a sample's
    final answer ends that sample there (finish "stop", text cut before the string), not the
    other sample."""
    ids, kw, ref = native_ref
    eng = engine_for(model, tok)
    c0 = ref[0]
    steps_text = tok.decode([t for t, b in zip(c0.token_ids, c0.branch_ids) if b], skip_special_tokens=False)
    trunk_texts = [trunk_text_upto(c, tok)[-1] for c in ref]
    in_steps = next(s for s in (steps_text[i:i + 2] for i in range(len(steps_text)))
                    if "<" not in s and ">" not in s and all(s not in t for t in trunk_texts))
    kw = dict(kw, parallel=parallel)
    got = eng.generate(input_ids=[ids], sampling_params=npr.SamplingParams(stop=[in_steps], **kw))[0].outputs
    assert [c.token_ids for c in got] == [c.token_ids for c in ref]
    assert all(c.finish_reason == "stop" and c.finish_detail == "" and c.structure_valid for c in got)

    # Two characters of sample 0's final answer that do not occur earlier in its trunk text.
    start = final_part(c0, tag_ids)
    texts = trunk_text_upto(c0, tok)
    k, stop = next((k, texts[k][-2:]) for k in range(start + 1, len(c0.token_ids) - 1)
                   if texts[k][-2:] not in texts[k - 1] and texts[k][-2:] not in trunk_texts[1]
                   and "<" not in texts[k][-2:] and ">" not in texts[k][-2:])
    got = eng.generate(input_ids=[ids], sampling_params=npr.SamplingParams(stop=[stop], **kw))[0].outputs
    assert got[0].token_ids == c0.token_ids[:k + 1]
    assert got[0].finish_reason == "stop" and got[0].finish_detail == f"stop string {stop!r}"
    full = tok.decode(c0.token_ids[:k + 1], skip_special_tokens=False)
    assert got[0].text == full[:full.rfind(stop)] and stop not in got[0].text
    assert got[0].structure_valid  # it stopped in the final answer, after both blocks
    assert got[1].token_ids == ref[1].token_ids and got[1].finish_detail == ""
    assert eng.pool_stats()["used_blocks"] == 0


@pytest.mark.parametrize("parallel", ["native", "sequential"])
def test_stop_strings_see_the_output_text_across_a_join(model, tok, tag_ids, native_ref, parallel):
    """Stop strings are matched on the response text as the output has it: "</guideline>" followed
    by the takeaway's first character is not in the output (the steps stand between) and must not
    stop; "<takeaway>" (injected) followed by it is, and stops the sample right there."""
    ids, kw, ref = native_ref
    eng = engine_for(model, tok)
    c0 = ref[0]
    j = c0.token_ids.index(tag_ids["<takeaway>"])
    first = tok.decode([c0.token_ids[j + 1]], skip_special_tokens=False)
    kw = dict(kw, parallel=parallel)
    absent = "</guideline>" + first
    assert absent not in tok.decode(c0.token_ids, skip_special_tokens=False)
    got = eng.generate(input_ids=[ids], sampling_params=npr.SamplingParams(stop=[absent], **kw))[0].outputs
    assert [c.token_ids for c in got] == [c.token_ids for c in ref]
    assert all(c.finish_detail == "" for c in got)
    present = "<takeaway>" + first
    got = eng.generate(input_ids=[ids], sampling_params=npr.SamplingParams(stop=[present], **kw))[0].outputs
    assert got[0].token_ids == c0.token_ids[:j + 2]
    assert got[0].finish_reason == "stop" and got[0].finish_detail == f"stop string {present!r}"
    full = tok.decode(c0.token_ids[:j + 2], skip_special_tokens=False)
    assert got[0].text == full[:full.rfind(present)]
    assert eng.pool_stats()["used_blocks"] == 0


def first_occurrence(c, where: str, tag_ids) -> tuple[int, int]:
    """(index, token) of a sampled content token of c that no token before it (in canonical
    order) holds, in `where`: "final" (the answer after the last block), "plan" (inside a plan)
    or "step" (inside a step, and in no sibling step either): the first time it is sampled."""
    tags = set(tag_ids.values())
    forks = fork_ids(c.branch_ids)
    start = final_part(c, tag_ids)
    in_plan = False
    for i, (t, b, inj) in enumerate(zip(c.token_ids, c.branch_ids, c.injected)):
        in_plan = (in_plan or t == tag_ids["<plan>"]) and t != tag_ids["</plan>"]
        if inj or t in tags or t in c.token_ids[:i]:
            continue
        if where == "final" and i >= start:
            return i, t
        if where == "plan" and in_plan:
            return i, t
        if where == "step" and b and [x for x, f in zip(c.token_ids, forks) if f == forks[i]].count(t) == 1:
            return i, t
    raise AssertionError(f"no token first sampled in a {where} (pick another seed)")


@pytest.mark.parametrize("where,reason,detail", [
    ("final", "stop", ""),
    ("step", "invalid_structure", "end of sequence inside a step"),
    ("plan", "invalid_structure", "end of sequence inside an open guideline/plan/takeaway"),
])
def test_stop_token_ids_in_native_mode(model, tok, tag_ids, native_ref, where, reason, detail):
    """A stop token id acts as EOS: in the final answer it ends the sample with "stop" (a valid
    structure); inside a step or a plan the structure is broken."""
    ids, kw, ref = native_ref
    c0 = ref[0]
    i, t = first_occurrence(c0, where, tag_ids)
    got = engine_for(model, tok).generate(input_ids=[ids], sampling_params=npr.SamplingParams(
        stop_token_ids=[t], **dict(kw, n=1)))[0].outputs[0]
    assert (got.finish_reason, got.finish_detail) == (reason, detail)
    assert got.structure_valid == (reason == "stop")
    if where == "step":
        # The trunk through </guideline>, every step a prefix of its full run, the stopped one
        # through t.
        g, w = by_branch(got.token_ids, got.branch_ids), by_branch(c0.token_ids, c0.branch_ids)
        assert g[0] == w[0][:len(g[0])] and g[0][-1] == tag_ids["</guideline>"]
        assert all(w[b][:len(toks)] == toks for b, toks in g.items())
        b = c0.branch_ids[i]
        assert g[b] == w[b][:c0.branch_ids[:i].count(b) + 1] and g[b][-1] == t
    else:
        assert got.token_ids == c0.token_ids[:i + 1]
    assert got.stats["generated_tokens"] == len(got.token_ids)


def test_stop_token_ids_in_plain_mode(model, tok):
    """parallel="off": the first sampled stop token id ends the request, kept as its last
    token, finish "stop"; several ids: whichever comes first."""
    eng = engine_for(model, tok)
    ids = tok.encode("plain stop", add_special_tokens=False)
    kw = dict(temperature=1.0, seed=3, parallel="off", max_new_tokens=40)
    full = eng.generate(input_ids=[ids], sampling_params=npr.SamplingParams(**kw))[0].outputs[0].token_ids
    assert len(full) == 40 and tok.eos_token_id not in full
    k1 = next(k for k in range(3, len(full)) if full[k] not in full[:k])
    k2 = next(k for k in range(k1 + 1, len(full)) if full[k] not in full[:k])
    for stops, k in (([full[k1]], k1), ([full[k2]], k2), ([full[k2], full[k1]], k1)):
        c = eng.generate(input_ids=[ids], sampling_params=npr.SamplingParams(stop_token_ids=stops, **kw))[0].outputs[0]
        assert c.token_ids == full[:k + 1] and c.finish_reason == "stop" and c.finish_detail == ""
        assert c.stats["generated_tokens"] == k + 1


@pytest.mark.parametrize("parallel", ["native", "sequential"])
def test_max_branch_tokens_caps_each_step(model, tok, tag_ids, labels, parallel):
    """max_branch_tokens counts a step's tokens, injected <step> "k:" included: a cap equal to
    the longest step changes nothing; one less ends the sample ("length") with that step at
    exactly the cap and no step longer; a cap below the smallest possible step ends it at the
    fork, before any step exists."""
    ids = tok.encode("capped", add_special_tokens=False)
    content = {1: 2, 2: 7, 3: 4}
    f = ForcedStructure(tag_ids=tag_ids, labels=labels, eos_id=tok.eos_token_id, prompt_len=len(ids),
                        branches=[3], step_tokens=lambda b, k: content[k], prefix_tokens=0)
    eng = engine_for(model, tok)

    def run(cap):
        sp = npr.SamplingParams(temperature=0, max_branch_tokens=cap, parallel=parallel, logits_processors=[f])
        return eng.generate(input_ids=[ids], sampling_params=sp)[0].outputs[0]

    free = run(None)
    steps = by_branch(free.token_ids, free.branch_ids)
    longest = max(len(steps[b]) for b in (1, 2, 3))
    assert longest == 1 + 2 + 7 + 1 and free.finish_reason == "stop"
    same = run(longest)
    assert same.token_ids == free.token_ids and same.finish_reason == "stop" and same.structure_valid
    cut = run(longest - 1)
    assert (cut.finish_reason, cut.finish_detail) == ("length", "a step reached max_branch_tokens")
    got = by_branch(cut.token_ids, cut.branch_ids)
    assert got[2] == steps[2][:longest - 1]
    assert max(len(got[b]) for b in got if b) == longest - 1
    assert all(steps[b][:len(t)] == t for b, t in got.items())
    assert not cut.structure_valid
    tiny = run(4)  # <step> "k:" needs 3 tokens, one of content and </step> 2 more
    assert (tiny.finish_reason, tiny.finish_detail) == ("length", "max_branch_tokens is too small for a step")
    assert not any(tiny.branch_ids) and tiny.token_ids[-1] == tag_ids["</guideline>"]
    assert eng.pool_stats()["used_blocks"] == 0


@pytest.mark.parametrize("parallel", ["off", "native"])
@pytest.mark.parametrize("cut", [dict(top_k=1), dict(top_p=1e-6)], ids=["top_k_1", "tiny_top_p"])
@pytest.mark.parametrize("temperature", [0.7, 1.5])
def test_top_k_1_and_tiny_top_p_equal_greedy(model, tok, tag_ids, labels, parallel, cut, temperature):
    """Keeping one token is greedy decoding whatever the temperature; the logprob of the
    distribution sampled from (one token left) is 0."""
    ids = tok.encode("greedy", add_special_tokens=False)
    procs = None
    if parallel == "native":
        procs = [ForcedStructure(tag_ids=tag_ids, labels=labels, eos_id=tok.eos_token_id, prompt_len=len(ids),
                                 branches=[3, 2], step_tokens=4, prefix_tokens=0)]
    eng = engine_for(model, tok)
    kw = dict(parallel=parallel, max_new_tokens=120, logits_processors=procs, n=2)
    greedy = eng.generate(input_ids=[ids], sampling_params=npr.SamplingParams(temperature=0, **kw))[0]
    one = eng.generate(input_ids=[ids], sampling_params=npr.SamplingParams(
        temperature=temperature, seed=9, **cut, **kw))[0]
    wide = eng.generate(input_ids=[ids], sampling_params=npr.SamplingParams(
        temperature=temperature, seed=9, **kw))[0]
    for g, o in zip(greedy.outputs, one.outputs):
        assert o.token_ids == g.token_ids and o.position_ids == g.position_ids
        assert all(lp == pytest.approx(0.0, abs=1e-6) for lp in o.logprobs if lp is not None)
    # The same seed without the cut samples something else: the cut is what made it greedy.
    assert [o.token_ids for o in wide.outputs] != [g.token_ids for g in greedy.outputs]


@pytest.mark.parametrize("parallel", ["off", "native"])
def test_logprobs_false_returns_none(model, tok, tag_ids, labels, parallel):
    """logprobs=False: CompletionOutput.logprobs and cumulative_logprob are None; the tokens
    are those of the same seeded request with logprobs."""
    ids = tok.encode("no logprobs", add_special_tokens=False)
    procs = None
    if parallel == "native":
        procs = [ForcedStructure(tag_ids=tag_ids, labels=labels, eos_id=tok.eos_token_id, prompt_len=len(ids),
                                 branches=[2], step_tokens=3, prefix_tokens=0)]
    eng = engine_for(model, tok)
    kw = dict(temperature=1.0, seed=2, n=2, parallel=parallel, max_new_tokens=60, logits_processors=procs)
    with_lp = eng.generate(input_ids=[ids], sampling_params=npr.SamplingParams(**kw))[0].outputs
    without = eng.generate(input_ids=[ids], sampling_params=npr.SamplingParams(logprobs=False, **kw))[0].outputs
    for a, b in zip(with_lp, without):
        assert b.logprobs is None and b.cumulative_logprob is None
        assert a.logprobs is not None and a.cumulative_logprob is not None
        assert (b.token_ids, b.position_ids, b.branch_ids, b.injected, b.finish_reason) == \
            (a.token_ids, a.position_ids, a.branch_ids, a.injected, a.finish_reason)


@pytest.mark.parametrize("kw", [dict(dtype=torch.bfloat16), dict(decode_weights="bf16"),
                                dict(dtype=torch.float16), dict(decode_weights="fp16"),
                                dict(dtype=torch.bfloat16, decode_weights="bf16")],
                         ids=["bf16_kv", "bf16_weights", "fp16_kv", "fp16_weights", "bf16_both"])
def test_half_precision_kv_cache_and_decode_weights(model, tok, tag_ids, labels, kw):
    """A half-precision KV cache (dtype=) or packed decode weights (decode_weights=) on an fp32
    model: greedy outputs stay valid and close to fp32 (same first tokens, logprobs within
    0.05 while the tokens agree, most tokens equal)."""
    import copy

    half = npr.Engine(copy.deepcopy(model), tok, kv_cache_tokens=4096, **kw)  # packs its own copy
    assert half.runner.k_caches[0].dtype == kw.get("dtype", torch.float32)
    full = engine_for(model, tok)
    prompts = [tok.encode(p, add_special_tokens=False) for p in ("hello world", "abc", "q7", "two plus two", "zz")]
    sp = npr.SamplingParams(temperature=0, max_new_tokens=30, parallel="off")
    agree = total = 0
    for a, b in zip(full.generate(input_ids=prompts, sampling_params=sp),
                    half.generate(input_ids=prompts, sampling_params=sp)):
        a, b = a.outputs[0], b.outputs[0]
        n = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), len(a.token_ids))
        assert n >= 5, (a.text, b.text)
        assert b.logprobs[:n] == pytest.approx(a.logprobs[:n], abs=0.05)
        assert b.logprobs[:n] != a.logprobs[:n] or kw.get("dtype") is None  # a half KV cache is used
        agree, total = agree + n, total + len(a.token_ids)
    assert agree >= 0.8 * total
    ids = tok.encode("half", add_special_tokens=False)
    f = ForcedStructure(tag_ids=tag_ids, labels=labels, eos_id=tok.eos_token_id, prompt_len=len(ids),
                        branches=[4, 2], step_tokens=5, prefix_tokens=0)
    sp = npr.SamplingParams(temperature=0, n=2, max_new_tokens=300, logits_processors=[f])
    for c in half.generate(input_ids=[ids], sampling_params=sp)[0].outputs:
        assert c.finish_reason == "stop" and c.structure_valid and c.stats["forks"] == 2
        assert all(math.isfinite(lp) for lp in c.logprobs if lp is not None)
    assert half.pool_stats()["used_blocks"] == 0


def short_context_pair(model, max_pos: int):
    """The module's model with a context of max_pos positions (same weights; RoPE does not
    depend on the context length)."""
    from npr.models.llama import LlamaDecoder

    small = LlamaDecoder(dataclasses.replace(model.config, max_position_embeddings=max_pos))
    small.load_state_dict(model.state_dict())
    return small.eval()


def test_plain_decoding_ends_at_the_context_length(model, tok):
    """A prompt near max_position_embeddings: generation stops with "length" at the last
    position (max - 1); a prompt of max - 1 tokens gets exactly one token."""
    M = 48
    eng = npr.Engine(short_context_pair(model, M), tok, kv_cache_tokens=1024)
    big = engine_for(model, tok)
    sp = npr.SamplingParams(temperature=0, max_new_tokens=100, parallel="off")
    for P in (M - 1, M - 2, M - 9, M - 30):
        ids = [(7 * i) % 40 + 3 for i in range(P)]
        c = eng.generate(input_ids=[ids], sampling_params=sp)[0].outputs[0]
        ref = big.generate(input_ids=[ids], sampling_params=npr.SamplingParams(
            temperature=0, max_new_tokens=M - P, parallel="off"))[0].outputs[0]
        if ref.finish_reason == "stop":  # EOS before the end of the context
            assert c.token_ids == ref.token_ids and c.finish_reason == "stop"
            continue
        assert (c.finish_reason, c.finish_detail) == ("length", "reached the model's context length")
        assert c.token_ids == ref.token_ids and len(c.token_ids) == M - P
        assert c.position_ids[-1] == M - 1
    with pytest.raises(ValueError, match="longer than the model's context"):
        eng.generate(input_ids=[[5] * M], sampling_params=sp)
    assert eng.pool_stats()["used_blocks"] == 0


def test_native_decoding_ends_at_the_context_length(model, tok, tag_ids, labels):
    """Native requests whose structure reaches the end of the context, every prompt length from
    far to max - 1 (so the limit falls on the trunk, a fork, inside steps and at the join): an
    output whose positions fit equals the long-context model's; otherwise it ends with "length"
    (context length), no position reaches max, and every branch is a prefix of the long run."""
    M = 96
    eng = npr.Engine(short_context_pair(model, M), tok, kv_cache_tokens=4096)
    big = engine_for(model, tok)
    prompts, params = [], []
    for P in range(M - 70, M):
        prompts.append([(5 * i) % 40 + 3 for i in range(P)])
        f = ForcedStructure(tag_ids=tag_ids, labels=labels, eos_id=tok.eos_token_id, prompt_len=P,
                            branches=[3, 2], step_tokens=lambda b, k: 2 + k, prefix_tokens=0,
                            takeaway_tokens=2, final_tokens=3)
        params.append(npr.SamplingParams(temperature=0, max_new_tokens=400, logits_processors=[f]))
    reasons = Counter()
    for ids, out, ref in zip(prompts, eng.generate(input_ids=prompts, sampling_params=params),
                             big.generate(input_ids=prompts, sampling_params=params)):
        c, ref = out.outputs[0], ref.outputs[0]
        assert ref.finish_reason == "stop"
        assert all(p < M for p in c.position_ids)
        if max(ref.position_ids) < M:
            assert c.token_ids == ref.token_ids and c.finish_reason == "stop" and c.structure_valid
            reasons["fits"] += 1
            continue
        assert (c.finish_reason, c.finish_detail) == ("length", "reached the model's context length"), len(ids)
        g, w = by_branch(c.token_ids, c.branch_ids), by_branch(ref.token_ids, ref.branch_ids)
        assert all(w[b][:len(t)] == t for b, t in g.items())
        assert c.stats["generated_tokens"] == len(c.token_ids)
        where = "step" if c.branch_ids and c.branch_ids[-1] else (
            "fork" if c.token_ids and c.token_ids[-1] == tag_ids["</guideline>"] else "trunk")
        reasons[where] += 1
        if where == "trunk":
            assert c.position_ids[-1] == M - 1
    assert eng.pool_stats()["used_blocks"] == 0
    assert all(reasons[k] > 0 for k in ("fits", "step", "fork", "trunk")), reasons


@pytest.mark.parametrize("parallel", ["native", "sequential"])
def test_abort_in_the_middle_of_a_fork(model, tok, tag_ids, labels, parallel):
    """Aborting a request whose samples are inside a fork (steps partly decoded) frees every KV
    block, leaves the other requests' outputs as they would be alone, and the engine serves the
    same request again with the same output."""
    eng = engine_for(model, tok, kv_cache_tokens=2048)
    ids = tok.encode("abort mid fork", add_special_tokens=False)
    f = ForcedStructure(tag_ids=tag_ids, labels=labels, eos_id=tok.eos_token_id, prompt_len=len(ids),
                        branches=[5, 3], step_tokens=6, prefix_tokens=0)
    sp = npr.SamplingParams(temperature=0, n=2, max_new_tokens=300, parallel=parallel, logits_processors=[f])
    other_ids = tok.encode("bystander", add_special_tokens=False)
    other_sp = npr.SamplingParams(temperature=1.0, seed=8, parallel="off", max_new_tokens=40)
    ref = eng.generate(input_ids=[ids], sampling_params=sp)[0].outputs
    other_ref = eng.generate(input_ids=[other_ids], sampling_params=other_sp)[0].outputs[0]
    assert eng.pool_stats()["used_blocks"] == 0

    rid = eng.add_request(None, sp, input_ids=ids)
    oid = eng.add_request(None, other_sp, input_ids=other_ids)
    done = {}

    def inside_fork() -> bool:
        o = [eng.scheduler.output(rid, s) for s in range(2)]
        return all(x["branch_ids"] and x["branch_ids"][-1] > 0 and not x["injected"][-1] for x in o)

    while not inside_fork():
        done.update({o.request_id: o for o in eng.step()})
        assert rid not in done
    assert eng.pool_stats()["used_blocks"] > 0
    outs = eng.abort([rid])
    assert [o.request_id for o in outs] == [rid]
    for c, w in zip(outs[0].outputs, ref):
        assert (c.finish_reason, c.finish_detail, c.structure_valid) == ("abort", "aborted", False)
        assert c.stats["forks"] == 1 and c.branch_ids[-1] > 0
        g, ww = by_branch(c.token_ids, c.branch_ids), by_branch(w.token_ids, w.branch_ids)
        assert all(ww[b][:len(t)] == t for b, t in g.items())
        assert len(c.logprobs) == len(c.token_ids)
    while eng.has_unfinished_requests():
        done.update({o.request_id: o for o in eng.step()})
    assert done[oid].outputs[0].token_ids == other_ref.token_ids
    assert eng.pool_stats()["used_blocks"] == 0 and eng.scheduler.num_running() == 0
    again = eng.generate(input_ids=[ids], sampling_params=sp)[0].outputs
    assert [c.token_ids for c in again] == [c.token_ids for c in ref]
    assert eng.pool_stats()["used_blocks"] == 0
