"""Trainer weights -> the engine: names and shapes are checked against the engine's model before
anything is copied, so a model of another architecture (or naming) is a clear error, never a
half-updated engine."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

# Wrappers that prefix parameter names: DDP / DeepSpeed ("module."), torch.compile ("_orig_mod."),
# FSDP1 ("_fsdp_wrapped_module.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.")


def hf_name(name: str) -> str:
    """A parameter name without the wrapper prefixes (repeated, in any order)."""
    changed = True
    while changed:
        changed = False
        for p in WRAPPER_PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
        name = name.replace("._fsdp_wrapped_module", "").replace("._checkpoint_wrapped_module", "")
    return name


def trainer_weights(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of a trainer's model (a transformers model, possibly wrapped by DDP /
    torch.compile): its parameters, detached. A PEFT model is refused (merge the adapter into a
    copy first): its names and values are not those of the base model the engine runs."""
    if hasattr(model, "peft_config") or any("lora_" in n for n, _ in model.named_parameters()):
        raise TypeError("sync_weights: the trainer's model is a PEFT/LoRA model; the engine needs "
                        "merged base weights (peft: model.merge_and_unload() on a copy)")
    out = []
    for n, p in model.named_parameters():
        t = p.detach()
        if hasattr(t, "full_tensor"):  # FSDP2 DTensor shard -> the full weight
            t = t.full_tensor()
        out.append((hf_name(n), t))
    return out


def sync_weights(engine, named_tensors: Iterable[tuple[str, torch.Tensor]]
                 | Mapping[str, torch.Tensor] | torch.nn.Module, *, strict: bool = True) -> int:
    """Copies the trainer's weights into engine.model (Engine.update_weights, which also drops
    the engine's cached KV). named_tensors: a model (its parameters) or (HF name, tensor) pairs.
    Every name and shape is checked first: a name the engine's model does not have, a wrong
    shape, a non-floating tensor or (strict) a weight of the engine that is not given raises
    ValueError / TypeError naming them, and nothing is copied. Returns the number of tensors
    copied."""
    if isinstance(named_tensors, torch.nn.Module):
        items = trainer_weights(named_tensors)
    elif isinstance(named_tensors, Mapping):
        items = [(hf_name(str(k)), v) for k, v in named_tensors.items()]
    else:
        items = [(hf_name(str(k)), v) for k, v in named_tensors]
    target_model = getattr(engine, "model", None)
    if target_model is None or not hasattr(target_model, "hf_weight_map"):
        raise TypeError("sync_weights: engine must be an npr.Engine (its model maps HF names)")
    targets = target_model.hf_weight_map()
    tied = getattr(target_model, "lm_head", 0) is None  # tied head: lm_head.weight is the embedding
    unknown = [n for n, _ in items if n not in targets and not (tied and n == "lm_head.weight")]
    if unknown:
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise ValueError(f"sync_weights: {len(unknown)} tensor name(s) are not parameters of the "
                         f"engine's {target_model.config.model_type} model: "
                         f"{', '.join(unknown[:5])}{more}; the trainer's model must be the "
                         f"architecture the engine runs, with HF parameter names "
                         f"(e.g. {next(iter(targets))})")
    for n, t in items:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"sync_weights: {n!r} is a {type(t).__name__}, not a tensor")
        if not t.dtype.is_floating_point:
            raise TypeError(f"sync_weights: {n!r} has dtype {t.dtype}; weights are floating point")
        if n in targets and tuple(t.shape) != tuple(targets[n].shape):
            raise ValueError(f"sync_weights: {n!r} has shape {list(t.shape)}, the engine's model "
                             f"expects {list(targets[n].shape)}")
    given = {n for n, _ in items}
    missing = sorted(set(targets) - given)
    if strict and missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"sync_weights: {len(missing)} weight(s) of the engine's model are not "
                         f"given: {', '.join(missing[:5])}{more}")
    pairs = [(n, t) for n, t in items if n in targets]
    with torch.no_grad():
        engine.update_weights(pairs)
    return len(pairs)
