"""Engine outputs -> the padded tensors RL frameworks pass around, and the parallel-layout
log-probs a trainer computes instead of its causal forward (spec/NPR.md §2). No framework needed.

Every RL framework recomputes log-probs with a causal mask and arange positions (from a 2-D
padding mask), which is wrong for parallel trajectories: sibling steps must not see each other and
all start at the position after </guideline>. `to_batch` carries the engine's own record of the
layout (position ids, step ids, block ids) next to the usual tensors; `parallel_attention_mask`
turns it into a 4-D mask for APIs that take one; `parallel_logprobs` is the call a trainer makes
instead of its causal forward.

Which log-probs the engine returns: those of the distribution it sampled from, after logits
processors, the step repetition penalty, temperature and top-k/top-p (vLLM's
"processed_logprobs"). A trainer recomputes the model's distribution at its temperature, before any
processor or truncation: with no processor, no top-k/top-p and the same temperature the two agree.
The model's own log-probs ("raw": before any processing, temperature 1, vLLM's "raw_logprobs") are
`parallel_logprobs(model, batch, temperature=1.0)`; npr.integrations.trl / .verl offer both
(`logprobs_mode="processed" | "raw"`).

Invalid structures (engine.structure_valid False, or a record that is not a §2 layout) are never
given a causal layout: to_batch flags them (structure_valid False, response_mask all 0: no loss),
drops them, raises, or (invalid="keep", for plain decoding, where the record is the causal layout
the tokens were sampled under) keeps the engine's record as it is.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from npr.engine.outputs import derive_block_ids, fork_ids
from npr.format import Layout
from npr.train.logprobs import pack, token_logprobs

PADDING_SIDES = ("left", "right")
INVALID_POLICIES = ("flag", "drop", "raise", "keep")
LOGPROBS_MODES = ("processed", "raw")
BATCH_KEYS = ("prompts", "responses", "input_ids", "attention_mask", "position_ids", "step_ids",
              "block_ids", "response_mask", "structure_valid")


@dataclass
class _Row:
    request: int
    sample: int
    prompt: list[int]
    tokens: list[int]            # completion, canonical order
    positions: list[int]         # completion's §2 position ids (engine record)
    steps: list[int]             # completion's step ids (0 outside steps)
    blocks: list[int]            # completion's block ids
    injected: list[bool]
    logprobs: list[float | None] | None
    valid: bool
    problem: str                 # why the row is invalid ("" when valid)


def _int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"to_batch: {what} must be an int, got {type(v).__name__} {v!r}")
    return v


def record_layout(prompt_len: int, positions: Sequence[int], steps: Sequence[int],
                  blocks: Sequence[int]) -> Layout:
    """The §2 Layout of prompt + completion from the engine's record of the completion
    (positions, step ids, block ids; [C] each). The prompt is causal at positions 0..P-1. Raises
    ValueError naming the first token where the record is not a §2 layout: a step that is not one
    contiguous run, siblings of different blocks, a step not starting right after its fork's
    predecessor, a position that does not follow (+1 in a step / trunk, p + max L_k + 1 after a
    fork)."""
    C = len(positions)
    if len(steps) != C or len(blocks) != C:
        raise ValueError(f"{C} position ids but {len(steps)} step ids and {len(blocks)} block ids")
    L = prompt_len + C
    pos = list(range(prompt_len)) + [int(p) for p in positions]
    sid = [0] * prompt_len + [int(s) for s in steps]
    bid = [0] * prompt_len + [int(b) for b in blocks]
    forks = [0] * prompt_len + fork_ids(steps)
    hole_start, hole_end = [0] * L, [0] * L
    step_lengths: list[list[int]] = []
    seen_steps: set[int] = set()
    seen_blocks: set[int] = set()

    def bad(i: int, msg: str) -> ValueError:
        return ValueError(f"completion token {i - prompt_len}: {msg}")

    i = prompt_len
    while i < L:
        if not forks[i]:
            expect = pos[i - 1] + 1 if i else 0
            if pos[i] != expect:
                raise bad(i, f"position {pos[i]} where the trunk continues at {expect}")
            i += 1
            continue
        f, first, base = forks[i], i, (pos[i - 1] if i else -1)  # base: position p of </guideline>
        if bid[i] == 0 or bid[i] in seen_blocks:
            raise bad(i, f"a fork's steps carry block id {bid[i]} (0 or one already used)")
        lens: list[int] = []
        while i < L and forks[i] == f:
            s, a = sid[i], i
            if s in seen_steps:
                raise bad(i, f"step id {s} appears in two separate runs (steps are contiguous)")
            seen_steps.add(s)
            while i < L and sid[i] == s:
                if bid[i] != bid[first]:
                    raise bad(i, f"block id {bid[i]} inside a fork of block {bid[first]}")
                if pos[i] != base + 1 + (i - a):
                    raise bad(i, f"position {pos[i]} in step {s}; its step starts at {base + 1} "
                              f"(the position after its fork's predecessor)")
                hole_start[i], hole_end[i] = (first, a) if a > first else (0, 0)
                i += 1
            lens.append(i - a)
        seen_blocks.add(bid[first])
        step_lengths.append(lens)
        if i < L:
            expect = base + max(lens) + 1
            if pos[i] != expect:
                raise bad(i, f"position {pos[i]} after a fork; spec §2 puts it at "
                          f"p + max L_k + 1 = {expect}")
            i += 1
    t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return Layout(position_ids=t(pos), step_ids=t(sid), block_ids=t(bid), hole_start=t(hole_start),
                  hole_end=t(hole_end), prompt_len=prompt_len, step_lengths=step_lengths)


def _rows(request_outputs: Sequence[Any], tag_ids: Mapping[str, int] | None) -> list[_Row]:
    if isinstance(request_outputs, (str, bytes)) or not hasattr(request_outputs, "__iter__"):
        raise TypeError("to_batch: request_outputs must be a list of RequestOutput")
    rows: list[_Row] = []
    for r, ro in enumerate(request_outputs):
        if not (hasattr(ro, "prompt_token_ids") and hasattr(ro, "outputs")):
            raise TypeError(f"to_batch: request_outputs[{r}] is a {type(ro).__name__}, not a "
                            "RequestOutput (prompt_token_ids, outputs)")
        prompt = [int(x) for x in ro.prompt_token_ids]
        if not prompt:
            raise ValueError(f"to_batch: request_outputs[{r}] has an empty prompt")
        for o in ro.outputs:
            C = len(o.token_ids)
            lens = {"position_ids": len(o.position_ids), "branch_ids": len(o.branch_ids),
                    "injected": len(o.injected)}
            if o.logprobs is not None:
                lens["logprobs"] = len(o.logprobs)
            if o.block_ids is not None:
                lens["block_ids"] = len(o.block_ids)
            wrong = {k: n for k, n in lens.items() if n != C}
            if wrong:
                raise ValueError(f"to_batch: request {r} sample {o.index}: {C} token ids but "
                                 f"{wrong} (a corrupted CompletionOutput)")
            blocks = (list(o.block_ids) if o.block_ids is not None
                      else derive_block_ids(o.token_ids, o.branch_ids, tag_ids))
            problem = "" if o.structure_valid else (
                f"structure invalid (finish_reason {o.finish_reason!r}"
                + (f": {o.finish_detail}" if o.finish_detail else "") + ")")
            if not problem:
                try:
                    record_layout(len(prompt), o.position_ids, o.branch_ids, blocks)
                except ValueError as e:
                    problem = f"the engine's record is not a §2 layout: {e}"
            rows.append(_Row(r, int(o.index), prompt, [int(x) for x in o.token_ids],
                             [int(x) for x in o.position_ids], [int(x) for x in o.branch_ids],
                             blocks, [bool(x) for x in o.injected],
                             None if o.logprobs is None else list(o.logprobs),
                             not problem, problem))
    if not rows:
        raise ValueError("to_batch: no completions (request_outputs is empty)")
    return rows


def to_batch(request_outputs: Sequence[Any], pad_id: int, *, prompt_padding: str = "left",
             response_padding: str = "right", max_prompt_len: int | None = None,
             max_response_len: int | None = None, tag_ids: Mapping[str, int] | None = None,
             invalid: str = "flag", device: torch.device | str | None = None
             ) -> dict[str, torch.Tensor]:
    """Engine RequestOutputs (n completions each) -> padded tensors, one row per completion in
    request order then sample order (B rows; fewer with invalid="drop").

    prompts [B, P] (padded on `prompt_padding`, "left" as verl/TRL/OpenRLHF expect), responses
    [B, C] (on `response_padding`, "right" as they expect), input_ids = cat(prompts, responses)
    [B, P+C], attention_mask [B, P+C] long (1 on real tokens), position_ids [B, P+C] (spec §2;
    0 on padding), step_ids / block_ids [B, P+C] (0 outside steps / blocks, and on padding),
    response_mask [B, C] long (1 on the tokens the model sampled: 0 on injected tokens, padding
    and flagged rows), rollout_log_probs [B, C] fp32 (the engine's log-probs, 0 where
    response_mask is 0; absent when the requests asked for none), structure_valid [B] bool,
    row_index [B, 2] long (request index, sample index).

    P / C are the longest prompt / completion, or max_prompt_len / max_response_len (fixed sizes,
    as verl's data.max_prompt_length / response_length): a longer one raises, nothing is
    truncated. tag_ids (engine.tag_ids) is needed for completions that forked when the engine did
    not record block ids. invalid: "flag" | "drop" | "raise" | "keep" (module docstring).
    """
    pad_id = _int(pad_id, "pad_id")
    if pad_id < 0:
        raise ValueError(f"to_batch: pad_id must be a token id >= 0, got {pad_id}")
    for what, side in (("prompt_padding", prompt_padding), ("response_padding", response_padding)):
        if side not in PADDING_SIDES:
            raise ValueError(f"to_batch: {what} must be 'left' or 'right', got {side!r}")
    if invalid not in INVALID_POLICIES:
        raise ValueError(f"to_batch: invalid must be one of {INVALID_POLICIES}, got {invalid!r}")
    rows = _rows(request_outputs, tag_ids)
    bad = [x for x in rows if not x.valid]
    if bad and invalid == "raise":
        x = bad[0]
        raise ValueError(f"to_batch: {len(bad)} of {len(rows)} completions are invalid; first: "
                         f"request {x.request} sample {x.sample}: {x.problem}")
    if invalid == "keep":
        broken = [x for x in bad if x.problem.startswith("the engine's record")]
        if broken:
            x = broken[0]
            raise ValueError(f"to_batch(invalid='keep'): request {x.request} sample {x.sample}: "
                             f"{x.problem}; it has no layout to keep")
        for x in bad:
            x.valid = True  # its record is the layout it was sampled under
    if invalid == "drop":
        rows = [x for x in rows if x.valid]
        if not rows:
            raise ValueError(f"to_batch(invalid='drop'): all {len(bad)} completions are invalid; "
                             f"first: {bad[0].problem}")
    with_lp = {x.logprobs is not None for x in rows}
    if len(with_lp) > 1:
        raise ValueError("to_batch: some completions carry logprobs and some do not "
                         "(SamplingParams.logprobs differs between requests)")
    P = max(len(x.prompt) for x in rows)
    C = max(len(x.tokens) for x in rows)
    for what, limit, need in (("max_prompt_len", max_prompt_len, P),
                              ("max_response_len", max_response_len, C)):
        if limit is not None:
            limit = _int(limit, what)
            if limit < need:
                raise ValueError(f"to_batch: {what}={limit} but a row needs {need} "
                                 f"(nothing is truncated; raise it)")
    P = max_prompt_len if max_prompt_len is not None else P
    C = max_response_len if max_response_len is not None else C
    B = len(rows)
    z = lambda *s: torch.zeros(*s, dtype=torch.long)  # noqa: E731
    prompts, responses = torch.full((B, P), pad_id, dtype=torch.long), torch.full((B, C), pad_id,
                                                                                 dtype=torch.long)
    attn, pos, sid, bid = z(B, P + C), z(B, P + C), z(B, P + C), z(B, P + C)
    resp_mask, lp = z(B, C), torch.zeros(B, C, dtype=torch.float32)
    valid = torch.zeros(B, dtype=torch.bool)
    for b, x in enumerate(rows):
        p, c = len(x.prompt), len(x.tokens)
        p0 = P - p if prompt_padding == "left" else 0
        c0 = C - c if response_padding == "left" else 0
        prompts[b, p0:p0 + p] = torch.tensor(x.prompt)
        attn[b, p0:p0 + p] = 1
        pos[b, p0:p0 + p] = torch.arange(p)
        if c:
            cols = slice(P + c0, P + c0 + c)
            responses[b, c0:c0 + c] = torch.tensor(x.tokens)
            attn[b, cols] = 1
            pos[b, cols] = torch.tensor(x.positions)
            sid[b, cols] = torch.tensor(x.steps)
            bid[b, cols] = torch.tensor(x.blocks)
            if x.valid:
                sampled = torch.tensor([not j for j in x.injected], dtype=torch.long)
                resp_mask[b, c0:c0 + c] = sampled
                if x.logprobs is not None:
                    v = torch.tensor([0.0 if q is None else float(q) for q in x.logprobs])
                    lp[b, c0:c0 + c] = v * sampled
        valid[b] = x.valid
    out = {"prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], 1),
           "attention_mask": attn, "position_ids": pos, "step_ids": sid, "block_ids": bid,
           "response_mask": resp_mask, "structure_valid": valid,
           "row_index": torch.tensor([[x.request, x.sample] for x in rows], dtype=torch.long)}
    if with_lp == {True}:
        out["rollout_log_probs"] = lp
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out


# ----------------------------------------------------------------------------- checks

def _check_batch(batch: Mapping[str, torch.Tensor], need: Sequence[str]) -> tuple[int, int, int]:
    """-> (B, P, C) after checking the tensors agree with each other (a batch padded one way and
    tensors of another padding, or of another batch, are refused)."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"expected the dict of to_batch, got {type(batch).__name__}")
    missing = [k for k in need if k not in batch]
    if missing:
        raise KeyError(f"the batch lacks {missing} (build it with npr.integrations.layout.to_batch)")
    ids = batch["input_ids"]
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, L], got {list(ids.shape)}")
    B, L = ids.shape
    for k in ("attention_mask", "position_ids", "step_ids", "block_ids"):
        if k in batch and tuple(batch[k].shape) != (B, L):
            raise ValueError(f"{k} has shape {list(batch[k].shape)}, input_ids {[B, L]}")
    if "responses" not in batch:
        return B, L, 0
    C = int(batch["responses"].shape[1])
    P = L - C
    if tuple(batch["responses"].shape) != (B, C) or P < 0:
        raise ValueError(f"responses {list(batch['responses'].shape)} do not fit input_ids {[B, L]}")
    if not torch.equal(ids[:, P:], batch["responses"]):
        raise ValueError("input_ids[:, -C:] differ from responses: the tensors come from "
                         "different batches or paddings")
    if "prompts" in batch and not torch.equal(ids[:, :P], batch["prompts"]):
        raise ValueError("input_ids[:, :P] differ from prompts: the tensors come from "
                         "different batches or paddings")
    rm = batch.get("response_mask")
    if rm is not None:
        if tuple(rm.shape) != (B, C):
            raise ValueError(f"response_mask has shape {list(rm.shape)}, responses {[B, C]}")
        if bool((rm.bool() & ~batch["attention_mask"][:, P:].bool()).any()):
            raise ValueError("response_mask is 1 on a padding column (attention_mask 0 there): "
                             "mismatched pad settings between the two masks")
    return B, P, C


