"""Attention under the training layout (spec §2), forward and backward, no [T, T] tensor.

Token i of a packed row may attend key j  <=>  seq_start[i] <= j <= i  and not
hole_start[i] <= j < hole_end[i]. Every query's visible keys are then at most three intervals:
[seq_start, hole_start), [hole_end, r) and its own run [r, i] (r = the first token of the maximal
run of tokens sharing i's (seq_start, hole_start, hole_end)). So attention splits into pieces
that need no mask at all:

    causal piece  queries [a, e) x keys [a, e), causal (square: top-left == lower-right)
    full piece    queries [a, e) x keys [k0, k1), every key visible (k1 <= a)

A canonical trajectory gives, per block, one full piece for steps 2..n together (keys: everything
before the block's first step), one causal piece per step, and pieces for the causal runs between
(prompt, guideline + step 1, takeaway + next guideline + its step 1, ...). Each piece is one call
of torch's CPU flash attention (aten._scaled_dot_product_flash_attention_for_cpu: GEMM tiles,
log-sum-exp out), and a query's pieces merge by log-sum-exp. The backward calls the flash
backward once per piece with the MERGED output and log-sum-exp: P = exp(S - lse_merged) and
D = rowsum(dO * O_merged) are then exactly the merged attention's, so each piece's dq, dk, dv
are its share of the true gradient (the trick ring attention uses). Compute follows the visible
(query, key) pairs, with no masked element and no per-element mask anywhere.

`npr.bench.train_attention` measured this against a C++ FlashAttention-2 style tile kernel
and torch's own paths (bench/RESULTS.md). On CUDA the op runs FlexAttention with a block mask
built from the same three tensors (`flex_mask_mod`; its CPU forward is the CPU-testable twin).

    plan = LayoutAttentionPlan.build(seq_start, hole_start, hole_end)   # once per batch
    out = layout_attention(q [T,Hq,D], k [T,Hkv,D], v [T,Hkv,D], plan)  # each layer
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from npr import _ext, env

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass(frozen=True, eq=False)
class LayoutAttentionPlan:
    """One packed row's layout cut into runs; built once per batch, shared by all layers.

    runs [R, 6] long (CPU): (a, e, k0a, k1a, k0b, k1b): queries i in [a, e) see keys
    [k0a, k1a) + [k0b, k1b) + [a, i] (the two extra ranges end at or before a; either may be
    empty). A run is a maximal stretch of tokens sharing (seq_start, hole_start, hole_end)."""

    seq_start: torch.Tensor   # [T] long, as given (on the data's device)
    hole_start: torch.Tensor  # [T] long
    hole_end: torch.Tensor    # [T] long
    runs: torch.Tensor        # [R, 6] long, CPU
    _cache: dict = field(default_factory=dict, repr=False)  # composed pieces, flex block masks

    @property
    def num_tokens(self) -> int:
        return int(self.seq_start.numel())

    @property
    def visible_pairs(self) -> int:
        """(query, key) pairs attended, per head: the work (4 * D * pairs FLOPs forward)."""
        r = self.runs
        n = r[:, 1] - r[:, 0]
        return int((n * ((r[:, 3] - r[:, 2]) + (r[:, 5] - r[:, 4])) + n * (n + 1) // 2).sum())

    @property
    def pieces(self) -> torch.Tensor:
        """[P, 5] (q0, q1, k0, k1, causal): the composed path's SDPA calls (pieces_from_runs)."""
        if "pieces" not in self._cache:
            self._cache["pieces"] = pieces_from_runs(self.runs)
        return self._cache["pieces"]

    @staticmethod
    def build(seq_start: torch.Tensor, hole_start: torch.Tensor,
              hole_end: torch.Tensor) -> "LayoutAttentionPlan":
        """seq_start, hole_start, hole_end: [T] int (npr.train.logprobs.PackedBatch fields).
        Raises ValueError naming the first bad token when they are not a layout (a trajectory
        that is not contiguous, a hole reversed or outside [seq_start, i))."""
        for name, t in (("seq_start", seq_start), ("hole_start", hole_start),
                        ("hole_end", hole_end)):
            if not isinstance(t, torch.Tensor) or t.dim() != 1:
                raise ValueError(f"layout_attention: {name} must be a 1-D tensor, got "
                                 f"{list(t.shape) if isinstance(t, torch.Tensor) else type(t)}")
            if t.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"layout_attention: {name} must be int64/int32, got {t.dtype}")
            if t.numel() != seq_start.numel():
                raise ValueError(f"layout_attention: {name} has {t.numel()} entries, seq_start "
                                 f"{seq_start.numel()}")
        runs = _runs(*(t.detach().to("cpu", torch.long) for t in
                       (seq_start, hole_start, hole_end)))
        return LayoutAttentionPlan(seq_start, hole_start, hole_end, runs)


