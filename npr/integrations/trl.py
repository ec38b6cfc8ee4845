"""npr as TRL's rollout engine (TRL >= 1.16: `pip install 'npr[trl]'`).

    rollout_func = make_rollout_func(engine)                      # plain or parallel rollouts
    trainer = ParallelGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...),
                                  train_dataset=..., rollout_func=rollout_func)
    trainer = ParallelRLOOTrainer(model=..., reward_funcs=..., args=RLOOConfig(...),
                                  train_dataset=..., engine=engine)

What TRL 1.16 does and what is overridden here (read from trl/trainer/grpo_trainer.py and
rloo_trainer.py):
- GRPOTrainer calls `rollout_func(prompts, trainer)` once per generation batch (prompts already
  repeated num_generations times, consecutively) and syncs no weights itself for a custom
  rollout: the rollout syncs the trainer's model into the engine, once per optimizer step
  (trainer.state.global_step), before generating. It returns prompt_ids, completion_ids, logprobs,
  env_mask (0 on injected tokens: TRL multiplies it into the loss mask) and extra fields, which
  reach the reward functions as keyword arguments: `npr_text` (the completion text WITH its tags:
  TRL decodes `completions` with skip_special_tokens=True, so the tags vanish there),
  `npr_structure_valid`, `npr_finish_reason`.
- TRL recomputes log-probs in `_get_per_token_logps_and_entropies(model, input_ids,
  attention_mask [B, L], logits_to_keep, ...)`, with no position ids (arange) and a causal mask.
  ParallelGRPOTrainer / ParallelRLOOTrainer override it: the same fused LM head TRL installs
  (`add_fused_lm_head`, temperature included), called with the spec §2 position ids and the
  [B, 1, L, L] mask of npr.integrations.layout (transformers 5 passes a 4-D mask to the attention
  untouched; bool for SDPA, additive for eager). Each row's layout is the engine's record, found
  by the row's token ids in what the rollout produced. Injected tokens and flagged rows get
  label -100: log-prob 0, no gradient.
- RLOOTrainer has no rollout_func: its hook is `_generate_single_turn(prompt_ids, images,
  multimodal_fields) -> completion_ids`; ParallelRLOOTrainer generates there with the engine.
  RLOO sums per-token log-probs per sequence, so the 0 of injected tokens removes them exactly.
- A plain GRPOTrainer is only right for parallel="off" rollouts (causal layout); make_rollout_func
  refuses a parallel rollout for a trainer that would recompute it causally.
"""
from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch

from npr.engine.sampling_params import SamplingParams
from npr.integrations.layout import hf_attention_mask, parallel_logprobs, to_batch
from npr.integrations.weights import sync_weights

TRL_MIN_VERSION = "1.16"
TRL_HINT = (f"npr.integrations.trl needs TRL >= {TRL_MIN_VERSION}: pip install 'npr[trl]' "
            f"(or pip install 'trl>={TRL_MIN_VERSION}')")
LOGPROBS_MODES = ("processed", "raw")
ProcessorsFn = Callable[[list[int]], Sequence[Callable] | None]


def require_trl() -> Any:
    """The trl module, or ImportError saying how to install it."""
    try:
        import trl
    except ImportError as e:
        raise ImportError(TRL_HINT) from e
    from packaging.version import Version

    if Version(trl.__version__) < Version(TRL_MIN_VERSION):
        raise ImportError(f"{TRL_HINT}; found trl {trl.__version__}")
    return trl


# ----------------------------------------------------------------------------- row layouts

