"""One decoder for the Llama family: Llama, SmolLM2, Qwen2, Qwen3.

Differences between the families are ModelConfig switches: grouped-query attention, q/k/v bias
(Qwen2), per-head q/k RMSNorm (Qwen3), head_dim independent of hidden/heads (Qwen3), RoPE
scaling (npr.models.rope), tied or untied LM head.

Weights are stored fused; HF parameter names map onto slices of them (`hf_weight_map`):

    model.embed_tokens.weight                     embed_tokens               [V, H]
    model.layers.i.input_layernorm.weight         layers[i].input_norm       [H]
    model.layers.i.self_attn.q_proj.{weight,bias} layers[i].qkv_weight/bias  rows [0, Hq*D)
    model.layers.i.self_attn.k_proj.{weight,bias}   "                        rows [Hq*D, (Hq+Hkv)*D)
    model.layers.i.self_attn.v_proj.{weight,bias}   "                        rows [(Hq+Hkv)*D, end)
    model.layers.i.self_attn.q_norm.weight        layers[i].q_norm           [D]  (Qwen3)
    model.layers.i.self_attn.k_norm.weight        layers[i].k_norm           [D]  (Qwen3)
    model.layers.i.self_attn.o_proj.{weight,bias} layers[i].o_weight/o_bias  [H, Hq*D]
    model.layers.i.post_attention_layernorm.weight layers[i].post_norm       [H]
    model.layers.i.mlp.gate_proj.{weight,bias}    layers[i].gate_up_weight   rows [0, I)
    model.layers.i.mlp.up_proj.{weight,bias}        "                        rows [I, 2I)
    model.layers.i.mlp.down_proj.{weight,bias}    layers[i].down_weight      [H, I]
    model.norm.weight                             norm                       [H]
    lm_head.weight                                lm_head (absent when tied) [V, H]
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from npr import _ext, env, ops
from npr.models.attention import FlatAttention, check_mask, sdpa
from npr.models.config import ModelConfig
from npr.models.rope import RopeTable, apply_rope, rope_cos_sin, rope_inv_freq
from npr.ops.layout_attention import LayoutAttentionPlan, layout_attention
from npr.ops.linear import SMALL_ROWS_MAX, _rows, gemm_panels_available
from npr.ops.threads import follow_torch_threads

# Attention inside one layer: (q [..., Hq, D], k [..., Hkv, D], v [..., Hkv, D]) -> [..., Hq, D]
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# Names some older checkpoints carry that are not weights (recomputed from the config).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Up to this many rows a linear reads the packed decode copy (npr::linear_packed); more rows
# (prefill) take the plain weight and torch's GEMM. Measured on a 2-vCPU AMD EPYC (Zen 3, AVX2)
# VM, 2 threads, SmolLM2's 30 layers + head, cold weights, in one process alternating: the
# decode kernel 40-47 vs 84-93 ms at 16 rows, 118-128 vs 162-169 ms at 64, 229-240 vs
# 265-275 ms at 128, equal at 256 (torch's GEMM: MKL). Where GEMM panels run (AVX-512) they
# take 9+ rows instead (below).
PACKED_ROWS_MAX = 128
# Where the GEMM-panel copies run (AVX-512, fp32 copies), they take over from the decode copies
# past PANEL_ROWS_MIN rows, up to PANEL_ROWS_MAX; more rows (a prefill) take torch's GEMM.
# Measured on a 2-vCPU Xeon, 2 threads, SmolLM2's 30 layers + head, cold weights: panels equal
# to the decode kernel at 8 rows, 25% faster at 16, 45% at 32; 18-40% faster than torch's GEMM
# at 33-64 rows, 12-17% at 128; 5-12% slower than it at 512-2048 rows (MKL's blocking wins).
PANEL_ROWS_MIN = 8
PANEL_ROWS_MAX = 256
LAYER_LINEARS = ("qkv_weight", "o_weight", "gate_up_weight", "down_weight")


def _copy_of(cache: dict[str, tuple], name: str, w: torch.Tensor, make: Callable) -> object:
    """cache[name]'s copy of w (make(w)), re-made when w was replaced or changed in place since
    (an optimizer step, a weight push, a resize): tensors count their in-place writes in
    _version."""
    key = (w.data_ptr(), w._version, tuple(w.shape))
    hit = cache.get(name)
    if hit is None or hit[1] != key:
        with torch.no_grad():
            hit = (make(w.detach()), key)
        cache[name] = hit
    return hit[0]


def packed_copy(cache: dict[str, tuple[ops.PackedWeight, tuple]], name: str, w: torch.Tensor,
                dtype: torch.dtype) -> ops.PackedWeight:
    """The packed decode copy of w (npr.ops.pack_linear_weight as dtype)."""
    return _copy_of(cache, name, w, lambda t: ops.pack_linear_weight(t, dtype=dtype))


def panel_copy(cache: dict[str, tuple[ops.GemmPanels, tuple]], name: str,
               w: torch.Tensor) -> ops.GemmPanels:
    """The GEMM-panel copy of w (npr.ops.pack_gemm_weight)."""
    return _copy_of(cache, name, w, lambda t: ops.pack_gemm_weight(t))


def _panels_here(packed_dtype: torch.dtype | None, x: torch.Tensor) -> bool:
    """The engine's weight copies on as fp32, fp32 activations on an AVX-512 CPU, no autograd."""
    return (packed_dtype == torch.float32 and x.dtype == torch.float32 and x.is_cpu
            and not torch.is_grad_enabled() and gemm_panels_available())


