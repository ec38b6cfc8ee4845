"""Decode steps replayed from CUDA graphs, captured per batch-size bucket (as vLLM and SGLang do).

A step is a decode step when each of its rows feeds exactly one token and every token is sampled.
Its tokens are padded to the next bucket size and the model runs as piecewise graphs (vLLM's
default mode): graph 0 runs from the embedding to layer 0's q/k/v, graph i+1 from layer i's
attention output to layer i+1's q/k/v, the last one to the logits. The paged tree attention runs
eagerly between them on the step's real tokens only, so the tree plan, whose sizes change every
step, needs no padding, and the graphs hold no KV cache address (sleep / wake_up may reallocate
the cache). Padded rows read token 0 at position 0, write no KV and attend nothing: their
attention output is whatever the static buffer holds (finite), and their logits are dropped.

On CPU the same padded, piecewise path runs eagerly (`DecodeGraphs(..., capture=False)`): the
twin the tests compare with the plain forward, since CI has no GPU.
"""
from __future__ import annotations

from typing import Callable

import torch

# Batch sizes a decode step is padded to (a step of more rows runs without graphs).
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def bucket_for(rows: int, max_rows: int) -> int | None:
    """The smallest bucket >= rows (up to max_rows's bucket), or None when rows exceed it."""
    for b in BUCKETS:
        if b >= rows:
            return b if rows <= max_rows else None
    return None


# attend(layer, q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]) -> [T, Hq, D] over the step's tokens
StepAttention = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class _Bucket:
    """One bucket's static inputs, its per-layer attention buffers and its graphs (CUDA)."""

    def __init__(self, size: int, num_layers: int, device: torch.device) -> None:
        self.size = size
        self.input_ids = torch.zeros(size, dtype=torch.long, device=device)
        self.positions = torch.zeros(size, dtype=torch.long, device=device)
        self.qkv: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self.out: torch.Tensor | None = None  # [size, Hq, D]: attention output, every layer
        self.logits: torch.Tensor | None = None
        self.graphs: list[torch.cuda.CUDAGraph] = []


class _PaddedAttention:
    """The model's attention callback over a padded batch. Records each layer's q/k/v (the
    tensors its graph piece wrote), runs the step's attention on the first `tokens` rows (when
    `step` is set) into the bucket's static output buffer, and calls `between(layer)` so a capture
    can end one graph and begin the next there."""

    def __init__(self, bucket: _Bucket) -> None:
        self.bucket = bucket
        self.step: StepAttention | None = None
        self.tokens = 0
        self.between: Callable[[int], None] | None = None

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b = self.bucket
        b.qkv[layer] = (q, k, v)
        if b.out is None:
            b.out = torch.zeros_like(q)
        if self.step is not None and self.tokens:
            attend_into(b.out, self.step, layer, q, k, v, self.tokens)
        if self.between is not None:
            self.between(layer)
        return b.out


def attend_into(out: torch.Tensor, step: StepAttention, layer: int, q: torch.Tensor,
                k: torch.Tensor, v: torch.Tensor, tokens: int) -> None:
    """out[:tokens] = step(layer, q[:tokens], k[:tokens], v[:tokens]); the padded rows' q/k/v
    are never read and their KV never written."""
    out[:tokens].copy_(step(layer, q[:tokens], k[:tokens], v[:tokens]))


class DecodeGraphs:
    """Decode steps of `model` (a model with forward_flat and num_layers) through padded
    piecewise graphs, one set per bucket, captured on first use. capture=False runs the same
    padded pieces eagerly (CPU, or a CUDA run without graphs)."""

    def __init__(self, model: torch.nn.Module, max_rows: int, device: torch.device,
                 capture: bool) -> None:
        if capture and device.type != "cuda":
            raise ValueError(f"DecodeGraphs: graphs are captured on CUDA only, got {device}")
        self.model, self.max_rows, self.device, self.capture = model, max_rows, device, capture
        self._buckets: dict[int, _Bucket] = {}
        self.captured = 0  # graph sets captured
        self.steps = 0     # steps run through the buckets

    def reset(self) -> None:
        """Drops every bucket (and its graphs): after the weights were replaced, or to free the
        graphs' memory."""
        self._buckets.clear()

    def handles(self, num_tokens: int, num_rows: int, num_sampled: int) -> bool:
        """Whether a step is a decode step this runner takes."""
        return (num_tokens == num_rows == num_sampled and num_tokens > 0
                and bucket_for(num_tokens, self.max_rows) is not None)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                step: StepAttention) -> torch.Tensor:
        """input_ids, positions: [T] -> fp32 logits [T, V] (a fresh tensor)."""
        T = int(input_ids.shape[0])
        size = bucket_for(T, self.max_rows)
        if size is None:
            raise ValueError(f"DecodeGraphs: {T} tokens exceed the largest bucket for max_rows="
                             f"{self.max_rows}")
        b = self._buckets.get(size)
        if b is None:
            b = self._buckets[size] = _Bucket(size, self.model.num_layers, self.device)
            if self.capture:
                self._capture(b)
        self.steps += 1
        b.input_ids[:T].copy_(input_ids)
        b.positions[:T].copy_(positions)
        if T < size:  # padded rows: token 0 at position 0
            b.input_ids[T:].zero_()
            b.positions[T:].zero_()
        if not self.capture:
            attn = _PaddedAttention(b)
            attn.step, attn.tokens = step, T
            logits = self.model.forward_flat(b.input_ids, b.positions, attn, check_ids=False)
            return logits[:T].float()
        b.graphs[0].replay()
        for layer in range(self.model.num_layers):
            q, k, v = b.qkv[layer]
            attend_into(b.out, step, layer, q, k, v, T)
            b.graphs[layer + 1].replay()
        logits = b.logits[:T]  # the next replay overwrites it
        return logits.clone() if logits.dtype == torch.float32 else logits.float()

    def _capture(self, b: _Bucket) -> None:
        """Captures b's num_layers + 1 graph pieces on a side stream, after a warm-up run of
        the padded forward (first calls set up cuBLAS handles and Triton kernels outside the
        capture). Attention is not called during either: its output buffer feeds the next piece.
        A failed capture is ended (the stream would otherwise stay in capture mode), the bucket
        dropped and the error raised."""
        L = self.model.num_layers
        attn = _PaddedAttention(b)
        stream = torch.cuda.Stream(device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        pool = torch.cuda.graph_pool_handle()  # one per bucket: its pieces share it
        b.graphs = [torch.cuda.CUDAGraph() for _ in range(L + 1)]
        capturing = -1

        def between(layer: int) -> None:  # ends layer's piece, begins the next one
            nonlocal capturing
            b.graphs[layer].capture_end()
            capturing = -1
            b.graphs[layer + 1].capture_begin(pool=pool)
            capturing = layer + 1

        try:
            with torch.cuda.stream(stream):
                self.model.forward_flat(b.input_ids, b.positions, attn,  # warm-up, not captured
                                        check_ids=False)
                torch.cuda.synchronize(self.device)
                attn.between = between
                b.graphs[0].capture_begin(pool=pool)
                capturing = 0
                b.logits = self.model.forward_flat(b.input_ids, b.positions, attn, check_ids=False)
                b.graphs[L].capture_end()
                capturing = -1
        except BaseException:
            if capturing >= 0:
                try:
                    b.graphs[capturing].capture_end()
                except RuntimeError:
                    pass  # the capture was invalidated; ending it is all that was needed
            self._buckets.pop(b.size, None)
            raise
        finally:
            torch.cuda.current_stream(self.device).wait_stream(stream)
        self.captured += 1
