"""Turns the logits of the sampling rows into tokens and logprobs.

Each branch has its own torch.Generator, seeded from (request seed, sample, branch id), so seeded
outputs do not depend on which other rows share the batch.
"""
from __future__ import annotations

from typing import Callable

import torch

from npr.engine.sampling_params import SamplingParams


def apply_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits: [V] (already divided by temperature) -> [V] with dropped tokens at -inf."""
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def apply_repetition_penalty(logits: torch.Tensor, tokens: list[int], penalty: float) -> torch.Tensor:
    """HF-style: seen tokens' positive logits are divided by penalty, negative ones multiplied."""
    if penalty == 1.0 or not tokens:
        return logits
    idx = torch.tensor(sorted(set(tokens)), dtype=torch.long, device=logits.device)
    seen = logits[idx]
    logits = logits.clone()
    logits[idx] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits


class ProcessorError(ValueError):
    """A logits processor returned something that cannot be sampled from. The engine finishes
    that request with finish_reason "abort" and this message as finish_detail."""


def processor_name(fn: Callable) -> str:
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{getattr(fn, '__module__', None) or type(fn).__module__}.{name}"


def check_logits(out: object, vocab: int, what: str) -> torch.Tensor:
    """out must be logits [vocab] of a floating dtype, without NaN or +inf, with at least one
    finite entry (-inf masks tokens). Returns it as fp32; raises ProcessorError naming `what`."""
    if not isinstance(out, torch.Tensor):
        raise ProcessorError(f"{what} returned a {type(out).__name__}, expected a tensor [{vocab}]")
    if tuple(out.shape) != (vocab,):
        raise ProcessorError(f"{what} returned shape {list(out.shape)}, expected [{vocab}] "
                             "(one logit per token of the vocabulary)")
    if not out.dtype.is_floating_point:
        raise ProcessorError(f"{what} returned dtype {out.dtype}, expected floating logits")
    out = out.float()
    bad = ~torch.isfinite(out)
    if bool(bad.any()):
        nan, pos = int(torch.isnan(out).sum()), int((out == float("inf")).sum())
        if nan or pos:
            raise ProcessorError(f"{what} returned {nan} NaN and {pos} +inf logits (of {vocab})")
        if bool(bad.all()):
            raise ProcessorError(f"{what} masked every token (all {vocab} logits are -inf)")
    return out


class Sampler:
    def __init__(self, engine_seed: int) -> None:
        self.engine_seed = engine_seed
        self._generators: dict[tuple[int, int, int], torch.Generator] = {}

    def generator(self, request_id: int, seed: int | None, sample: int, branch: int) -> torch.Generator:
        key = (request_id, sample, branch)
        g = self._generators.get(key)
        if g is None:
            base = seed if seed is not None else self.engine_seed * 1_000_003 + request_id
            g = torch.Generator(device="cpu")
            g.manual_seed((base * 7919 + sample * 104_729 + branch * 1_299_709) % (2**63 - 1))
            self._generators[key] = g
        return g

    def forget(self, request_id: int) -> None:
        for k in [k for k in self._generators if k[0] == request_id]:
            del self._generators[k]

    def sample_row(
        self,
        logits: torch.Tensor,
        params: SamplingParams,
        *,
        request_id: int,
        sample: int,
        branch: int,
        in_step: bool,
        visible: Callable[[], list[int]],
        step_tokens: Callable[[], list[int]],
    ) -> tuple[int, float]:
        """logits: [V] fp32 -> (token id, logprob under the distribution sampled from). Raises
        ProcessorError when a logits processor's result cannot be sampled from; an exception
        a processor raises propagates, with a note naming the processor and the request."""
        logits = logits.float()
        if params.logits_processors:
            ctx = visible()
            V = logits.shape[-1]
            for k, fn in enumerate(params.logits_processors):
                what = (f"logits processor #{k} ({processor_name(fn)}) of request {request_id} "
                        f"(sample {sample}, branch {branch})")
                try:
                    out = fn(ctx, logits)
                except Exception as e:
                    e.add_note(f"raised in {what}")
                    raise
                logits = check_logits(out, V, what)
        if in_step and params.step_repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, step_tokens(), params.step_repetition_penalty)
        if params.greedy:
            logp = torch.log_softmax(logits, dim=-1)
            tok = int(torch.argmax(logits))
            return tok, float(logp[tok])
        logits = apply_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
        logp = torch.log_softmax(logits, dim=-1)
        g = self.generator(request_id, params.seed, sample, branch)
        tok = int(torch.multinomial(logp.exp(), 1, generator=g))
        return tok, float(logp[tok])