def parallel_attention_mask(batch: Mapping[str, torch.Tensor], *,
                            dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """[B, 1, L, L] spec §2 mask of a to_batch batch (attention_mask, step_ids, block_ids):
    query i may attend key j <=> both are real tokens, j <= i in the row, and they are not
    sibling steps (different step ids, same block). A padding query sees only itself (so no row
    of the softmax is empty: no NaN).

    dtype torch.bool: True = may attend (SDPA's convention; transformers 5 passes a 4-D mask to
    the attention function untouched). A floating dtype: additive, 0 = attend and
    torch.finfo(dtype).min = blocked, what transformers' eager attention adds to its scores (a
    bool mask there would be added as 0/1: silently wrong)."""
    _check_batch(batch, ("input_ids", "attention_mask", "step_ids", "block_ids"))
    real = batch["attention_mask"].bool()
    s, b = batch["step_ids"], batch["block_ids"]
    L = real.shape[1]
    idx = torch.arange(L, device=real.device)
    causal = idx[None, :] <= idx[:, None]                                      # [L, L]
    sib = ((s[:, :, None] > 0) & (s[:, None, :] > 0) & (s[:, :, None] != s[:, None, :])
           & (b[:, :, None] == b[:, None, :]))                                 # [B, L, L]
    allowed = causal[None] & real[:, :, None] & real[:, None, :] & ~sib
    allowed |= torch.eye(L, dtype=torch.bool, device=real.device)[None] & ~real[:, :, None]
    allowed = allowed[:, None]                                                 # [B, 1, L, L]
    if dtype == torch.bool:
        return allowed
    if not dtype.is_floating_point:
        raise TypeError(f"parallel_attention_mask: dtype must be torch.bool or floating, got {dtype}")
    zero = torch.zeros((), dtype=dtype, device=real.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


# ----------------------------------------------------------------------------- log-probs

def _is_npr_model(model: torch.nn.Module) -> bool:
    from npr.models.llama import LlamaDecoder

    return isinstance(model, LlamaDecoder)


def _is_transformers_model(model: torch.nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def predecessors(attention_mask: torch.Tensor) -> torch.Tensor:
    """attention_mask [B, L] -> [B, L] long: the column of the previous real token of each column
    in its row (-1 when none): the token a causal LM scores column j from."""
    L = attention_mask.shape[1]
    col = torch.arange(L, device=attention_mask.device).expand_as(attention_mask)
    real_col = torch.where(attention_mask.bool(), col, torch.full_like(col, -1))
    prev = torch.cummax(real_col, dim=1).values
    return torch.cat([torch.full_like(prev[:, :1], -1), prev[:, :-1]], dim=1)


def hf_attention_mask(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The 4-D mask a transformers model takes for this batch: bool for SDPA, additive in the
    model's dtype for eager attention. Other implementations (flash_attention_*, flex) do not
    take a dense 4-D mask: ValueError."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl == "sdpa":
        return parallel_attention_mask(batch)
    if impl == "eager":
        return parallel_attention_mask(batch, dtype=next(model.parameters()).dtype)
    raise ValueError(f"parallel log-probs through a transformers model need "
                     f"attn_implementation 'sdpa' or 'eager' (a dense 4-D mask); this model uses "
                     f"{impl!r}. Load it with attn_implementation='sdpa'.")


def parallel_logprobs(model: torch.nn.Module, batch: Mapping[str, torch.Tensor],
                      temperature: float = 1.0) -> torch.Tensor:
    """-> [B, C] fp32: log softmax(logits / temperature) of each response token under the spec
    §2 layout, scored from its predecessor in canonical order; 0 where response_mask is 0.
    Differentiable: the call a trainer makes instead of its causal forward.

    model: an npr LlamaDecoder (npr.load_model): the rows with scored tokens are packed back to
    back (no padding) and go through npr.train.logprobs.token_logprobs, the trainer's
    memory-linear layout forward. A transformers PreTrainedModel (attn_implementation "sdpa" or
    "eager"): one forward over the padded batch with the [B, 1, L, L] mask of
    parallel_attention_mask and the §2 position ids: memory O(B * L^2) for the mask (fine for
    short rollouts; the npr model is the memory-linear path). Anything else: TypeError."""
    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
            and temperature > 0):
        raise ValueError(f"parallel_logprobs: temperature must be > 0, got {temperature!r}")
    B, P, C = _check_batch(batch, ("input_ids", "responses", "attention_mask", "position_ids",
                                   "step_ids", "block_ids", "response_mask"))
    if _is_npr_model(model):
        return _npr_logprobs(model, batch, float(temperature), B, P, C)
    if _is_transformers_model(model):
        return _hf_logprobs(model, batch, float(temperature), B, P, C)
    raise TypeError(f"parallel_logprobs: model must be an npr LlamaDecoder (npr.load_model) or a "
                    f"transformers PreTrainedModel, got {type(model).__name__}")


def _row_layout(batch: Mapping[str, torch.Tensor], b: int, P: int) -> tuple[torch.Tensor, Layout,
                                                                            torch.Tensor]:
    """Row b without its padding -> (token ids [n], its Layout, scored [n] bool)."""
    real = batch["attention_mask"][b].bool()
    cols = real.nonzero()[:, 0]
    resp = cols >= P
    prompt_len = int((~resp).sum())  # columns ascend: the prompt's real tokens come first
    pos = batch["position_ids"][b, cols].cpu()
    if not torch.equal(pos[:prompt_len], torch.arange(prompt_len)):
        raise ValueError(f"row {b}: prompt position ids are not 0..{prompt_len - 1}: mismatched "
                         "pad settings (position_ids padded differently from attention_mask?)")
    rc = cols[prompt_len:]
    try:
        lay = record_layout(prompt_len, pos[prompt_len:].tolist(),
                            batch["step_ids"][b, rc].tolist(), batch["block_ids"][b, rc].tolist())
    except ValueError as e:
        raise ValueError(f"row {b}: {e}") from None
    scored = torch.zeros(len(cols), dtype=torch.bool)
    scored[prompt_len:] = batch["response_mask"][b, rc - P].bool().cpu()
    return batch["input_ids"][b, cols], lay, scored


def _npr_logprobs(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], temperature: float,
                  B: int, P: int, C: int) -> torch.Tensor:
    device = batch["input_ids"].device
    out = torch.zeros(B, C, dtype=torch.float32, device=device)
    rows = [b for b in range(B) if bool(batch["response_mask"][b].any())]
    if not rows:
        return out
    items, cols = [], []
    for b in rows:
        ids, lay, scored = _row_layout(batch, b, P)
        items.append((ids.tolist(), lay, scored.tolist()))
        cols.append(batch["attention_mask"][b].bool().nonzero()[:, 0])
    packed = pack(items).to(next(model.parameters()).device)
    lp = token_logprobs(model, packed, temperature)  # [T], 0 where not scored
    # Packed token t of row rows[k] sits at column cols[k][t - cu[k]]; keep the response ones.
    rb = torch.cat([torch.full_like(c, b) for b, c in zip(rows, cols)])
    rc = torch.cat(cols)
    keep = rc >= P
    res = torch.zeros(B, C, dtype=torch.float32, device=lp.device).index_put(
        (rb[keep].to(lp.device), (rc[keep] - P).to(lp.device)), lp[keep.to(lp.device)])
    return res.to(device)


def _hf_logprobs(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], temperature: float,
                 B: int, P: int, C: int) -> torch.Tensor:
    mask4 = hf_attention_mask(model, batch)
    prev = predecessors(batch["attention_mask"])[:, P:]                         # [B, C]
    scored = batch["response_mask"].bool()
    if bool((scored & (prev < 0)).any()):
        raise ValueError("a scored response token has no token before it in its row")
    # The predecessor must be visible to the token (a scored token after a sibling step is an
    # injected <step>, which must not be scored).
    vis = parallel_attention_mask(batch)[:, 0, P:, :]                           # [B, C, L]
    seen = vis.gather(2, prev.clamp(min=0)[:, :, None])[:, :, 0]
    if bool((scored & ~seen).any()):
        b, c = (scored & ~seen).nonzero()[0].tolist()
        raise ValueError(f"row {b} scores response token {c}, whose predecessor is a sibling step "
                         "it cannot see (an injected <step> must not be scored)")
    dev = next(model.parameters()).device
    out = model(input_ids=batch["input_ids"].to(dev), attention_mask=mask4.to(dev),
                position_ids=batch["position_ids"].to(dev))
    logits = out.logits if hasattr(out, "logits") else out                      # [B, L, V]
    idx = scored.nonzero()
    res = torch.zeros(B, C, dtype=torch.float32, device=logits.device)
    if idx.numel():
        bb, cc = idx[:, 0].to(dev), idx[:, 1].to(dev)
        rows = logits[bb, prev.to(dev)[bb, cc]].float() / temperature           # [N, V]
        tok = batch["responses"].to(dev)[bb, cc]
        vals = torch.log_softmax(rows, dim=-1).gather(1, tok[:, None])[:, 0]
        res = res.index_put((bb, cc), vals)
    return res.to(batch["input_ids"].device)
