"""GGUF files (llama.cpp) of the llama / qwen2 / qwen3 architectures -> ModelConfig + HF-named
tensors. Quantized tensors are dequantized with gguf.quants.dequantize (to fp32).

llama.cpp's converter permutes the q_proj / k_proj rows (weights and biases) of the *llama*
architecture for its interleaved RoPE; `unpermute_qk` undoes it exactly as transformers'
GGUF loader does (LlamaTensorProcessor._reverse_permute_weights). qwen2 / qwen3 files use the
NeoX layout and are stored unpermuted.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from npr.models.config import MAX_SIZE, ModelConfig

ARCHITECTURES = ("llama", "qwen2", "qwen3")

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Tensors that are not HF weights: llama.cpp's llama3 rope frequency factors (applied to the
# model's inv_freq instead).
ROPE_FREQS = "rope_freqs.weight"


def open_reader(path: str) -> Any:
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as e:  # the gguf package raises assorted errors on a bad file
        raise ValueError(f"{path}: not a readable GGUF file: truncated, corrupt or not GGUF "
                         f"({type(e).__name__}: {e})") from e


def field(reader: Any, key: str, default: Any = None, path: str = "") -> Any:
    """The value of a GGUF metadata key (scalar, str, or list); path: the file, for errors."""
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except (UnicodeDecodeError, ValueError, IndexError) as e:  # corrupt bytes in the field
        raise ValueError(f"{path}: GGUF metadata {key} cannot be read ({type(e).__name__}: "
                         f"{e})") from e


def hf_name(gguf_name: str) -> str | None:
    """GGUF tensor name -> HF parameter name (None if unknown)."""
    base, _, suffix = gguf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        return None
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{suffix}"
    return None


def config_from_gguf(reader: Any, path: str = "") -> ModelConfig:
    arch = field(reader, "general.architecture", path=path)
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported "
                         f"(supported: {', '.join(ARCHITECTURES)})")
    names = {t.name for t in reader.tensors}

    def key(k: str, default: Any = None, required: bool = False) -> Any:
        v = field(reader, f"{arch}.{k}", default, path)
        if v is None and required:
            raise ValueError(f"{path}: GGUF metadata {arch}.{k} is missing")
        return v

    def size(k: str, default: Any = None, required: bool = False) -> Any:
        """A size field: an int in [1, MAX_SIZE] (checked here, so errors name the key)."""
        v = key(k, default, required)
        if v is not None and (not isinstance(v, (int, np.integer)) or isinstance(v, bool)
                              or not 0 < int(v) <= MAX_SIZE):
            raise ValueError(f"{path}: GGUF metadata {arch}.{k} must be an int in "
                             f"[1, 2**31 - 1], got {v!r}")
        return None if v is None else int(v)

    hidden = size("embedding_length", required=True)
    heads = size("attention.head_count", required=True)
    head_dim = (size("attention.key_length") or size("rope.dimension_count")
                or hidden // heads)
    vocab = size("vocab_size")
    if vocab is None:
        tokens = field(reader, "tokenizer.ggml.tokens", path=path)
        vocab = len(tokens) if tokens is not None else None
    if vocab is None and "token_embd.weight" in names:
        vocab = int(_shape(next(t for t in reader.tensors if t.name == "token_embd.weight"))[0])
    if vocab is None:
        raise ValueError(f"{path}: cannot tell the vocabulary size from the GGUF metadata")
    max_pos = size("context_length", 4096)
    rope: dict[str, Any] = {"rope_type": "default"}
    scaling_type = key("rope.scaling.type")
    if scaling_type in ("linear", "yarn"):
        rope = {"rope_type": scaling_type, "factor": float(key("rope.scaling.factor", 1.0))}
        orig = key("rope.scaling.original_context_length")
        if scaling_type == "yarn":
            rope["original_max_position_embeddings"] = int(orig or max_pos)
    elif scaling_type not in (None, "none"):
        raise NotImplementedError(
            f"{path}: GGUF rope.scaling.type {scaling_type!r} is not supported")
    qkv_bias = "blk.0.attn_q.bias" in names
    inter, layers = size("feed_forward_length", required=True), size("block_count", required=True)
    kv_heads = size("attention.head_count_kv", heads)
    special = {k: field(reader, f"tokenizer.ggml.{k}_token_id", path=path)
               for k in ("bos", "eos", "padding")}
    try:
        return ModelConfig(
            vocab_size=int(vocab), hidden_size=hidden,
            intermediate_size=inter, num_layers=layers, num_heads=heads,
            num_kv_heads=kv_heads, head_dim=int(head_dim),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(key("rope.freq_base", 10000.0)), rope_scaling=rope,
            max_position_embeddings=max_pos, qkv_bias=qkv_bias,
            o_bias="blk.0.attn_output.bias" in names, mlp_bias="blk.0.ffn_down.bias" in names,
            qk_norm="blk.0.attn_q_norm.weight" in names,
            tie_word_embeddings="output.weight" not in names, model_type=arch,
            bos_token_id=special["bos"], eos_token_id=special["eos"],
            pad_token_id=special["padding"],
        )
    except (TypeError, ValueError) as e:  # ModelConfig's checks, a non-numeric field
        raise ValueError(f"{path}: {e}") from e


def _shape(tensor: Any) -> tuple[int, ...]:
    """GGUF stores dims fastest-first; torch order is the reverse."""
    return tuple(int(s) for s in reversed(tensor.shape))


def tensor_shapes(reader: Any) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> shape in torch order, from the header only."""
    return {t.name: _shape(t) for t in reader.tensors}


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation. w: [n_head * D, ...] (weight or bias)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def iter_tensors(reader: Any, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, fp32 tensor) for every weight, dequantized and un-permuted."""
    from gguf import dequantize

    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            continue
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise NotImplementedError(f"GGUF tensor {t.name!r}: {e}") from e
        w = np.asarray(w, dtype=np.float32).reshape(_shape(t))
        if cfg.model_type == "llama":
            if ".q_proj." in name:
                w = unpermute_qk(w, cfg.num_heads)
            elif ".k_proj." in name:
                w = unpermute_qk(w, cfg.num_kv_heads)
        w = np.ascontiguousarray(w)
        if not w.flags.writeable:  # an F32 tensor is a view of the read-only file mapping
            w = w.copy()
        yield name, torch.from_numpy(w)


def rope_freq_factors(reader: Any) -> torch.Tensor | None:
    """llama.cpp's per-frequency divisors (llama3 rope) if the file has them: [head_dim/2]."""
    from gguf import dequantize

    for t in reader.tensors:
        if t.name == ROPE_FREQS:
            w = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
            return torch.from_numpy(w.copy())
    return None