class LayoutRegistry:
    """The layouts of the rows the latest rollouts produced, keyed by their token ids (prompt +
    completion): how the log-prob pass finds a row's layout after TRL padded, shuffled and split
    the batch. Keeps the last `keep` rollout calls (training buffers one generation batch; an
    evaluation rollout in between must not evict it)."""

    def __init__(self, keep: int = 4) -> None:
        self._calls: deque[dict[tuple[int, ...], tuple[torch.Tensor, ...]]] = deque(maxlen=keep)

    def add(self, batch: dict[str, torch.Tensor]) -> None:
        """batch: a to_batch dict."""
        rows: dict[tuple[int, ...], tuple[torch.Tensor, ...]] = {}
        P = batch["prompts"].shape[1]
        for b in range(batch["input_ids"].shape[0]):
            real = batch["attention_mask"][b].bool()
            scored = torch.zeros_like(real)
            scored[P:] = batch["response_mask"][b].bool()
            key = tuple(batch["input_ids"][b, real].tolist())
            rows[key] = (batch["position_ids"][b, real], batch["step_ids"][b, real],
                         batch["block_ids"][b, real], scored[real])
        self._calls.append(rows)

    def find(self, key: tuple[int, ...]) -> tuple[torch.Tensor, ...] | None:
        """-> (position_ids, step_ids, block_ids, scored) over the row's real tokens, or None."""
        for rows in reversed(self._calls):
            if key in rows:
                return rows[key]
        return None


def _registry(trainer: Any) -> LayoutRegistry:
    reg = getattr(trainer, "_npr_layouts", None)
    if reg is None:
        reg = LayoutRegistry()
        trainer._npr_layouts = reg
    return reg


def layout_tensors(registry: LayoutRegistry, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor, logits_to_keep: int) -> dict[str, torch.Tensor]:
    """TRL's padded rows [B, L] (prompt left-padded, completion right-padded) -> position_ids,
    step_ids, block_ids [B, L] from the engine's records, and labels [B, L] (-100 except on the
    completion tokens the model sampled). A row whose completion TRL masked out entirely
    (mask_truncated_completions) scores nothing. A row the rollout did not produce: KeyError."""
    B, L = input_ids.shape
    dev = input_ids.device
    pos = torch.zeros(B, L, dtype=torch.long, device=dev)
    sid, bid = torch.zeros_like(pos), torch.zeros_like(pos)
    labels = torch.full_like(input_ids, -100)
    for b in range(B):
        real = attention_mask[b].bool()
        cols = real.nonzero()[:, 0]
        rec = registry.find(tuple(input_ids[b, real].tolist()))
        if rec is None:
            if not bool(real[L - logits_to_keep:].any()):
                pos[b, cols] = torch.arange(len(cols), device=dev)  # prompt only: nothing scored
                continue
            raise KeyError(f"row {b} of the log-prob pass was not produced by an npr rollout of "
                           "this trainer (make_rollout_func); its parallel layout is unknown")
        p, s, k, scored = (t.to(dev) for t in rec)
        pos[b, cols], sid[b, cols], bid[b, cols] = p, s, k
        lab = torch.full((len(cols),), -100, dtype=input_ids.dtype, device=dev)
        lab[scored] = input_ids[b, cols][scored]
        labels[b, cols] = lab
    labels[:, : L - logits_to_keep] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": pos,
            "step_ids": sid, "block_ids": bid, "labels": labels}


# ----------------------------------------------------------------------------- rollouts

def _sampling_template(args: Any, parallel: str) -> SamplingParams:
    """SamplingParams from a GRPOConfig / RLOOConfig: the trainer recomputes log-probs at
    args.temperature, so the engine samples at it."""
    if getattr(args, "min_p", None) is not None:
        raise ValueError("make_rollout_func: min_p is not supported by npr's sampler; unset it")
    if float(getattr(args, "repetition_penalty", 1.0)) != 1.0:
        raise ValueError("make_rollout_func: repetition_penalty is not supported (npr has "
                         "SamplingParams.step_repetition_penalty inside steps only); pass "
                         "sampling_params= to use it")
    top_k = int(getattr(args, "top_k", 0) or 0)
    return SamplingParams(temperature=float(args.temperature), top_p=float(args.top_p),
                          top_k=top_k if top_k > 0 else -1,
                          max_new_tokens=int(args.max_completion_length), parallel=parallel)


def _engine_records_raw() -> bool:
    return "logprobs_mode" in SamplingParams.__dataclass_fields__


