"""Rotary position embeddings with the HF scaling variants of the Llama family.

Frequencies follow transformers' modeling_rope_utils formula by formula (fp32), so logits match
the HF models to fp32 rounding. Rotation is the "rotate half" (NeoX) layout HF uses; GGUF files of
the llama architecture store q/k rows permuted for llama.cpp's interleaved layout, and the GGUF
loader undoes that permutation.
"""
from __future__ import annotations

import math

import torch

from npr.models.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """-> (inv_freq [head_dim/2] fp32, attention scaling applied to cos/sin)."""
    r = cfg.rope_scaling
    rope_type = r["rope_type"]
    base, dim = cfg.rope_theta, cfg.head_dim
    exps = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim
    inv_freq = 1.0 / (base ** exps)
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / r["factor"], 1.0
    if rope_type == "llama3":
        return _llama3(inv_freq, r), 1.0
    if rope_type == "yarn":
        return _yarn(base, dim, r)
    raise ValueError(f"rope_type {rope_type!r} is not supported")


def _llama3(inv_freq: torch.Tensor, r: dict) -> torch.Tensor:
    factor, lo, hi = r["factor"], r["low_freq_factor"], r["high_freq_factor"]
    old_ctx = r["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_ctx / lo, old_ctx / hi
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths: divide by factor; short: keep; in between: interpolate smoothly
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(base: float, dim: int, r: dict) -> tuple[torch.Tensor, float]:
    factor = r["factor"]
    orig = r["original_max_position_embeddings"]
    attention_factor = r.get("attention_factor")
    mscale, mscale_all_dim = r.get("mscale"), r.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = r.get("beta_fast") or 32
    beta_slow = r.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if r.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extra_factor = 1 - ramp
    inv_freq = interpolation * (1 - extra_factor) + extrapolation * extra_factor
    return inv_freq, float(attention_factor)


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, scaling: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids: [...] int -> cos, sin: [..., head_dim] in dtype (computed in fp32)."""
    freqs = position_ids[..., None].float() * inv_freq.to(device=position_ids.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


class RopeTable:
    """cos/sin of every position up to a bound, computed once (the engine's steps look rows up
    instead of recomputing them: 7 tensor ops -> 2 row gathers). Grows by doubling; rebuilt when
    inv_freq, the scaling, the dtype or the device change."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._cos = self._sin = torch.zeros(0)

    def __call__(self, position_ids: torch.Tensor, inv_freq: torch.Tensor, scaling: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids: [T] int (>= 0) -> cos, sin: [T, head_dim], as rope_cos_sin's rows."""
        need = int(position_ids.max()) + 1 if position_ids.numel() else 0
        key = (inv_freq.data_ptr(), inv_freq._version, scaling, dtype, position_ids.device)
        if key != self._key or need > self._cos.shape[0]:
            n = max(need, 2 * self._cos.shape[0] if key == self._key else 0, 1024)
            pos = torch.arange(n, device=position_ids.device)
            self._cos, self._sin = rope_cos_sin(pos, inv_freq, scaling, dtype)
            self._key = key
        return self._cos.index_select(0, position_ids), self._sin.index_select(0, position_ids)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., H, D], cos/sin: [..., D] -> [..., H, D] (rotate-half layout)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
