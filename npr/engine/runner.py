"""Runs one batch plan through the model: KV cache tensors, paged branch-tree attention, logits."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from npr import ops


class PagedTreeAttention:
    """The attention of one step, for every layer: writes the step's K/V into the paged cache by
    slot, then attends each row's queries to its path of KV segments (shared segments read once
    per sibling group). Implements the models' attention protocol attn(layer, q, k, v)."""

    def __init__(self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
                 plan: dict[str, torch.Tensor], block_size: int) -> None:
        self.k_caches, self.v_caches = k_caches, v_caches
        self.slots = plan["slots"]
        # Built once per step, shared by all layers.
        self.plan = ops.attention.plan(
            plan["q_indptr"], plan["seg_indptr"], plan["seg_blocks"], plan["seg_fills"],
            plan["row_seg_indptr"], plan["row_segs"], block_size,
        )

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] -> [T, Hq, D]."""
        kc, vc = self.k_caches[layer], self.v_caches[layer]
        ops.write_kv(k.to(kc.dtype), v.to(vc.dtype), kc, vc, self.slots)
        return ops.tree_attention(q.to(kc.dtype), kc, vc, self.plan).to(q.dtype)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int,
                 kv_dtype: torch.dtype, device: torch.device) -> None:
        self.model = model
        self.num_blocks, self.block_size = num_blocks, block_size
        self.kv_dtype, self.device = kv_dtype, device
        self.k_caches: list[torch.Tensor] = []
        self.v_caches: list[torch.Tensor] = []
        self.allocate()

    def kv_bytes_per_token(self) -> int:
        m = self.model
        return 2 * m.num_layers * m.num_kv_heads * m.head_dim * torch.finfo(self.kv_dtype).bits // 8

    def allocate(self) -> None:
        m = self.model
        shape = (self.num_blocks, m.num_kv_heads, self.block_size, m.head_dim)
        self.k_caches = [torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in range(m.num_layers)]
        self.v_caches = [torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in range(m.num_layers)]

    def release(self) -> None:
        self.k_caches, self.v_caches = [], []

    def _tensors(self, plan: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in plan.items():
            if isinstance(v, np.ndarray):
                t = torch.from_numpy(v)
                out[k] = t.to(self.device) if self.device.type != "cpu" else t
        return out

    @torch.inference_mode()
    def forward(self, plan: dict[str, Any]) -> torch.Tensor:
        """Runs the plan; returns fp32 logits [num sampling rows, V]."""
        t = self._tensors(plan)
        if t["copy_src"].numel():
            for kc, vc in zip(self.k_caches, self.v_caches):
                ops.copy_blocks(kc, vc, t["copy_src"].long(), t["copy_dst"].long())
        attn = PagedTreeAttention(self.k_caches, self.v_caches, t, self.block_size)
        logits = self.model.forward_flat(
            t["input_ids"].long(), t["positions"].long(), attn, logits_indices=t["logits_indices"].long()
        )
        return logits.float()
