"""Shared pieces of the integration tests (no tests here): a tiny HF Llama folder with the
char-level tag tokenizer, random forced structures, and a logits processor that records the raw
log-probs the engine decoded with (the engine's own numbers, before forcing)."""
from __future__ import annotations

import random

import torch

from npr.bench.forcing import ForcedStructure
from tiny import tiny_tokenizer


def hf_folder(path: str, seed: int = 0, *, hidden: int = 64, layers: int = 2) -> str:
    """Saves a tiny random LlamaForCausalLM (tied head) + the char-level tag tokenizer."""
    import transformers

    tok = tiny_tokenizer()
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
        head_dim=hidden // 2, max_position_embeddings=1024, tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=None)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger weights than the default init: peaked, varied distributions
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def labels_of(tok) -> list[list[int]]:
    return [tok.encode(f"{k}:", add_special_tokens=False) for k in range(1, 9)]


def random_forcer(tok, tag_ids, prompt_len: int, rng: random.Random, *, max_blocks: int = 3,
                  max_branches: int = 8, branches: list[int] | None = None) -> ForcedStructure:
    """A random structure: 1..max_blocks blocks of 1..max_branches steps (or `branches`), ragged
    step lengths."""
    if branches is None:
        branches = [rng.randint(1, max_branches) for _ in range(rng.randint(1, max_blocks))]
    lens = {(b, k): rng.randint(1, 9) for b in range(len(branches)) for k in range(1, 9)}
    return ForcedStructure(tag_ids=tag_ids, labels=labels_of(tok), eos_id=tok.eos_token_id,
                           prompt_len=prompt_len, branches=branches,
                           step_tokens=lambda b, k: lens[(b, k)], plan_tokens=rng.randint(1, 2),
                           prefix_tokens=0, takeaway_tokens=rng.randint(1, 3),
                           final_tokens=rng.randint(1, 3))


class RawRecorder:
    """Logits processor wrapper: records log_softmax(logits) of every decoded row (keyed by the
    row's visible context) before `inner` processes them."""

    def __init__(self, inner=None) -> None:
        self.inner = inner
        self.rows: dict[tuple[int, ...], torch.Tensor] = {}

    def __call__(self, visible: list[int], logits: torch.Tensor) -> torch.Tensor:
        self.rows[tuple(visible)] = torch.log_softmax(logits.float(), -1)
        return logits if self.inner is None else self.inner(visible, logits)

    def raw(self, full: list[int], mask: torch.Tensor, i: int) -> torch.Tensor:
        """log-softmax row the engine sampled token i of `full` from (mask: Layout.mask())."""
        key = tuple(full[j] for j in range(i) if bool(mask[i - 1, j]))
        return self.rows[key]
