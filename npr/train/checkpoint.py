"""Checkpoints: the model as an HF folder (config.json + model.safetensors + tokenizer files, tag
tokens included) that transformers and npr.load_model both load, plus what a resumed run needs:
optimizer, scheduler, RNG states (per rank), data cursor, step and stage.

    OUT_DIR/checkpoints/step-000012/   config.json, model.safetensors, tokenizer files,
                                       trainer_state.json, optimizer.pt, scheduler.pt,
                                       rng.rank0.pt, rng.rank1.pt, ...
    OUT_DIR/checkpoints/latest         the name of the newest complete checkpoint

A checkpoint is written under a temporary name and renamed when complete, so `latest` never
points at a partial one. The .pt files hold tensors and plain containers only and are read with
torch.load(weights_only=True): loading never runs code from a file.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from typing import Any

import torch
from torch import nn

from npr.models.config import ModelConfig
from npr.train.dist import DistContext

STATE_FILE = "trainer_state.json"
_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_FINGERPRINT = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
                "num_heads", "num_kv_heads", "head_dim", "tie_word_embeddings")


class CheckpointMismatch(ValueError):
    """A checkpoint that does not belong to this run's model (or is not a trainer checkpoint)."""


def hf_config_dict(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """A transformers config.json (4.x and 5.x keys) for the npr ModelConfig."""
    scaling = {k: v for k, v in cfg.rope_scaling.items()}
    d: dict[str, Any] = {
        "architectures": [_ARCH[cfg.model_type]], "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if scaling.get("rope_type") == "default" else scaling,
        "rope_parameters": {**scaling, "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": str(dtype).replace("torch.", ""),
    }
    if cfg.model_type == "llama":
        d["attention_bias"] = cfg.qkv_bias
        d["mlp_bias"] = cfg.mlp_bias
    return d


def save_model(folder: str, model: nn.Module, tokenizer: Any = None) -> None:
    """An HF folder of an npr LlamaDecoder: config.json, model.safetensors (HF names; a tied
    head is not stored), the tokenizer's files."""
    from safetensors.torch import save_file

    from npr.models.rope import rope_inv_freq

    want, _ = rope_inv_freq(model.config)
    if not torch.allclose(model.inv_freq.cpu(), want.cpu()):
        raise NotImplementedError("save_model: this model's RoPE frequencies were rescaled by its "
                                  "GGUF file (rope_freqs), which config.json cannot express")
    os.makedirs(folder, exist_ok=True)
    tensors = {n: t.detach().to("cpu").contiguous().clone() for n, t in model.hf_weight_map().items()}
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config_dict(model.config, model.dtype), f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def fingerprint(model: nn.Module) -> dict[str, Any]:
    return {k: getattr(model.config, k) for k in _FINGERPRINT}


def checkpoint_root(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


def latest_checkpoint(out_dir: str) -> str | None:
    """The newest complete checkpoint folder under out_dir, or None."""
    root = checkpoint_root(out_dir)
    try:
        with open(os.path.join(root, "latest")) as f:
            name = f.read().strip()
    except FileNotFoundError:
        return None
    path = os.path.join(root, name)
    return path if os.path.isfile(os.path.join(path, STATE_FILE)) else None


def _rng_state() -> dict[str, Any]:
    st: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    v, inner, gauss = st["python"]
    random.setstate((v, tuple(inner), gauss))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(out_dir: str, step: int, *, model: nn.Module, tokenizer: Any,
                    optimizer: torch.optim.Optimizer, scheduler: Any, state: dict[str, Any],
                    ctx: DistContext, sharded_optimizer: bool = False,
                    keep_last: int = 2) -> str:
    """Every rank calls it. model: the full (unsharded) module to export (rank 0 writes it).
    state: JSON-able trainer state (cursor, stage, config...). Returns the folder."""
    root = checkpoint_root(out_dir)
    name = f"step-{step:06d}"
    final, tmp = os.path.join(root, name), os.path.join(root, name + ".tmp")
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_model(tmp, model, tokenizer)
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        if not sharded_optimizer:
            torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        full = {**state, "step": step, "world_size": ctx.world_size,
                "sharded_optimizer": sharded_optimizer, "model": fingerprint(model)}
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump(full, f, indent=2)
    ctx.barrier()
    torch.save(_rng_state(), os.path.join(tmp, f"rng.rank{ctx.rank}.pt"))
    if sharded_optimizer:
        torch.save(optimizer.state_dict(), os.path.join(tmp, f"optimizer.rank{ctx.rank}.pt"))
    ctx.barrier()
    if ctx.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(root, "latest.tmp"), "w") as f:
            f.write(name)
        os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
        done = sorted(d for d in os.listdir(root) if d.startswith("step-") and not d.endswith(".tmp"))
        for old in done[:-keep_last]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    ctx.barrier()
    return final


def read_state(path: str) -> dict[str, Any]:
    f = os.path.join(path, STATE_FILE)
    if not os.path.isfile(f):
        raise CheckpointMismatch(f"{path}: not a trainer checkpoint (no {STATE_FILE})")
    with open(f) as fh:
        return json.load(fh)


def check_compatible(path: str, model: nn.Module, state: dict[str, Any], ctx: DistContext,
                     stage: str | None = None) -> None:
    """Raises CheckpointMismatch naming what differs between the checkpoint and this run."""
    have = fingerprint(model)
    want = state.get("model", {})
    diff = [f"{k}={want.get(k)!r} (this run's model: {have[k]!r})" for k in have
            if want.get(k) != have[k]]
    if diff:
        raise CheckpointMismatch(f"{path}: the checkpoint is of another model: " + ", ".join(diff))
    if stage is not None and state.get("stage") not in (None, stage):
        raise CheckpointMismatch(f"{path}: the checkpoint is of stage {state.get('stage')!r}, "
                                 f"this run is stage {stage!r}")
    if state.get("sharded_optimizer") and state.get("world_size") != ctx.world_size:
        raise CheckpointMismatch(f"{path}: sharded optimizer state written by "
                                 f"{state.get('world_size')} ranks, this run has {ctx.world_size}")


def load_weights(path: str, model: nn.Module, ctx: DistContext,
                 stage: str | None = None) -> dict[str, Any]:
    """Checks the checkpoint against this run's (unwrapped, unsharded) model, copies its weights
    in and returns the trainer state. Call before wrapping the model for DDP/FSDP."""
    from safetensors import safe_open

    state = read_state(path)
    check_compatible(path, model, state, ctx, stage)
    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        model.load_hf_state_dict(((n, f.get_tensor(n)) for n in f.keys()), strict=True)
    return state


def load_training_state(path: str, state: dict[str, Any], *, optimizer: torch.optim.Optimizer,
                        scheduler: Any, ctx: DistContext) -> None:
    """Restores optimizer, scheduler and this rank's RNG states (after load_weights)."""
    opt = (f"optimizer.rank{ctx.rank}.pt" if state.get("sharded_optimizer") else "optimizer.pt")
    optimizer.load_state_dict(torch.load(os.path.join(path, opt), weights_only=True))
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=True))
    rng = os.path.join(path, f"rng.rank{ctx.rank}.pt")
    if os.path.isfile(rng):
        _set_rng_state(torch.load(rng, weights_only=True))