def _first_bad(bad: torch.Tensor) -> int:
    return int(bad.nonzero()[0, 0])


def _runs(s: torch.Tensor, h0: torch.Tensor, h1: torch.Tensor) -> torch.Tensor:
    """[T] long x3 (CPU) -> runs [R, 6] long (LayoutAttentionPlan), validated."""
    T = s.numel()
    i = torch.arange(T)
    if T == 0:
        return torch.zeros(0, 6, dtype=torch.long)
    bad = (s < 0) | (s > i)
    if bool(bad.any()):
        t = _first_bad(bad)
        raise ValueError(f"layout_attention: token {t} has seq_start {int(s[t])}, outside [0, {t}]")
    # trajectories are contiguous: a seq_start that changes begins at its own token
    bad = torch.zeros(T, dtype=torch.bool)
    bad[1:] = (s[1:] != s[:-1]) & (s[1:] != i[1:])
    if bool(bad.any()):
        t = _first_bad(bad)
        raise ValueError(f"layout_attention: token {t} has seq_start {int(s[t])}, but token "
                         f"{t - 1} has {int(s[t - 1])}: a trajectory must be contiguous")
    if bool((h0 > h1).any()):
        t = _first_bad(h0 > h1)
        raise ValueError(f"layout_attention: token {t} has hole_start {int(h0[t])} > hole_end "
                         f"{int(h1[t])}")
    hole = h0 < h1
    bad = hole & ((h0 < s) | (h1 > i))
    if bool(bad.any()):
        t = _first_bad(bad)
        raise ValueError(f"layout_attention: token {t}'s hole [{int(h0[t])}, {int(h1[t])}) lies "
                         f"outside the keys it may see [{int(s[t])}, {t}) (a token must see "
                         f"itself)")
    h0 = torch.where(hole, h0, s)  # empty holes: one spelling, so runs do not split on them
    h1 = torch.where(hole, h1, s)
    new = torch.ones(T, dtype=torch.bool)
    new[1:] = (s[1:] != s[:-1]) | (h0[1:] != h0[:-1]) | (h1[1:] != h1[:-1])
    a = new.nonzero()[:, 0]
    e = torch.cat([a[1:], torch.tensor([T])])
    sa, has = s[a], h0[a] < h1[a]
    # visible from run [a, e): [sa, h0) + [h1, a) + [a, i]; without a hole [sa, a) + [a, i]
    k1a = torch.where(has, h0[a], a)
    k0b = torch.where(has, h1[a], a)
    return torch.stack([a, e, sa, k1a, k0b, a], dim=1).contiguous()


def pieces_from_runs(runs: torch.Tensor) -> torch.Tensor:
    """runs [R, 6] -> pieces [P, 5] (q0, q1, k0, k1, causal) of the composed path: one causal
    piece per run first, then the full pieces; consecutive runs reading the same key range (the
    steps 2..n of one block) share one full piece."""
    causal, full = [], []  # full: (k0, k1, q0, q1)
    for a, e, k0a, k1a, k0b, k1b in runs.tolist():
        causal.append((a, e, a, e, 1))
        for k0, k1 in ((k0a, k1a), (k0b, k1b)):
            if k1 > k0:
                if full and full[-1][:2] == (k0, k1) and full[-1][3] == a:
                    full[-1] = (k0, k1, full[-1][2], e)
                else:
                    full.append((k0, k1, a, e))
    rows = causal + [(q0, q1, k0, k1, 0) for k0, k1, q0, q1 in full]
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 5)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: LayoutAttentionPlan) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"layout_attention: q, k, v must be [T, H, D], got {list(q.shape)}, "
                         f"{list(k.shape)}, {list(v.shape)}")
    T, Hq, D = q.shape
    if k.shape != v.shape or k.shape[0] != T or k.shape[2] != D:
        raise ValueError(f"layout_attention: k and v must be [T={T}, Hkv, D={D}], got "
                         f"{list(k.shape)} and {list(v.shape)}")
    if k.shape[1] == 0 or Hq % k.shape[1]:
        raise ValueError(f"layout_attention: {Hq} query heads are not a multiple of "
                         f"{k.shape[1]} kv heads")
    if T != plan.num_tokens:
        raise ValueError(f"layout_attention: the plan is for {plan.num_tokens} tokens, q has {T}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"layout_attention: q, k, v must share one floating dtype of "
                        f"{[str(d) for d in _DTYPES]}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"layout_attention: q, k, v on different devices: {q.device}, "
                         f"{k.device}, {v.device}")


