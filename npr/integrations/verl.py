"""npr as the rollout of verl (and the vLLM actor of OpenRLHF).

`NPRRollout` has the shape of verl's `BaseRollout` (verl/workers/rollout/base.py: async
`resume(tags)`, `release()`, `update_weights(weights)`, and `generate_sequences(prompts)`) and
returns the DataProto-shaped dict verl's trainer consumes, with the spec §2 layout included:

    {"batch": {prompts [B,P], responses [B,R], input_ids [B,P+R], attention_mask [B,P+R],
               position_ids [B,P+R] (spec §2), response_mask [B,R] (0 on injected tokens),
               rollout_log_probs [B,R], step_ids [B,P+R], block_ids [B,P+R],
               structure_valid [B]},
     "non_tensor_batch": {"npr_text": object array [B], "finish_reason": object array [B]},
     "meta_info": {... the input's, plus "npr_logprobs_mode"}}

verl itself is not imported here (it needs Ray, vLLM and a GPU). With verl installed, pass a
DataProto and get a DataProto back (DataProto.from_dict); to register the class as a verl rollout,
subclass it with verl's BaseRollout in your code (`class Rollout(NPRRollout, BaseRollout)`) and
build the engine from verl's model_config.local_path.

What verl and OpenRLHF do with the mask and positions, and what must be overridden (read from
verl 0.8-dev main, Jan 2026, and OpenRLHF main, Aug 2026):
- verl AgentLoop (verl/experimental/agent_loop/agent_loop.py, `_compute_position_ids`) recomputes
  position_ids from the 2-D attention_mask (`compute_position_id_with_mask`: cumsum - 1), which
  erases the §2 positions: keep the rollout's position_ids (use generate_sequences' batch, or
  override `_compute_position_ids` / `_postprocess` to carry position_ids, step_ids, block_ids).
- verl actor (verl/workers/actor/dp_actor.py, `DataParallelPPOActor._forward_micro_batch`) runs
  the model with the 2-D mask (causal; with use_remove_padding a causal flash-attention varlen
  pass): override it to score with `npr.integrations.layout.parallel_logprobs(model, micro_batch,
  temperature)` (npr models: memory-linear) or to pass `parallel_attention_mask(micro_batch)`
  and the batch's position_ids to a transformers model (SDPA/eager; not flash-attention). Its
  `compute_log_prob` / `update_policy` select only "responses", "input_ids", "attention_mask",
  "position_ids" (and response_mask ...): add "step_ids" and "block_ids" to those select_keys.
- OpenRLHF actor (openrlhf/models/actor.py, `Actor.forward`) derives position_ids from the 2-D
  mask (cumsum - 1) and uses a causal mask; override forward the same way. OpenRLHF's vLLM actor
  (openrlhf/trainer/ray/vllm_engine.py, LLMRayActor) maps to this class: generate ->
  generate_sequences / engine.generate, update_weight(name, ...) -> update_weight(name, tensor)
  (after the tensor arrived by broadcast), reset_prefix_cache -> a no-op (update_weights drops
  the engine's KV), sleep / wake_up -> release / resume.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable

import numpy as np
import torch

from npr.engine.sampling_params import SamplingParams
from npr.integrations.layout import parallel_logprobs, to_batch
from npr.integrations.weights import sync_weights

LOGPROBS_MODES = ("processed", "raw")
RESUME_TAGS = ("weights", "kv_cache")


def _prompt_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """[B, P] padded prompts -> their real tokens; the real tokens of a row must be one run."""
    if input_ids.dim() != 2 or tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"prompts: input_ids {list(input_ids.shape)} and attention_mask "
                         f"{list(attention_mask.shape)} must both be [B, P]")
    rows = []
    for b in range(input_ids.shape[0]):
        cols = attention_mask[b].bool().nonzero()[:, 0]
        if cols.numel() == 0:
            raise ValueError(f"prompts: row {b} has no real token (attention_mask all 0)")
        if int(cols[-1] - cols[0]) + 1 != cols.numel():
            raise ValueError(f"prompts: row {b}'s attention_mask has padding between real tokens; "
                             "expected left (or right) padding: mismatched pad settings")
        rows.append([int(t) for t in input_ids[b, cols].tolist()])
    return rows


class NPRRollout:
    """verl BaseRollout-shaped rollout over an npr.Engine (module docstring).

    response_length: verl's rollout.response_length (responses are padded to it; the engine's
    token budget, injected tokens included, is the same number). n: completions per prompt
    (rows repeat each prompt n times, consecutively, as DataProto.repeat(interleave=True)).
    logits_processors: fn(prompt_ids) -> that prompt's processors. invalid: to_batch's policy
    (default "flag": invalid structures keep their row with response_mask 0). logprobs_mode:
    "processed" (the distribution sampled from) or "raw" (the model's at temperature 1; verl's
    rollout-correction compares rollout_log_probs with the actor's, so choose what your
    correction expects)."""

    def __init__(self, engine: Any, *, response_length: int, pad_token_id: int | None = None,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = -1, n: int = 1,
                 parallel: str = "native", seed: int | None = None,
                 logits_processors: Callable[[list[int]], Sequence[Callable] | None] | None = None,
                 logprobs_mode: str = "processed", invalid: str = "flag") -> None:
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"NPRRollout: logprobs_mode must be one of {LOGPROBS_MODES}, "
                             f"got {logprobs_mode!r}")
        if not (isinstance(n, int) and n >= 1):
            raise ValueError(f"NPRRollout: n must be an int >= 1, got {n!r}")
        if parallel != "off" and getattr(engine, "tag_ids", None) is None:
            raise ValueError(f"NPRRollout: parallel={parallel!r} needs the tag tokens in the "
                             "engine's tokenizer (or parallel='off')")
        self.params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k,
                                     max_new_tokens=response_length, parallel=parallel, seed=seed)
        tok = getattr(engine, "tokenizer", None)
        pad = pad_token_id if pad_token_id is not None else getattr(tok, "pad_token_id", None)
        if pad is None:
            pad = getattr(tok, "eos_token_id", None)
        if not isinstance(pad, int) or isinstance(pad, bool) or pad < 0:
            raise ValueError(f"NPRRollout: pad_token_id must be a token id, got {pad!r} (the "
                             "tokenizer has no pad or eos token: pass pad_token_id=)")
        self.engine, self.response_length, self.pad_id, self.n = engine, response_length, pad, n
        self.processors, self.logprobs_mode, self.invalid = logits_processors, logprobs_mode, invalid
        self.calls = 0

    # --- BaseRollout ------------------------------------------------------------------------
    async def resume(self, tags: list[str]) -> None:
        """tags: "weights" (they never leave the engine's model: nothing to do) and/or
        "kv_cache" (re-allocates the KV cache freed by release)."""
        bad = [t for t in tags if t not in RESUME_TAGS]
        if bad:
            raise ValueError(f"NPRRollout.resume: unknown tags {bad}; expected {RESUME_TAGS}")
        if "kv_cache" in tags:
            self.engine.wake_up()

    async def release(self) -> None:
        """Frees the KV cache (the weights stay: they are the engine's model)."""
        self.engine.sleep()

    async def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]], **kwargs: Any) -> None:
        """All weights, HF names (a generator is fine): checked, then copied; cached KV dropped."""
        sync_weights(self.engine, list(weights))

    def generate_sequences(self, prompts: Any) -> Any:
        """prompts: a DataProto, or its dict shape {"batch": {input_ids [B,P], attention_mask
        [B,P], ...}, "meta_info": {...}} (or just the tensor dict). meta_info may set
        temperature / top_p / top_k, and do_sample=False (greedy). Returns the same kind."""
        tensors, non_tensors, meta = self._unpack(prompts)
        if "input_ids" not in tensors or "attention_mask" not in tensors:
            raise KeyError("generate_sequences: prompts need input_ids and attention_mask")
        ids, am = tensors["input_ids"], tensors["attention_mask"]
        rows = _prompt_rows(ids, am)
        P = ids.shape[1]
        params = self.params
        over = {k: meta[k] for k in ("temperature", "top_p", "top_k") if k in meta}
        if meta.get("do_sample") is False:
            over["temperature"] = 0.0
        if over:
            params = dataclasses.replace(params, **over)
        if self.logprobs_mode == "raw" and "logprobs_mode" in SamplingParams.__dataclass_fields__:
            params = dataclasses.replace(params, logprobs_mode="raw")
            raw_in_engine = True
        else:
            raw_in_engine = False
        per = []
        for k, r in enumerate(rows):
            seed = None if params.seed is None else params.seed + 7919 * self.calls + k
            procs = list(self.processors(r) or []) if self.processors else None
            per.append(dataclasses.replace(params, n=self.n, seed=seed, logits_processors=procs,
                                           logprobs=True))
        self.calls += 1
        outs = self.engine.generate(input_ids=rows, sampling_params=per)
        batch = to_batch(outs, self.pad_id, prompt_padding="left", response_padding="right",
                         max_prompt_len=P, max_response_len=self.response_length,
                         tag_ids=self.engine.tag_ids,
                         invalid="keep" if params.parallel == "off" else self.invalid)
        if self.logprobs_mode == "raw" and not raw_in_engine:
            with torch.no_grad():
                batch["rollout_log_probs"] = parallel_logprobs(self.engine.model, batch, 1.0)
        keep = batch.pop("row_index")
        comps = [outs[int(r)].outputs[int(s)] for r, s in keep.tolist()]
        out_non = {"npr_text": np.array([c.text for c in comps], dtype=object),
                   "finish_reason": np.array([c.finish_reason for c in comps], dtype=object)}
        for k, v in non_tensors.items():  # per-prompt fields follow their rows
            v = np.asarray(v, dtype=object)
            if len(v) == len(rows):
                out_non.setdefault(k, v[keep[:, 0].numpy()])
        meta = {**meta, "npr_logprobs_mode": self.logprobs_mode}
        return self._pack(prompts, batch, out_non, meta)

    # --- OpenRLHF's vLLM actor names -------------------------------------------------------
    def update_weight(self, name: str, tensor: torch.Tensor) -> None:
        """One weight (OpenRLHF pushes them one by one)."""
        sync_weights(self.engine, [(name, tensor)], strict=False)

    def reset_prefix_cache(self) -> None:
        """Nothing to do: update_weights already dropped every cached KV block."""

    def sleep(self, level: int = 1) -> None:
        self.engine.sleep()

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.engine.wake_up()

    # --- DataProto <-> dict ------------------------------------------------------------------
    @staticmethod
    def _unpack(prompts: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
        if hasattr(prompts, "batch") and hasattr(prompts, "meta_info"):  # a verl DataProto
            tensors = {k: prompts.batch[k] for k in prompts.batch.keys()}
            return tensors, dict(prompts.non_tensor_batch or {}), dict(prompts.meta_info or {})
        if not isinstance(prompts, Mapping):
            raise TypeError(f"generate_sequences: expected a DataProto or a dict, got "
                            f"{type(prompts).__name__}")
        if "batch" in prompts:
            return (dict(prompts["batch"]), dict(prompts.get("non_tensor_batch") or {}),
                    dict(prompts.get("meta_info") or {}))
        return dict(prompts), {}, {}

    @staticmethod
    def _pack(prompts: Any, batch: dict[str, torch.Tensor], non: dict[str, Any],
              meta: dict[str, Any]) -> Any:
        if hasattr(prompts, "batch") and hasattr(prompts, "meta_info"):
            return type(prompts).from_dict(tensors=batch, non_tensors=non, meta_info=meta)
        return {"batch": batch, "non_tensor_batch": non, "meta_info": meta}
