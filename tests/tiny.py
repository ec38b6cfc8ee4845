"""Tiny offline building blocks for engine tests: a char-level tokenizer with the eight tags as
special tokens, and small random Llama-family decoders."""
from __future__ import annotations

import torch

from npr.tags import TAGS

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 :.,{}\\+-=()"


def tiny_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in CHARS:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.add_special_tokens({"additional_special_tokens": list(TAGS)})
    return fast


def tiny_model(vocab_size: int, seed: int = 0, *, layers: int = 2, hidden: int = 128, heads: int = 2,
               kv_heads: int = 1, head_dim: int = 64, qk_norm: bool = False, model_type: str = "llama"):
    from npr.models.config import ModelConfig
    from npr.models.llama import LlamaDecoder

    cfg = ModelConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                      max_position_embeddings=4096, qk_norm=qk_norm, model_type=model_type,
                      tie_word_embeddings=True)
    model = LlamaDecoder(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1] ** 0.5))
    return model.eval()