def _heads(t: torch.Tensor) -> torch.Tensor:
    """[T, H, D] -> [1, H, T, D] view (the flash kernels take strided inputs)."""
    return t.transpose(0, 1).unsqueeze(0)


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def composed_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pieces: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Hq, D], k/v: [T, Hkv, D] (CPU), pieces [P, 5] -> (out [T, Hq, D] in q.dtype,
    lse [Hq, T] fp32 (fp64 for fp64 inputs)). No autograd (see layout_attention)."""
    T, Hq, D = q.shape
    acc = _lse_dtype(q.dtype)
    out = torch.empty(T, Hq, D, dtype=acc)
    lse = torch.empty(Hq, T, dtype=acc)
    qh, kh, vh = _heads(q), _heads(k), _heads(v)
    for q0, q1, k0, k1, causal in pieces.tolist():
        o, l = _FLASH(qh[:, :, q0:q1], kh[:, :, k0:k1], vh[:, :, k0:k1], 0.0, bool(causal),
                      scale=scale)
        o = o[0].transpose(0, 1)  # [n, Hq, D]
        if causal:  # the first piece of its rows (causal pieces come first, one per row)
            out[q0:q1] = o
            lse[:, q0:q1] = l[0]
            continue
        lo, orow = lse[:, q0:q1], out[q0:q1]
        m = torch.maximum(lo, l[0])
        wa, wb = torch.exp(lo - m), torch.exp(l[0] - m)
        tot = wa + wb
        orow.mul_((wa / tot).t().unsqueeze(-1)).add_(o * (wb / tot).t().unsqueeze(-1))
        lse[:, q0:q1] = m + torch.log(tot)
    return out.to(q.dtype), lse


def composed_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      out: torch.Tensor, lse: torch.Tensor, pieces: torch.Tensor,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad/out: [T, Hq, D], lse: [Hq, T] (composed_forward's) -> (dq, dk, dv) like q, k, v."""
    acc = _lse_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc)
    dk = torch.zeros(k.shape, dtype=acc)
    dv = torch.zeros(v.shape, dtype=acc)
    gh, qh, kh, vh, oh = _heads(grad.to(q.dtype)), _heads(q), _heads(k), _heads(v), _heads(out)
    lh = lse.unsqueeze(0)
    for q0, q1, k0, k1, causal in pieces.tolist():
        gq, gk, gv = _FLASH_BWD(gh[:, :, q0:q1], qh[:, :, q0:q1], kh[:, :, k0:k1],
                                vh[:, :, k0:k1], oh[:, :, q0:q1],
                                lh[:, :, q0:q1].contiguous(), 0.0, bool(causal), scale=scale)
        dq[q0:q1] += gq[0].transpose(0, 1)
        dk[k0:k1] += gk[0].transpose(0, 1)
        dv[k0:k1] += gv[0].transpose(0, 1)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _Composed(torch.autograd.Function):
    """Autograd of the composed path (torch's flash kernels, no npr kernel)."""

    @staticmethod
    def forward(ctx, q, k, v, pieces, scale):
        out, lse = composed_forward(q, k, v, pieces, scale)
        ctx.save_for_backward(q, k, v, out, lse, pieces)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, pieces = ctx.saved_tensors
        dq, dk, dv = composed_backward(grad, q, k, v, out, lse, pieces, ctx.scale)
        return dq, dk, dv, None, None


# --- the compiled op: torch.ops.npr.layout_attention(_backward), csrc/layout_attention.cpp ------

_HAVE_KERNEL = _ext.available() and hasattr(torch.ops.npr, "layout_attention")
_KERNEL_DTYPES = (torch.float32, torch.float64)

