"""Runs one batch plan through the model: KV cache tensors, paged branch-tree attention, logits."""
from __future__ import annotations

from typing import Any

import torch

from npr import ops
from npr.engine.decode_graphs import DecodeGraphs


class PagedTreeAttention:
    """The attention of one step, for every layer: writes the step's K/V into the paged cache by
    slot, then attends each row's queries to its path of KV segments (shared segments read once
    per sibling group). Implements the models' attention protocol attn(layer, q, k, v)."""

    def __init__(self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
                 slots: torch.Tensor, plan: ops.TreeAttentionPlan) -> None:
        self.k_caches, self.v_caches = k_caches, v_caches
        self.slots = slots
        self.plan = plan  # built once per step (in C++, by the scheduler), shared by all layers

    def native_args(self) -> dict[str, Any] | None:
        """What npr._C.llama_layers needs to run every layer's attention itself (fp32 CPU
        caches), or None (the model then calls this object per layer)."""
        if (not self.k_caches or not self.k_caches[0].is_cpu
                or self.k_caches[0].dtype != torch.float32):
            return None
        return {"k_caches": self.k_caches, "v_caches": self.v_caches, "slots": self.slots,
                "plan": list(self.plan.tensors()), "max_item_parts": self.plan.max_item_parts}

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] -> [T, Hq, D]."""
        kc, vc = self.k_caches[layer], self.v_caches[layer]
        ops.write_kv(k.to(kc.dtype), v.to(vc.dtype), kc, vc, self.slots)
        return ops.tree_attention(q.to(kc.dtype), kc, vc, self.plan).to(q.dtype)


class ModelRunner:
    """graphs: decode steps go through npr.engine.decode_graphs (None: every step runs the
    model's forward as it is)."""

    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int,
                 kv_dtype: torch.dtype, device: torch.device,
                 graphs: DecodeGraphs | None = None) -> None:
        self.model = model
        self.num_blocks, self.block_size = num_blocks, block_size
        self.kv_dtype, self.device = kv_dtype, device
        self.graphs = graphs
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
        if self.graphs is not None:  # the graphs' memory goes too; re-captured on use
            self.graphs.reset()

    @torch.inference_mode()
    def forward(self, plan: Any) -> torch.Tensor:
        """Runs one step's plan (npr._C.StepPlan); returns fp32 logits [num sampling rows, V]."""
        n_copy = plan.sizes[3]
        # one host-to-device copy per buffer; every plan tensor is a view of one of them
        ints = plan.ints.to(self.device)
        parts = torch.split(ints, list(plan.sizes))
        input_ids, positions, logits_indices, copy_src, copy_dst = parts[:5]
        if n_copy:
            for kc, vc in zip(self.k_caches, self.v_caches):
                ops.copy_blocks(kc, vc, copy_src.long(), copy_dst.long())
        tree = ops.attention.plan_from_parts(parts[5:], self.block_size, plan.max_item_parts,
                                             plan.row_lens, plan.kv_tokens_read)
        attn = PagedTreeAttention(self.k_caches, self.v_caches, plan.slots.to(self.device), tree)
        if self.graphs is not None and self.graphs.handles(plan.sizes[0], plan.num_rows,
                                                           plan.sizes[2]):
            return self.graphs.forward(input_ids.long(), positions.long(), attn)
        # The scheduler emits logits indices ascending (each sampled row's last token): as many
        # as tokens means every token, and the model skips the gather.
        keep = None if plan.sizes[2] == plan.sizes[0] else logits_indices.long()
        # (ids checked on the host: prompts on arrival, the rest sampled from the logits)
        logits = self.model.forward_flat(input_ids.long(), positions.long(), attn,
                                         logits_indices=keep, check_ids=False)
        return logits.float()
