"""`npr bench speedup`'s HF peers: the phases read off a native output, and the batched HF peer
decoding exactly those phases (forward calls and rows counted on a tiny transformers Llama)."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from npr.bench import speedup


def test_phases_of_a_native_output():
    # prompt 3 (not in the output), 4 trunk tokens, branches of 3 and 5 tokens, 2 after the join
    out = SimpleNamespace(token_ids=list(range(14)), branch_ids=[0] * 4 + [1] * 3 + [2] * 5 + [0] * 2)
    assert speedup._phases(out, 3) == {"pre": 4, "branches": [3, 5], "post": 2}
    flat = SimpleNamespace(token_ids=[1, 2, 3], branch_ids=[0, 0, 0])
    assert speedup._phases(flat, 3) == {"pre": 3, "branches": [], "post": 0}


def test_hf_batched_decodes_the_phases_with_the_branches_as_one_batch():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2)).eval()
    calls: list[tuple[int, int]] = []  # (rows, tokens) of each forward
    model.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(tuple((args[0] if args else kwargs["input_ids"]).shape)),
        with_kwargs=True)
    ph = {"pre": 4, "branches": [3, 5, 5], "post": 2}
    assert speedup._hf_batched(model, [1, 2, 3], ph, "cpu") > 0
    want = [(1, 3)] + [(1, 1)] * 4 + [(3, 1)] * 5 + [(1, 10)] + [(1, 1)] * 2
    assert calls == want
    calls.clear()
    speedup._hf_batch1(model, [1, 2, 3], ph, "cpu")
    assert sum(t for r, t in calls if r == 1) - 3 == 4 + 13 + 2 - 1  # prompt, then 1 per token
