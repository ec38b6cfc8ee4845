"""Linear layer entry point used by the models: y = x @ W^T (+ b).

On CPU with fp32 activations and few rows (decode: one row per sampling branch) this runs a
weight-streaming kernel whose time stays near the weight-read time up to ~8 rows (torch's GEMM
pays 2-10x for 8 rows). The weight may be stored as fp32, bf16 or fp16: 16-bit weights are
widened to fp32 inside the kernel (half the bytes, fp32 compute).

    linear(x, weight, bias)        weight: [N, K] tensor -> torch.ops.npr.linear_small
    linear(x, packed, bias)        packed = pack_linear_weight(weight, dtype=...) ->
                                   torch.ops.npr.linear_packed (panels of 8 outputs: up to 8
                                   rows in one pass over the weights; the one to use: pack the
                                   weights once at load time)

Everything else (many rows with fp32 [N, K] weights, non-fp32 x, other devices) goes to
torch's F.linear, with 16-bit or packed weights widened / unpacked first.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from npr import _ext, env, ref

# Rows up to which the plain kernel is used for fp32 [N, K] weights: `npr bench linear` at 16
# rows has it even with torch's GEMM (0.83-1.4x over the 4 shapes), faster below. 16-bit and
# packed weights always take a kernel on CPU: torch would first have to widen / unpack the
# whole weight (and its bf16 GEMM is far slower), and the packed kernel is 1.6-3x torch at 16.
SMALL_ROWS_MAX = 16

_KERNEL_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_HAVE_EXT = _ext.available()

if _ext.available():

    @torch.library.register_fake("npr::linear_small")
    def _linear_small_fake(x: torch.Tensor, weight: torch.Tensor,
                           bias: torch.Tensor | None) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("npr::linear_packed")
    def _linear_packed_fake(x: torch.Tensor, packed: torch.Tensor, n: int,
                            bias: torch.Tensor | None) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], n))


@dataclass(frozen=True)
class _WeightLayout:
    """A linear weight [N, K] stored in a kernel's layout (data); reads like a [N, K] tensor."""

    data: torch.Tensor
    out_features: int  # N
    in_features: int  # K

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def is_cpu(self) -> bool:
        return self.data.is_cpu


@dataclass(frozen=True)
class PackedWeight(_WeightLayout):
    """A linear weight [N, K] repacked for npr::linear_packed.

    data: [ceil(N/8), K, 8] in the storage dtype (fp32 / bf16 / fp16), zero-padded past N:
    panel p, row k holds the weights k of outputs 8p..8p+7, so the kernel reads one sequential
    stream and each weight vector meets every x row (up to 8 in one pass) while it is loaded.
    """

    def unpack(self) -> torch.Tensor:
        """-> [N, K] in the storage dtype."""
        return ref.unpack_weight(self.data, self.out_features, self.in_features)


@dataclass(frozen=True)
class GemmPanels(_WeightLayout):
    """A linear weight [N, K] laid out for npr::linear_fused's many-row GEMM on AVX-512 CPUs.

    data: [ceil(N/32), K, 32] fp32, zero-padded: panel p holds outputs 32p..32p+31 with the 32
    weights of each input k side by side, so the kernel's register block (rows x 32 outputs)
    loads two vectors per k and no call re-packs the weight (as a plain GEMM does every call).
    """

    def unpack(self) -> torch.Tensor:
        """-> [N, K]."""
        return ref.unpack_gemm_panels(self.data, self.out_features)


def gemm_panels_available() -> bool:
    """The many-row GEMM on panels runs here: npr._C built, the CPU has AVX-512 (and
    NPR_CPU_ISA does not force AVX2), no NPR_FORCE_REF."""
    return _HAVE_EXT and _ext._C.cpu_isa() == "avx512" and not env.force_reference()


def pack_gemm_weight(weight: torch.Tensor) -> GemmPanels:
    """weight: [N, K] fp32 -> GemmPanels (a copy of the weight)."""
    if weight.dim() != 2 or weight.dtype != torch.float32:
        raise ValueError(f"pack_gemm_weight: weight must be a float32 [N, K], got "
                         f"{weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape
    return GemmPanels(ref.pack_gemm_panels(weight.detach()), n, k)


def pack_linear_weight(weight: torch.Tensor, dtype: torch.dtype | None = None) -> PackedWeight:
    """weight: [N, K] -> PackedWeight stored as dtype (default weight.dtype; fp32, bf16 or fp16).

    Done once at load time; it costs a copy of the weight.
    """
    dtype = weight.dtype if dtype is None else dtype
    if weight.dim() != 2:
        raise ValueError(f"pack_linear_weight: weight must be [N, K], got {tuple(weight.shape)}")
    if dtype not in _KERNEL_WEIGHT_DTYPES:
        raise ValueError(f"pack_linear_weight: dtype must be float32, bfloat16 or float16, "
                         f"got {dtype}")
    n, k = weight.shape
    return PackedWeight(ref.pack_weight(weight.detach().to(dtype)), n, k)


def _rows(x: torch.Tensor) -> int:
    k = x.shape[-1]
    return x.numel() // k if k else 0


# The checks below run on every decode-step linear (~120 per SmolLM2 step): cheap tests first
# (tensor.is_cpu is ~5x cheaper than tensor.device.type); the env knob (~1 us to read) last.
def _kernel_ok(x: torch.Tensor, weight: torch.Tensor | PackedWeight | GemmPanels,
               bias: torch.Tensor | None) -> bool:
    """x fp32 on CPU, weight storage the kernels read, the extension built, no NPR_FORCE_REF."""
    wd = weight.data if isinstance(weight, (PackedWeight, GemmPanels)) else weight
    return (x.dtype == torch.float32 and x.is_cpu and wd.is_cpu and x.dim() >= 1
            and wd.dtype in _KERNEL_WEIGHT_DTYPES and (bias is None or bias.is_cpu)
            and _HAVE_EXT and not env.force_reference())


def _use_kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether linear(x, weight: [N, K] tensor, bias) runs npr::linear_small."""
    if weight.dim() != 2 or not _kernel_ok(x, weight, bias):
        return False
    return weight.dtype != torch.float32 or 0 < _rows(x) <= SMALL_ROWS_MAX


def linear(x: torch.Tensor, weight: torch.Tensor | PackedWeight | GemmPanels,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., K], weight: [N, K] tensor, PackedWeight or GemmPanels, bias: [N] or None ->
    [..., N].

    For fp32 x the result is fp32 whatever the weight storage; for other x dtypes the weight and
    bias are cast to x.dtype (torch semantics).
    """
    if isinstance(weight, GemmPanels):
        if _kernel_ok(x, weight, bias) and gemm_panels_available():
            return torch.ops.npr.linear_fused(x, weight.data, weight.out_features, _f32(bias),
                                              None, 1e-6, False, None)
        weight = weight.unpack()
    if isinstance(weight, PackedWeight):
        if _kernel_ok(x, weight, bias):
            return torch.ops.npr.linear_packed(x, weight.data, weight.out_features, _f32(bias))
        weight = weight.unpack()
    elif _use_kernel(x, weight, bias) and not (
            torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        # (the kernel has no backward: a forward that records gradients takes F.linear)
        return torch.ops.npr.linear_small(x, weight, _f32(bias))
    if env.force_reference():
        return ref.linear(x, weight, bias)
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    return F.linear(x, weight, bias)


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.dtype == torch.float32 else t.float()
