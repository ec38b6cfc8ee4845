"""The compiled tree-attention planner (csrc/tree_attention_plan.cpp) against the step-by-step
numpy planner: the same items in the same order, the same partial and merge lists, the same
host-side facts, and the same errors, over random trees."""
from __future__ import annotations

import pytest
import torch

from npr import _ext
from npr.ops import attention as A
from tests.test_tree_attention import _small, random_tree

pytestmark = pytest.mark.skipif(not _ext.available(), reason="npr._C not built")


def _same(a: A.TreeAttentionPlan, b: A.TreeAttentionPlan) -> None:
    for x, y, name in zip(a.tensors(), b.tensors(), ("q_indptr", "seg_indptr", "seg_blocks",
                                                       "seg_fills", "row_seg_indptr", "row_segs",
                                                       "item_ents", "item_part_indptr", "part_q",
                                                       "part_nvis", "q_part_indptr", "q_parts")):
        assert x.dtype == y.dtype == torch.int32, name
        assert torch.equal(x, y), name
    for f in ("block_size", "num_queries", "max_item_parts", "row_lens", "kv_tokens_read"):
        assert getattr(a, f) == getattr(b, f), f


@pytest.mark.parametrize("seed", range(60))
def test_compiled_plan_equals_the_reference(seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda a, b: int(torch.randint(a, b + 1, (1,), generator=g))  # noqa: E731
    bs = [1, 4, 16, 64][seed % 4]
    tree, nb = random_tree(g, bs=bs, depth=r(1, 3), max_fan=r(1, 6), seg_tok=(1, r(2, 300)),
                           qlen=r(1, 3), n_loose=r(0, 3), prefill_loose=seed % 3 == 0)
    kw = dict(block_size=bs, num_blocks=nb, kv_chunk=[8, 64, 1024][seed % 3],
              max_item_queries=[1, 5, 64][(seed // 3) % 3])
    _same(A.plan(**tree, **kw), A.plan(**tree, **kw, reference=True))


def test_no_rows_and_no_queries():
    empty = {"q_indptr": [0], "seg_indptr": [0], "seg_blocks": [], "seg_fills": [],
             "row_seg_indptr": [0], "row_segs": []}
    _same(A.plan(**empty, block_size=4), A.plan(**empty, block_size=4, reference=True))
    idle = dict(_small(), q_indptr=[0, 0, 0])
    _same(A.plan(**idle, block_size=4), A.plan(**idle, block_size=4, reference=True))


_BAD = [
    (dict(row_segs=[0, 1, 1, 2]), {}),
    (dict(row_seg_indptr=[0, 2, 4], row_segs=[0, 0, 0, 2]), {}),
    (dict(seg_fills=[4, 0, 3, 4]), {}),
    (dict(seg_fills=[5, 2, 3, 4]), {}),
    ({}, dict(num_blocks=3)),
    ({}, dict(num_blocks=0)),  # a pool of no blocks: every block id is out of range
    (dict(q_indptr=[0, 10, 11]), {}),
    (dict(row_segs=[0, 1, 0, 3]), {}),
    (dict(row_seg_indptr=[0, 2]), {}),
    (dict(seg_indptr=[0, 2, 3, 5]), {}),
    (dict(q_indptr=[1, 2, 3]), {}),
    (dict(seg_fills=[4, 2, 3]), {}),
]


@pytest.mark.parametrize("change,kw", _BAD)
def test_both_planners_reject_a_bad_tree_with_the_same_message(change, kw):
    tree = dict(_small(), **change)
    with pytest.raises(ValueError) as ref:
        A.plan(**tree, block_size=4, **kw, reference=True)
    with pytest.raises(ValueError) as got:
        A.plan(**tree, block_size=4, **kw)
    assert str(got.value) == str(ref.value)


@pytest.mark.parametrize("reference", [False, True], ids=["compiled", "reference"])
def test_a_rows_private_segments_make_one_item(reference):
    # Rows 0 and 1 read prompt 0 then trunk 1 / prompt 2 then trunk 3 alone: one item each, over
    # both segments' entries. Rows 2 and 3 share root 4 (its own item, read once for both), then
    # their own branches 5 and 6; row 4 reads 7 then 9, not adjacent: two items.
    bs = 4
    segs = [[(0, 4), (1, 2)], [(2, 3)], [(3, 4)], [(4, 1)], [(5, 4)], [(6, 2)], [(7, 3)],
            [(8, 4)], [(9, 4)], [(10, 1)]]
    rows = [[0, 1], [2, 3], [4, 5], [4, 6], [7, 9]]
    tree = {"q_indptr": [0, 1, 2, 3, 4, 5],
            "seg_indptr": [0] + list(torch.tensor([len(s) for s in segs]).cumsum(0).tolist()),
            "seg_blocks": [b for s in segs for b, _ in s], "seg_fills": [f for s in segs for _, f in s],
            "row_seg_indptr": [0] + list(torch.tensor([len(r) for r in rows]).cumsum(0).tolist()),
            "row_segs": [s for r in rows for s in r]}
    p = A.plan(**tree, block_size=bs, reference=reference)
    ents = p.tensors()[6].view(-1, 2).tolist()
    assert sorted(map(tuple, ents)) == sorted([(0, 3), (3, 5), (5, 6), (6, 7), (7, 8), (8, 9),
                                               (10, 11)])
    assert p.num_items == 7