if _HAVE_KERNEL:

    @torch.library.register_fake("npr::layout_attention")
    def _layout_attention_fake(q, k, v, runs, scale):
        return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]))

    @torch.library.register_fake("npr::layout_attention_backward")
    def _layout_attention_backward_fake(grad, q, k, v, out, lse, runs, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def _setup_context(ctx, inputs, output) -> None:
        q, k, v, runs, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, runs)
        ctx.scale = scale

    def _backward(ctx, grad_out, grad_lse):
        # lse is the backward's input, not a differentiable result (grad_lse is ignored)
        q, k, v, out, lse, runs = ctx.saved_tensors
        dq, dk, dv = torch.ops.npr.layout_attention_backward(grad_out.contiguous(), q, k, v, out,
                                                             lse, runs, ctx.scale)
        return dq, dk, dv, None, None

    torch.library.register_autograd("npr::layout_attention", _backward,
                                    setup_context=_setup_context)


# --- CUDA: FlexAttention with a block mask from the same tensors ----------------------------------

def flex_mask_mod(seq_start: torch.Tensor, hole_start: torch.Tensor, hole_end: torch.Tensor):
    """FlexAttention mask_mod of the layout (the same rule as npr.ref.layout_attention)."""
    def mask_mod(b, h, qi, kj):
        hole = (kj >= hole_start[qi]) & (kj < hole_end[qi])
        return (kj <= qi) & (kj >= seq_start[qi]) & ~hole
    return mask_mod


_compiled_flex = None


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: LayoutAttentionPlan,
          scale: float, compiled: bool) -> torch.Tensor:
    """FlexAttention path: q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]. compiled=False runs the
    eager forward (CPU twin of the CUDA path, tests only: no CPU backward in torch 2.13)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    key = (q.device, compiled)
    bm = plan._cache.get(key)
    if bm is None:
        T = q.shape[0]
        mm = flex_mask_mod(*(t.to(q.device) for t in (plan.seq_start, plan.hole_start,
                                                       plan.hole_end)))
        bm = plan._cache[key] = create_block_mask(mm, None, None, T, T, device=q.device,
                                                  _compile=compiled)
    fn = flex_attention
    if compiled:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        fn = _compiled_flex
    o = fn(_heads(q), _heads(k), _heads(v), block_mask=bm, scale=scale,
           enable_gqa=q.shape[1] != k.shape[1])
    return o[0].transpose(0, 1)


# --- entry point ---------------------------------------------------------------------------------

BACKENDS = ("auto", "kernel", "composed", "flex", "flex_eager")


def layout_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: LayoutAttentionPlan,
                     scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """q: [T, Hq, D], k/v: [T, Hkv, D] (grouped heads: query head h reads kv head
    h // (Hq / Hkv)), plan of the same T tokens -> [T, Hq, D]. Differentiable in q, k, v.
    Scale defaults to 1/sqrt(D).

    backend: auto = FlexAttention on CUDA; on CPU the compiled op (torch.ops.npr.layout_attention,
    fp32 compute: bf16/fp16 inputs are widened) where built, else the composed path (also under
    NPR_FORCE_REF=1); kernel / composed / flex (compiled) / flex_eager (eager, forward only on
    CPU: the CUDA path's CPU twin) force one."""
    if backend not in BACKENDS:
        raise ValueError(f"layout_attention: backend must be one of {BACKENDS}, got {backend!r}")
    _check(q, k, v, plan)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if backend == "auto":
        if q.device.type == "cuda":
            backend = "flex"
        elif q.device.type != "cpu":
            raise ValueError(f"layout_attention: no kernel for device {q.device}")
        else:
            backend = "kernel" if _HAVE_KERNEL and not env.force_reference() else "composed"
    if backend in ("flex", "flex_eager"):
        return _flex(q, k, v, plan, scale, compiled=backend == "flex")
    if q.device.type != "cpu":
        raise ValueError(f"layout_attention: backend {backend!r} runs on CPU, got {q.device}")
    if q.shape[0] == 0:
        return q.new_empty(q.shape)
    if backend == "composed":
        return _Composed.apply(q, k, v, plan.pieces, scale)
    if not _HAVE_KERNEL:
        raise RuntimeError("layout_attention: backend 'kernel' needs npr._C with "
                           f"npr::layout_attention; {_ext.BUILD_HINT}")
    work = q.dtype if q.dtype in _KERNEL_DTYPES else torch.float32
    out, _ = torch.ops.npr.layout_attention(q.to(work), k.to(work), v.to(work), plan.runs, scale)
    return out.to(q.dtype)