class _Rollouts:
    """The engine side of a TRL trainer: weight sync, generation, the row registry."""

    def __init__(self, engine: Any, *, parallel: str = "native",
                 sampling_params: SamplingParams | None = None,
                 logits_processors: ProcessorsFn | None = None, logprobs_mode: str = "processed",
                 sync: bool = True, text_field: str = "npr_text") -> None:
        if parallel not in ("native", "sequential", "off"):
            raise ValueError(f"parallel must be native | sequential | off, got {parallel!r}")
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {logprobs_mode!r}")
        if sampling_params is not None and not isinstance(sampling_params, SamplingParams):
            raise TypeError(f"sampling_params must be an npr.SamplingParams, got "
                            f"{type(sampling_params).__name__}")
        if sampling_params is not None and sampling_params.parallel != parallel:
            raise ValueError(f"sampling_params.parallel={sampling_params.parallel!r} but "
                             f"parallel={parallel!r}")
        if parallel != "off" and getattr(engine, "tag_ids", None) is None:
            raise ValueError(f"parallel={parallel!r} needs the eight tag tokens in the engine's "
                             "tokenizer (npr.tokenizer.add_tag_tokens); or use parallel='off'")
        self.engine, self.parallel, self.template = engine, parallel, sampling_params
        self.processors, self.logprobs_mode, self.sync = logits_processors, logprobs_mode, sync
        self.text_field = text_field
        self.last_synced_step: int | None = None
        self.calls = 0

    def sync_from(self, trainer: Any) -> None:
        """Once per optimizer step: the trainer's model -> the engine (names/shapes checked)."""
        step = int(trainer.state.global_step)
        if not self.sync or self.last_synced_step == step:
            return
        model = trainer.accelerator.unwrap_model(trainer.model)
        sync_weights(self.engine, model)
        self.last_synced_step = step

    def generate(self, prompt_ids: Sequence[Sequence[int]], trainer: Any) -> dict[str, Any]:
        if self.parallel != "off" and not getattr(trainer, "_npr_parallel_layout", False):
            raise TypeError(f"parallel={self.parallel!r} rollouts need a trainer that recomputes "
                            "their log-probs under the parallel layout: use "
                            "npr.integrations.trl.ParallelGRPOTrainer (a plain GRPOTrainer "
                            "would score them with a causal mask); or parallel='off'")
        if not prompt_ids:
            raise ValueError("rollout: no prompts")
        self.sync_from(trainer)
        template = self.template or _sampling_template(trainer.args, self.parallel)
        raw_in_engine = self.logprobs_mode == "raw" and _engine_records_raw()
        if raw_in_engine:
            template = dataclasses.replace(template, logprobs_mode="raw")
        template = dataclasses.replace(template, logprobs=True)
        # Consecutive equal prompts (TRL repeats each num_generations times) -> one request, n.
        groups: list[tuple[list[int], int]] = []
        for ids in prompt_ids:
            ids = [int(t) for t in ids]
            if groups and groups[-1][0] == ids:
                groups[-1] = (ids, groups[-1][1] + 1)
            else:
                groups.append((ids, 1))
        params = []
        for k, (ids, n) in enumerate(groups):
            seed = None if template.seed is None else (template.seed + 7919 * self.calls + k)
            procs = list(self.processors(ids) or []) if self.processors else template.logits_processors
            params.append(dataclasses.replace(template, n=n, seed=seed, logits_processors=procs))
        self.calls += 1
        outs = self.engine.generate(input_ids=[g[0] for g in groups], sampling_params=params)
        pad = getattr(getattr(trainer, "processing_class", None), "pad_token_id", None)
        batch = to_batch(outs, pad_id=int(pad) if isinstance(pad, int) and pad >= 0 else 0,
                         tag_ids=self.engine.tag_ids,
                         invalid="keep" if self.parallel == "off" else "flag")
        _registry(trainer).add(batch)
        lp = batch["rollout_log_probs"]
        if self.logprobs_mode == "raw" and not raw_in_engine:
            with torch.no_grad():  # the engine's model at temperature 1, under the §2 layout
                lp = parallel_logprobs(self.engine.model, batch, temperature=1.0)
        completions = [c for ro in outs for c in ro.outputs]
        res: dict[str, Any] = {"prompt_ids": [], "completion_ids": [], "logprobs": [],
                               "env_mask": [], self.text_field: [], "npr_structure_valid": [],
                               "npr_finish_reason": []}
        for b, (ro, c) in enumerate((ro, c) for ro in outs for c in ro.outputs):
            n = len(c.token_ids)
            mask = batch["response_mask"][b, :n].tolist()
            res["prompt_ids"].append(list(ro.prompt_token_ids))
            res["completion_ids"].append(list(c.token_ids))
            res["logprobs"].append([None if inj else float(v)
                                    for v, inj in zip(lp[b, :n].tolist(), c.injected)])
            res["env_mask"].append([int(m) for m in mask])
            res[self.text_field].append(c.text)
            res["npr_structure_valid"].append(bool(c.structure_valid))
            res["npr_finish_reason"].append(c.finish_reason)
        assert len(completions) == len(prompt_ids), (len(completions), len(prompt_ids))
        return res