def _panel_rows(packed_dtype: torch.dtype | None, x: torch.Tensor, w: torch.Tensor) -> bool:
    """PANEL_ROWS_MIN < rows <= PANEL_ROWS_MAX where panels run (_panels_here), an fp32 CPU
    weight: the linears read GEMM-panel copies (npr.ops.GemmPanels; torch's GEMM re-packs the
    weight every call, the decode kernel streams it for few rows)."""
    return (PANEL_ROWS_MIN < _rows(x) <= PANEL_ROWS_MAX and w.dtype == torch.float32
            and w.is_cpu and _panels_here(packed_dtype, x))


def _weight_copy(packed: dict, panels: dict, name: str, w: torch.Tensor,
                 packed_dtype: torch.dtype | None,
                 x: torch.Tensor) -> torch.Tensor | ops.PackedWeight | ops.GemmPanels:
    """The copy of weight w (cached as `name`) a forward over x reads: the packed decode copy
    for few rows, the GEMM-panel copy for many (both only with the engine's copies on), else
    w itself."""
    if _decode_rows(packed_dtype, x):
        return packed_copy(packed, name, w, packed_dtype)
    if _panel_rows(packed_dtype, x, w):
        return panel_copy(panels, name, w)
    return w


def _decode_rows(packed_dtype: torch.dtype | None, x: torch.Tensor) -> bool:
    """Few rows with packed decode copies and no autograd: the decode path (up to
    PACKED_ROWS_MAX rows; PANEL_ROWS_MIN where GEMM panels run). A forward that records
    gradients (training through the engine's model) reads the parameters themselves: the
    packed copies are detached and the fused kernels have no backward."""
    if packed_dtype is None or torch.is_grad_enabled():
        return False
    rows = _rows(x)
    return rows <= PANEL_ROWS_MIN or (rows <= PACKED_ROWS_MAX and not _panels_here(packed_dtype, x))