def make_rollout_func(engine: Any, *, parallel: str = "native",
                      sampling_params: SamplingParams | None = None,
                      logits_processors: ProcessorsFn | None = None,
                      logprobs_mode: str = "processed", sync_weights: bool = True,
                      text_field: str = "npr_text") -> Callable[[list, Any], dict[str, Any]]:
    """-> rollout_func(prompts, trainer) for TRL's GRPOTrainer(rollout_func=...).

    engine: an npr.Engine whose model has the trainer model's architecture (the rollout copies
    the trainer's weights into it once per optimizer step; sync_weights=False leaves that to
    you). parallel: "native" | "sequential" need ParallelGRPOTrainer; "off" works with a plain
    GRPOTrainer. sampling_params: a template (n, seed and processors are set per prompt); default:
    the trainer's temperature / top_p / top_k / max_completion_length. logits_processors:
    fn(prompt_ids) -> processors of that prompt's request. logprobs_mode: "processed" (the
    distribution sampled from, npr's record) or "raw" (the model's, temperature 1, before any
    processing; recorded by the engine when its SamplingParams has logprobs_mode, else recomputed
    with parallel_logprobs on the engine's model). Prompts are tokenized as TRL does
    (processing_class(text=...) or apply_chat_template for conversational prompts)."""
    ro = _Rollouts(engine, parallel=parallel, sampling_params=sampling_params,
                   logits_processors=logits_processors, logprobs_mode=logprobs_mode,
                   sync=sync_weights, text_field=text_field)

    def rollout_func(prompts: list, trainer: Any) -> dict[str, Any]:
        return ro.generate(tokenize_prompts(trainer, prompts), trainer)

    rollout_func.rollouts = ro  # type: ignore[attr-defined]
    return rollout_func


def tokenize_prompts(trainer: Any, prompts: list) -> list[list[int]]:
    """TRL's own tokenization of prompts (GRPOTrainer._tokenize_prompts without images)."""
    pc = trainer.processing_class
    if not prompts:
        return []
    if isinstance(prompts[0], list):  # conversational: [{"role", "content"}, ...]
        out = pc.apply_chat_template(conversation=prompts, add_generation_prompt=True,
                                     tokenize=True, return_dict=True,
                                     **(getattr(trainer, "chat_template_kwargs", None) or {}))
        return [list(x) for x in out["input_ids"]]
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError("rollout: prompts must be strings or conversations (lists of messages)")
    return [list(x) for x in pc(text=prompts)["input_ids"]]


# ----------------------------------------------------------------------------- trainers

_MULTIMODAL = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask",
               "spatial_shapes", "num_tiles", "image_sizes", "token_type_ids",
               "mm_token_type_ids", "image_position_ids")


class ParallelLayoutMixin:
    """Replaces TRL's causal log-prob pass by the spec §2 one (module docstring)."""

    _npr_parallel_layout = True

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           batch_size=None, compute_entropy=False,
                                           compute_aux_loss=False, **multimodal):
        used = [k for k, v in multimodal.items() if v is not None]
        if used:
            raise NotImplementedError(f"npr parallel log-probs: multimodal inputs {used} are not "
                                      "supported")
        unknown = [k for k in multimodal if k not in _MULTIMODAL]
        if unknown:
            raise TypeError(f"unexpected arguments {unknown} (TRL version mismatch?)")
        base = self.accelerator.unwrap_model(model)
        base = base.get_base_model() if hasattr(base, "get_base_model") else base
        lay = layout_tensors(_registry(self), input_ids, attention_mask, logits_to_keep)
        batch_size = batch_size or input_ids.size(0)
        logps, ents, auxs = [], [], []
        for start in range(0, input_ids.size(0), batch_size):
            sl = slice(start, start + batch_size)
            part = {k: v[sl] for k, v in lay.items()}
            mask4 = hf_attention_mask(base, part)
            kwargs = {}
            if compute_aux_loss:
                kwargs["output_router_logits"] = True
            with self.accelerator.autocast():
                out = model(input_ids=part["input_ids"], attention_mask=mask4,
                            position_ids=part["position_ids"], labels=part["labels"],
                            fused_lm_head=True, **kwargs)
            logps.append(out.log_probs[:, -logits_to_keep:])
            if compute_entropy:
                ents.append(out.entropy[:, -logits_to_keep:])
            if compute_aux_loss:
                auxs.append(out.aux_loss)
        return (torch.cat(logps, 0), torch.cat(ents, 0) if compute_entropy else None,
                torch.stack(auxs).mean() if compute_aux_loss else None)


def _build_grpo() -> type:
    trl = require_trl()

    class ParallelGRPOTrainer(ParallelLayoutMixin, trl.GRPOTrainer):
        """GRPOTrainer whose log-probs follow the spec §2 layout of npr rollouts. Needs
        rollout_func=make_rollout_func(engine, ...)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if kwargs.get("rollout_func") is None:
                raise ValueError("ParallelGRPOTrainer needs rollout_func="
                                 "npr.integrations.trl.make_rollout_func(engine)")
            super().__init__(*args, **kwargs)

    return ParallelGRPOTrainer


def _build_rloo() -> type:
    trl = require_trl()

    class ParallelRLOOTrainer(ParallelLayoutMixin, trl.RLOOTrainer):
        """RLOOTrainer that generates with an npr.Engine (its `_generate_single_turn` hook) and
        scores under the spec §2 layout. Extra arguments: engine, and make_rollout_func's
        parallel / sampling_params / logits_processors / logprobs_mode / sync_weights."""

        def __init__(self, *args: Any, engine: Any, parallel: str = "native",
                     sampling_params: SamplingParams | None = None,
                     logits_processors: ProcessorsFn | None = None,
                     logprobs_mode: str = "processed", sync_weights: bool = True,
                     **kwargs: Any) -> None:
            self._npr_rollouts = _Rollouts(engine, parallel=parallel,
                                           sampling_params=sampling_params,
                                           logits_processors=logits_processors,
                                           logprobs_mode=logprobs_mode, sync=sync_weights)
            super().__init__(*args, **kwargs)

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields):
            if images is not None or multimodal_fields:
                raise NotImplementedError("ParallelRLOOTrainer: multimodal prompts are not "
                                          "supported")
            res = self._npr_rollouts.generate(prompt_ids, self)
            keys = (self._npr_rollouts.text_field, "npr_structure_valid", "npr_finish_reason")
            self._npr_extras = (res["completion_ids"], {k: res[k] for k in keys})
            return res["completion_ids"]

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            # RLOO passes reward functions the dataset columns only: add the rollout's fields
            # (npr_text with the tags, ...) to the rows they belong to.
            ids, extras = getattr(self, "_npr_extras", (None, {}))
            if ids is not None and [list(x) for x in completion_ids_list] == ids:
                inputs = [dict(x, **{k: v[i] for k, v in extras.items()})
                          for i, x in enumerate(inputs)]
            return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)

    return ParallelRLOOTrainer


_BUILDERS = {"ParallelGRPOTrainer": _build_grpo, "ParallelRLOOTrainer": _build_rloo}
_BUILT: dict[str, type] = {}


def __getattr__(name: str) -> type:
    """The trainer classes subclass TRL's: built (and trl imported) on first use."""
    if name in _BUILDERS:
        if name not in _BUILT:
            _BUILT[name] = _BUILDERS[name]()
        return _BUILT[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["make_rollout_func", "ParallelGRPOTrainer", "ParallelRLOOTrainer", "LayoutRegistry",
           "layout_tensors", "tokenize_prompts", "require_trl", "TRL_HINT"]