def _fused(packed_dtype: torch.dtype | None, x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether a forward takes the fused ops (npr.ops.linear_fused: norms, SiLU-mul, RoPE and
    residual adds folded into the linears): the decode path, or any number of rows of fp32
    activations and weights on CPU without autograd (torch's GEMM inside the op past a few
    rows; a 64-row step of a small model is dispatch-bound, ~20 ops fewer per layer)."""
    if _decode_rows(packed_dtype, x):
        return True
    return (x.dtype == torch.float32 and w.dtype == torch.float32 and x.is_cpu and w.is_cpu
            and not torch.is_grad_enabled())


def _param(*shape: int, dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device))


class LlamaLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        H, D, I = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
        self.hq, self.hkv, self.d, self.eps = cfg.num_heads, cfg.num_kv_heads, D, cfg.rms_norm_eps
        qkv_rows = (self.hq + 2 * self.hkv) * D
        p = lambda *s: _param(*s, dtype=dtype, device=device)  # noqa: E731
        self.input_norm = p(H)
        self.qkv_weight = p(qkv_rows, H)
        self.qkv_bias = p(qkv_rows) if cfg.qkv_bias else None
        self.q_norm = p(D) if cfg.qk_norm else None
        self.k_norm = p(D) if cfg.qk_norm else None
        self.o_weight = p(H, self.hq * D)
        self.o_bias = p(H) if cfg.o_bias else None
        self.post_norm = p(H)
        self.gate_up_weight = p(2 * I, H)
        self.gate_up_bias = p(2 * I) if cfg.mlp_bias else None
        self.down_weight = p(H, I)
        self.down_bias = p(H) if cfg.mlp_bias else None
        # Decode copies of the weights in the streaming kernel's layout (LlamaDecoder.pack_weights),
        # name -> (packed, the weight's _version when packed); GEMM-panel copies for many rows.
        self.packed: dict[str, tuple[ops.PackedWeight, tuple]] = {}
        self.panels: dict[str, tuple[ops.GemmPanels, tuple]] = {}
        self.packed_dtype: torch.dtype | None = None

    def weight_for(self, name: str, x: torch.Tensor) -> torch.Tensor | ops.PackedWeight | ops.GemmPanels:
        """The copy of linear `name` a forward over x reads (_weight_copy)."""
        return _weight_copy(self.packed, self.panels, name, getattr(self, name),
                            self.packed_dtype, x)

    def _lin(self, x: torch.Tensor, name: str, bias: torch.Tensor | None) -> torch.Tensor:
        """x: [..., K] -> [..., N]; few rows (decode) read the packed copy when there is one."""
        return ops.linear(x, self.weight_for(name, x), bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """x: [..., N, H], cos/sin: [..., N, D] -> [..., N, H]; with keep (flat path only, x
        [T, H]): -> [len(keep), H], rows after attention limited to `keep` (the last layer only
        needs the rows that produce logits)."""
        if _fused(self.packed_dtype, x, self.qkv_weight):
            return self._forward_fused(x, cos, sin, attend, keep)
        h = ops.rms_norm(x, self.input_norm, self.eps)
        qkv = self._lin(h, "qkv_weight", self.qkv_bias)
        q, k, v = qkv.split([self.hq * self.d, self.hkv * self.d, self.hkv * self.d], dim=-1)
        q = q.unflatten(-1, (self.hq, self.d))
        k = k.unflatten(-1, (self.hkv, self.d))
        v = v.unflatten(-1, (self.hkv, self.d)).contiguous()
        if self.q_norm is not None:
            q = ops.rms_norm(q, self.q_norm, self.eps)
            k = ops.rms_norm(k, self.k_norm, self.eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = attend(q, k, v)  # [..., N, Hq, D]
        if keep is not None:
            o, x = o.index_select(0, keep), x.index_select(0, keep)
        x = x + self._lin(o.flatten(-2), "o_weight", self.o_bias)
        h = ops.rms_norm(x, self.post_norm, self.eps)
        gate, up = self._lin(h, "gate_up_weight", self.gate_up_bias).chunk(2, dim=-1)
        return x + self._lin(F.silu(gate) * up, "down_weight", self.down_bias)


    def _forward_fused(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       attend: Attend, keep: torch.Tensor | None) -> torch.Tensor:
        """forward() without autograd: the norms, SiLU-mul, RoPE and residual adds folded into
        the linears (npr.ops.linear_fused), which read the packed copies for few rows (decode)."""
        w = lambda name: self.weight_for(name, x)  # noqa: E731
        nq, nkv = self.hq * self.d, self.hkv * self.d
        rope_here = self.q_norm is None  # q/k-norm (Qwen3) comes between projection and RoPE
        qkv = ops.linear_fused(x, w("qkv_weight"), self.qkv_bias, norm_weight=self.input_norm,
                               eps=self.eps, rope_cos=cos if rope_here else None,
                               rope_sin=sin if rope_here else None,
                               rope_heads=self.hq + self.hkv if rope_here else 0)
        q, k, v = qkv.split([nq, nkv, nkv], dim=-1)
        q = q.unflatten(-1, (self.hq, self.d))
        k = k.unflatten(-1, (self.hkv, self.d))
        v = v.unflatten(-1, (self.hkv, self.d)).contiguous()
        if not rope_here:
            q = apply_rope(ops.rms_norm(q, self.q_norm, self.eps), cos, sin)
            k = apply_rope(ops.rms_norm(k, self.k_norm, self.eps), cos, sin)
        o = attend(q, k, v)
        if keep is not None:
            o, x = o.index_select(0, keep), x.index_select(0, keep)
        x = ops.linear_fused(o.flatten(-2), w("o_weight"), self.o_bias, residual=x)
        gu = ops.linear_fused(x, w("gate_up_weight"), self.gate_up_bias, norm_weight=self.post_norm,
                              eps=self.eps)
        return ops.linear_fused(gu, w("down_weight"), self.down_bias, silu_mul=True, residual=x)


class LlamaDecoder(nn.Module):
    """Llama-family causal LM. Parameters are allocated uninitialised: load weights with
    `load_hf_state_dict` (npr.load_model does)."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.config = config
        H, V = config.hidden_size, config.vocab_size
        self.embed_tokens = _param(V, H, dtype=dtype, device=device)
        self.layers = nn.ModuleList(
            LlamaLayer(config, dtype, device) for _ in range(config.num_layers))
        self.norm = _param(H, dtype=dtype, device=device)
        self.lm_head = (None if config.tie_word_embeddings
                        else _param(V, H, dtype=dtype, device=device))
        inv_freq, self.rope_scaling = rope_inv_freq(config)
        # fp32 always; non-persistent: recomputed from the config (a GGUF file may rescale it)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        self._rope_table = RopeTable()
        # The engine's weight copies of the LM head (pack_weights) and the layer-stack tensors
        # npr._C.llama_layers takes (_layer_tensors), with what they were made from.
        self._packed_head: dict[str, tuple[ops.PackedWeight, tuple]] = {}
        self._panel_head: dict[str, tuple[ops.GemmPanels, tuple]] = {}
        self._layer_tensors_cache: tuple | None = None

    # --- the engine's view of the model -------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def num_kv_heads(self) -> int:
        return self.config.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.config.head_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    def head_weight(self) -> torch.Tensor:
        """[V, H]: the LM head (the embedding matrix when tied)."""
        return self.embed_tokens if self.lm_head is None else self.lm_head

    # --- forward passes ---------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: "torch.Tensor | LayoutAttentionPlan | None" = None) -> torch.Tensor:
        """Reference and training path. input_ids: [B, L]; position_ids: [B, L] or [L] (default
        arange); attention_mask: bool [B, L, L] or [L, L], True = may attend (None = causal), or
        a LayoutAttentionPlan of the L tokens (B = 1: the training layout without an [L, L]
        tensor, npr.ops.layout_attention) -> logits [B, L, V] fp32."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, L], got {list(input_ids.shape)}")
        B, L = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(L, device=input_ids.device)
        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0).expand(B, -1)
        if tuple(position_ids.shape) != (B, L):
            raise ValueError(
                f"position_ids must be [B, L] = [{B}, {L}], got {list(position_ids.shape)}")
        attend: Attend
        if isinstance(attention_mask, LayoutAttentionPlan):
            if B != 1 or attention_mask.num_tokens != L:
                raise ValueError(f"a LayoutAttentionPlan of {attention_mask.num_tokens} tokens "
                                 f"needs input_ids [1, {attention_mask.num_tokens}], got "
                                 f"{list(input_ids.shape)}")
            plan = attention_mask
            attend = lambda q, k, v: layout_attention(q[0], k[0], v[0], plan)[None]  # noqa: E731
        else:
            mask = (None if attention_mask is None
                    else check_mask(attention_mask.to(input_ids.device), B, L))
            attend = lambda q, k, v: sdpa(q, k, v, mask)  # noqa: E731
        self._check_ids(input_ids)
        x = F.embedding(input_ids, self.embed_tokens)  # [B, L, H]
        cos, sin = rope_cos_sin(position_ids, self.inv_freq, self.rope_scaling, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, attend)
        return self._logits(x)

    def forward_flat(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attn: FlatAttention,
                     logits_indices: torch.Tensor | None = None, check_ids: bool = True
                     ) -> torch.Tensor:
        """Engine path over a flat batch of tokens from many rows.

        input_ids: [T], position_ids: [T]; attn(layer_idx, q [T,Hq,D], k [T,Hkv,D], v [T,Hkv,D])
        -> [T,Hq,D] receives q/k after q/k-norm and RoPE; logits_indices: [N] int (None = all
        rows) -> logits [N, V] fp32. Only the selected rows pass the last layer's MLP, the final
        norm and the LM head. check_ids=False skips reading the ids' range (on a GPU a read back
        to the host, which a CUDA graph capture cannot do): for callers whose ids are known to
        be in the vocabulary (the engine checks prompts on arrival and samples the rest).
        """
        if input_ids.dim() != 1 or position_ids.shape != input_ids.shape:
            raise ValueError(f"forward_flat: input_ids and position_ids must both be [T], got "
                             f"{list(input_ids.shape)} and {list(position_ids.shape)}")
        if check_ids:
            self._check_ids(input_ids)
        if logits_indices is not None:
            logits_indices = logits_indices.to(device=input_ids.device, dtype=torch.long)
        x = F.embedding(input_ids, self.embed_tokens)  # [T, H]
        # on CPU from a table (a GPU would have to read the largest position back to size it)
        rope = self._rope_table if x.is_cpu else rope_cos_sin
        cos, sin = rope(position_ids, self.inv_freq, self.rope_scaling, x.dtype)
        last = len(self.layers) - 1
        # Many rows: npr's kernels join torch's threads (npr.ops.threads). Such a step also
        # runs torch's GEMM (linears past the decode copies) or sizeable torch ops (sampling
        # many rows), after which torch's OpenMP team spins; npr's pool on the same cores would
        # compete with it (Zen 3 VM, SmolLM2, 64 rows x 64 tokens on the decode kernel:
        # 16.4-17.8 s with the pool, 11.7-12.6 s with OMP_WAIT_POLICY=passive).
        many = x.is_cpu and input_ids.numel() > SMALL_ROWS_MAX
        with follow_torch_threads(many):
            native = self._native_args(attn, x)
            if native is not None:  # every layer in one C++ call (csrc/llama_layers.cpp)
                x = _ext._C.llama_layers(x, cos, sin, **self._layer_tensors(x), **native,
                                         scale=self.config.head_dim ** -0.5,
                                         keep=logits_indices)
                return self._logits(x)
            for i, layer in enumerate(self.layers):
                attend: Attend = lambda q, k, v, i=i: attn(i, q, k, v)  # noqa: E731
                x = layer(x, cos, sin, attend, keep=logits_indices if i == last else None)
            if not self.layers and logits_indices is not None:
                x = x.index_select(0, logits_indices)
            return self._logits(x)

    def _native_args(self, attn: FlatAttention, x: torch.Tensor) -> dict | None:
        """The paged attention's arguments for npr._C.llama_layers when it applies: the engine's
        attention on CPU caches, the fused path (fp32 CPU, no autograd), no q/k-norm (Qwen3
        keeps the per-layer Python path), the extension built, no NPR_FORCE_REF."""
        native = getattr(attn, "native_args", None)
        if (native is None or not self.layers or self.config.qk_norm or not _ext.available()
                or env.force_reference() or x.dtype != torch.float32
                or not _fused(self.packed_dtype, x, self.head_weight())):
            return None
        return native()

    def _layer_tensors(self, x: torch.Tensor) -> dict:
        """Per layer the four linears (packed decode copies for few rows, GEMM panels for many),
        their biases and the two norms, with the shapes npr._C.llama_layers takes. Kept while
        the copy kind and every parameter (identity and in-place writes) stay the same: a step
        of a small model spends ~50 us rebuilding it."""
        first = self.layers[0].qkv_weight
        kind = (_decode_rows(self.packed_dtype, x), _panel_rows(self.packed_dtype, x, first),
                self.packed_dtype)
        # (_parameters directly: Module.parameters()'s generators cost 136 us a SmolLM2 step)
        params = [p for ly in self.layers for p in ly._parameters.values() if p is not None]
        key = (kind, [(p.data_ptr(), p._version) for p in params])
        hit = self._layer_tensors_cache
        if hit is not None and hit[0] == key:
            return hit[1]
        weights, biases, norms = [], [], []
        for ly in self.layers:
            for name, bias in zip(LAYER_LINEARS, (ly.qkv_bias, ly.o_bias, ly.gate_up_bias,
                                                  ly.down_bias)):
                w = ly.weight_for(name, x)
                weights.append(w if isinstance(w, torch.Tensor) else w.data)
                biases.append(None if bias is None else bias.float())
            norms += [ly.input_norm, ly.post_norm]
        c = self.config
        out = {"weights": weights, "biases": biases, "norms": norms, "num_heads": c.num_heads,
               "num_kv_heads": c.num_kv_heads, "head_dim": c.head_dim,
               "intermediate_size": c.intermediate_size, "eps": c.rms_norm_eps}
        self._layer_tensors_cache = (key, out)
        return out

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        w = self.head_weight()
        if _fused(self.packed_dtype, x, w):
            head = _weight_copy(self._packed_head, self._panel_head, "head", w,
                                self.packed_dtype, x)
            return ops.linear_fused(x, head, norm_weight=self.norm,
                                    eps=self.config.rms_norm_eps).float()
        x = ops.rms_norm(x, self.norm, self.config.rms_norm_eps)
        return ops.linear(x, w).float()

    packed_dtype: torch.dtype | None = None

    def pack_weights(self, dtype: torch.dtype | None = None) -> None:
        """Decode steps (<= PACKED_ROWS_MAX rows) read every linear weight, the LM head too, from
        a copy in the CPU streaming kernel's packed layout stored as `dtype` (default: the
        weights' own; torch.bfloat16 / float16 halve the bytes a step reads, at that precision).
        Copies are made lazily and re-made when a weight changes in place. None turns it off."""
        if dtype is not None and self.device.type != "cpu":
            raise ValueError("pack_weights: the packed kernels run on CPU only")
        self.packed_dtype = dtype
        self._packed_head, self._panel_head, self._layer_tensors_cache = {}, {}, None
        for layer in self.layers:
            layer.packed, layer.panels, layer.packed_dtype = {}, {}, dtype

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be int64/int32, got {input_ids.dtype}")
        if input_ids.numel():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"input_ids out of range [0, {self.config.vocab_size}): "
                                 f"min {lo}, max {hi}")

    # --- weights ----------------------------------------------------------------------------
    def hf_weight_map(self) -> dict[str, torch.Tensor]:
        """HF parameter name -> a detached view of the tensor that holds it. Copying into the view
        writes the fused parameter in place and, unlike a `.data` view, counts the write in the
        parameter's `_version` (views share their base's version counter), so the packed decode
        copies (packed_copy) see it."""
        cfg = self.config
        D, I = cfg.head_dim, cfg.intermediate_size
        q_rows, kv_rows = cfg.num_heads * D, cfg.num_kv_heads * D
        v = lambda t: t.detach()  # noqa: E731  shares storage and _version with t
        m: dict[str, torch.Tensor] = {"model.embed_tokens.weight": v(self.embed_tokens),
                                      "model.norm.weight": v(self.norm)}
        if self.lm_head is not None:
            m["lm_head.weight"] = v(self.lm_head)
        for i, ly in enumerate(self.layers):
            a, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
            m[f"model.layers.{i}.input_layernorm.weight"] = v(ly.input_norm)
            m[f"model.layers.{i}.post_attention_layernorm.weight"] = v(ly.post_norm)
            for suffix, t in (("weight", ly.qkv_weight), ("bias", ly.qkv_bias)):
                if t is not None:
                    q, k, vv = v(t).split([q_rows, kv_rows, kv_rows], dim=0)
                    m[a + "q_proj." + suffix], m[a + "k_proj." + suffix] = q, k
                    m[a + "v_proj." + suffix] = vv
            m[a + "o_proj.weight"] = v(ly.o_weight)
            if ly.o_bias is not None:
                m[a + "o_proj.bias"] = v(ly.o_bias)
            if ly.q_norm is not None:
                m[a + "q_norm.weight"], m[a + "k_norm.weight"] = v(ly.q_norm), v(ly.k_norm)
            for suffix, t in (("weight", ly.gate_up_weight), ("bias", ly.gate_up_bias)):
                if t is not None:
                    gate, up = v(t).split([I, I], dim=0)
                    m[mlp + "gate_proj." + suffix], m[mlp + "up_proj." + suffix] = gate, up
            m[mlp + "down_proj.weight"] = v(ly.down_weight)
            if ly.down_bias is not None:
                m[mlp + "down_proj.bias"] = v(ly.down_bias)
        return m

    @staticmethod
    def expected_hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
        """HF name -> shape, from the config alone (checked against file headers before the
        model is allocated): plain arithmetic, no module is built, so its cost is the size of
        the answer (callers check config.num_layers against the file first; see
        npr.models.loader). Must list exactly the names of hf_weight_map."""
        c = config
        H, V, D, I = c.hidden_size, c.vocab_size, c.head_dim, c.intermediate_size
        q, kv = c.num_heads * D, c.num_kv_heads * D
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H),
                                           "model.norm.weight": (H,)}
        if not c.tie_word_embeddings:
            out["lm_head.weight"] = (V, H)
        for i in range(c.num_layers):
            a, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
            out[f"model.layers.{i}.input_layernorm.weight"] = (H,)
            out[f"model.layers.{i}.post_attention_layernorm.weight"] = (H,)
            for proj, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                out[a + proj + ".weight"] = (rows, H)
                if c.qkv_bias:
                    out[a + proj + ".bias"] = (rows,)
            out[a + "o_proj.weight"] = (H, q)
            if c.o_bias:
                out[a + "o_proj.bias"] = (H,)
            if c.qk_norm:
                out[a + "q_norm.weight"] = out[a + "k_norm.weight"] = (D,)
            for proj in ("gate_proj", "up_proj"):
                out[mlp + proj + ".weight"] = (I, H)
                if c.mlp_bias:
                    out[mlp + proj + ".bias"] = (I,)
            out[mlp + "down_proj.weight"] = (H, I)
            if c.mlp_bias:
                out[mlp + "down_proj.bias"] = (H,)
        return out

    @torch.no_grad()
    def load_hf_state_dict(self, named_tensors: Iterable[tuple[str, torch.Tensor]]
                           | Mapping[str, torch.Tensor], strict: bool = False,
                           atomic: bool = False) -> set[str]:
        """Copy HF-named tensors into the model (any subset: RL trainers push updates this way).

        Each tensor is checked before it is copied: unknown names, non-tensors, non-floating
        dtypes (int, bool, complex: never cast silently) and wrong shapes raise naming the
        tensor; floating dtypes are cast to the model's. With a tied head, lm_head.weight is
        skipped (the head is the embedding). strict=True also raises when a weight was not
        given. atomic=True checks every tensor (and strict) before copying any, so a bad
        update leaves the model as it was; it holds all tensors at once (weight pushes), while
        atomic=False streams them (checkpoint loading). Returns the set of names loaded.
        """
        targets = self.hf_weight_map()
        items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors

        def check(item: object) -> tuple[str, torch.Tensor, torch.Tensor | None]:
            """-> (name, tensor, destination view; None for a name that is skipped)."""
            pair = isinstance(item, (tuple, list)) and len(item) == 2
            if not (pair and isinstance(item[0], str)):
                raise TypeError(f"expected (HF name, tensor) pairs, got {type(item).__name__} "
                                f"{str(item)[:60]}")
            name, tensor = item
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
            tied_head = name == "lm_head.weight" and self.lm_head is None
            if tied_head or name.endswith(IGNORED_SUFFIXES):
                return name, tensor, None
            dst = targets.get(name)
            if dst is None:
                raise KeyError(f"unexpected tensor {name!r}: not a parameter of this "
                               f"{self.config.model_type} model")
            if not tensor.dtype.is_floating_point:
                raise TypeError(f"tensor {name!r} has dtype {tensor.dtype}; weights must be a "
                                f"floating point type (the model holds {dst.dtype})")
            if tuple(tensor.shape) != tuple(dst.shape):
                raise ValueError(f"tensor {name!r} has shape {list(tensor.shape)}, the config "
                                 f"expects {list(dst.shape)}")
            return name, tensor, dst

        def check_complete(loaded: set[str]) -> None:
            missing = sorted(set(targets) - loaded)
            if strict and missing:
                more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
                raise KeyError(f"missing tensor(s) {', '.join(missing[:5])}{more}")

        checked = map(check, items)
        if atomic:
            checked = [c for c in checked if c[2] is not None]  # raises before any copy
            check_complete({name for name, _, _ in checked})
        loaded: set[str] = set()
        for name, tensor, dst in checked:
            if dst is not None:
                dst.copy_(tensor)
                loaded.add(name)
        check_complete(loaded)
        return loaded

    @torch.no_grad()
    def resize_token_embeddings(self, new_vocab: int) -> None:
        """Grow (or shrink) the embedding and an untied LM head to new_vocab rows; existing rows
        are kept, new rows are zero (npr.tokenizer.add_tag_tokens initialises them)."""
        old = self.config.vocab_size
        if new_vocab == old:
            return
        if new_vocab <= 0:
            raise ValueError(f"resize_token_embeddings: new_vocab must be > 0, got {new_vocab}")
        n = min(old, new_vocab)

        def grow(p: nn.Parameter) -> nn.Parameter:
            w = torch.zeros(new_vocab, p.shape[1], dtype=p.dtype, device=p.device)
            w[:n] = p.data[:n]
            return nn.Parameter(w, requires_grad=p.requires_grad)

        self.embed_tokens = grow(self.embed_tokens)
        if self.lm_head is not None:
            self.lm_head = grow(self.lm_head)
        self.config.vocab_size = new_vocab
