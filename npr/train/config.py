"""Run configuration: TOML files mapping onto validated dataclasses (one per component), with
`section.key=value` overrides from the command line.

    [model]    path, dtype, add_tags, device
    [rollout]  prompts_per_step, samples_per_prompt, temperature, top_p, top_k, max_new_tokens, ...
    [algo]     preset = "papo" | "dapo" | "grpo", then any knob of the preset to override it
    [optim]    optimizer, lr, weight_decay, max_grad_norm, warmup_steps, schedule, ...
    [train]    steps, seed, micro_batch_tokens, out_dir, save_every, resume, ...
    [dist]     backend, strategy
    [reward]   kind, checker, timeout_s            (the generic `python -m npr.train rl` run)
    [data]     path, template, shuffle

Unknown sections or keys and values of the wrong type or range raise ConfigError naming them.
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from npr.train.advantages import SCALES
from npr.train.losses import AGGREGATIONS, PRESETS


class ConfigError(ValueError):
    """A bad configuration: names the section.key and what is wrong."""


def _need(ok: bool, where: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {msg}")


def _choice(v: Any, where: str, choices: Sequence[str]) -> None:
    _need(v in choices, where, f"must be one of {', '.join(map(repr, choices))}, got {v!r}")


@dataclass
class ModelSection:
    path: str = ""               # HF folder or .gguf file
    dtype: str = "float32"
    add_tags: bool = False       # add the eight tags as special tokens (stage 2 and later)
    device: str = "auto"         # auto | cpu | cuda

    def __post_init__(self) -> None:
        _choice(self.dtype, "model.dtype", ("float32", "bfloat16", "float16"))
        _choice(self.device, "model.device", ("auto", "cpu", "cuda"))


@dataclass
class RolloutSection:
    prompts_per_step: int = 8        # global, over all ranks (a multiple of the world size)
    samples_per_prompt: int = 4      # the group size
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 512
    max_branch_tokens: int = 0       # 0: no per-branch cap
    parallel: str = "native"         # native | sequential | off
    max_branches: int = 8
    kv_cache_tokens: int = 16384
    max_rows: int = 256
    decode_weights: str = "auto"     # the Engine's decode_weights
    chat_template: bool = False      # wrap text prompts in the tokenizer's chat template

    def __post_init__(self) -> None:
        for k in ("prompts_per_step", "samples_per_prompt", "max_new_tokens", "max_branches",
                  "kv_cache_tokens", "max_rows"):
            _need(getattr(self, k) >= 1, f"rollout.{k}", f"must be >= 1, got {getattr(self, k)}")
        _need(self.temperature > 0, "rollout.temperature",
              f"must be > 0 for RL (sampled log-probs), got {self.temperature}")
        _need(0 < self.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {self.top_p}")
        _need(self.top_k == -1 or self.top_k >= 1, "rollout.top_k",
              f"must be -1 (off) or >= 1, got {self.top_k}")
        _need(self.max_branch_tokens >= 0, "rollout.max_branch_tokens",
              f"must be >= 0 (0: none), got {self.max_branch_tokens}")
        _choice(self.parallel, "rollout.parallel", ("native", "sequential", "off"))
        _choice(self.decode_weights, "rollout.decode_weights", ("auto", "bf16", "fp16", "plain"))


@dataclass
class AlgoSection:
    """preset fills every knob left at None."""

    preset: str = "papo"
    scale: str | None = None               # batch | group | none (advantage denominator)
    clip: bool | None = None               # ratio clipping on/off
    clip_low: float | None = None          # ratio >= 1 - clip_low
    clip_high: float | None = None         # ratio <= 1 + clip_high
    drop_equal_groups: bool | None = None  # DAPO dynamic sampling (drop + refill)
    aggregation: str | None = None         # token-mean | seq-mean-token-mean
    overlong: bool | None = None           # DAPO soft overlong penalty on the reward
    overlong_cache: int = 0                # its cache length (0: max_new_tokens // 4)
    drop_invalid: bool | None = None       # drop structure-invalid rollouts before statistics
    eps: float = 1e-6
    minibatches: int = 1                   # optimizer steps per rollout batch
    max_refill_rounds: int = 4             # DAPO: extra rollout rounds to refill dropped groups

    def __post_init__(self) -> None:
        _choice(self.preset, "algo.preset", tuple(PRESETS))
        p = PRESETS[self.preset]
        if self.clip is None:
            self.clip = p["clip_low"] is not None
        self.clip_low = self.clip_low if self.clip_low is not None else (p["clip_low"] or 0.2)
        self.clip_high = self.clip_high if self.clip_high is not None else (p["clip_high"] or 0.28)
        for k in ("scale", "drop_equal_groups", "aggregation", "overlong", "drop_invalid"):
            if getattr(self, k) is None:
                setattr(self, k, p[k])
        _choice(self.scale, "algo.scale", SCALES)
        _choice(self.aggregation, "algo.aggregation", AGGREGATIONS)
        _need(0 <= self.clip_low < 1, "algo.clip_low", f"must be in [0, 1), got {self.clip_low}")
        _need(self.clip_high >= 0, "algo.clip_high", f"must be >= 0, got {self.clip_high}")
        _need(self.eps > 0, "algo.eps", f"must be > 0, got {self.eps}")
        _need(self.minibatches >= 1, "algo.minibatches", f"must be >= 1, got {self.minibatches}")
        _need(self.max_refill_rounds >= 0, "algo.max_refill_rounds",
              f"must be >= 0, got {self.max_refill_rounds}")
        _need(self.overlong_cache >= 0, "algo.overlong_cache",
              f"must be >= 0, got {self.overlong_cache}")


@dataclass
class OptimSection:
    optimizer: str = "adamw"      # adamw | sgd
    lr: float = 1e-6
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0    # 0: no clipping
    warmup_steps: int = 0
    schedule: str = "constant"    # constant | linear | cosine (after warmup, to 0 at train.steps)

    def __post_init__(self) -> None:
        _choice(self.optimizer, "optim.optimizer", ("adamw", "sgd"))
        _choice(self.schedule, "optim.schedule", ("constant", "linear", "cosine"))
        _need(self.lr > 0 and math.isfinite(self.lr), "optim.lr", f"must be > 0, got {self.lr}")
        _need(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1/beta2",
              f"must be in [0, 1), got {self.beta1}, {self.beta2}")
        _need(self.eps > 0, "optim.eps", f"must be > 0, got {self.eps}")
        _need(self.max_grad_norm >= 0, "optim.max_grad_norm",
              f"must be >= 0 (0: off), got {self.max_grad_norm}")
        _need(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")


@dataclass
class TrainSection:
    steps: int = 100
    seed: int = 0
    micro_batch_tokens: int = 8192   # tokens per forward/backward (several rollouts per row)
    out_dir: str = "runs/npr"
    save_every: int = 0              # checkpoint every k steps (0: only at the end)
    keep_last: int = 2               # checkpoints kept (older ones deleted)
    resume: bool = True              # continue from out_dir's latest checkpoint when present
    progress: bool = True            # tqdm bar
    plot: bool = True                # PNG of the curves at the end

    def __post_init__(self) -> None:
        for k in ("steps", "micro_batch_tokens", "keep_last"):
            _need(getattr(self, k) >= 1, f"train.{k}", f"must be >= 1, got {getattr(self, k)}")
        _need(self.save_every >= 0, "train.save_every", f"must be >= 0, got {self.save_every}")
        _need(bool(self.out_dir), "train.out_dir", "must not be empty")


@dataclass
class DistSection:
    backend: str = "auto"    # auto | gloo | nccl
    strategy: str = "ddp"    # ddp | fsdp

    def __post_init__(self) -> None:
        _choice(self.backend, "dist.backend", ("auto", "gloo", "nccl"))
        _choice(self.strategy, "dist.strategy", ("ddp", "fsdp"))


@dataclass
class RewardSection:
    kind: str = "stage3"     # stage1 (format penalty, else +-1) | stage3 (+-1)
    checker: str = "exact"   # exact | math (math-verify in a worker process)
    timeout_s: float = 5.0

    def __post_init__(self) -> None:
        _choice(self.kind, "reward.kind", ("stage1", "stage3"))
        _choice(self.checker, "reward.checker", ("exact", "math"))
        _need(self.timeout_s > 0, "reward.timeout_s", f"must be > 0, got {self.timeout_s}")


@dataclass
class DataSection:
    path: str = ""               # JSONL rows {"problem", "answer"}
    template: str = "{problem}"
    shuffle: bool = True

    def __post_init__(self) -> None:
        _need("{problem}" in self.template, "data.template", "must contain {problem}")


@dataclass
class RLConfig:
    stage: str = "rl"
    model: ModelSection = field(default_factory=ModelSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    algo: AlgoSection = field(default_factory=AlgoSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    dist: DistSection = field(default_factory=DistSection)
    reward: RewardSection = field(default_factory=RewardSection)
    data: DataSection = field(default_factory=DataSection)


@dataclass
class SFTConfig:
    stage: str = "sft"
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-5))
    train: TrainSection = field(default_factory=TrainSection)
    dist: DistSection = field(default_factory=DistSection)
    data: DataSection = field(default_factory=DataSection)
    batch_sequences: int = 8     # trajectories per optimizer step (global)
    epochs: int = 1

    def __post_init__(self) -> None:
        _need(self.batch_sequences >= 1, "batch_sequences", f"must be >= 1, got {self.batch_sequences}")
        _need(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")


# ----------------------------------------------------------------------------- loading

C = TypeVar("C")


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """value as the annotated type (int accepted for float; None only where allowed)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    name = getattr(tp, "__name__", str(tp))
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise ConfigError(f"{where}: expected {name}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type[C], d: Mapping[str, Any], where: str = "") -> C:
    """Builds the dataclass cls from a nested dict; unknown keys and bad types raise."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a table, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in d.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"unknown key {path!r} (known: {', '.join(fields)})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, path)
        else:
            kwargs[key] = _check_type(value, tp, path)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if where and not str(e).startswith(where):
            raise ConfigError(f"{where}.{e}") from None
        raise


def _parse_value(text: str) -> Any:
    """A TOML value ("3", "1e-6", "true", '"x"', "[1, 2]"); anything else is a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(d: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """["train.steps=10", "algo.preset=dapo"] -> d updated (a copy)."""
    import copy

    out = copy.deepcopy(d)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: bad key {key!r}")
        node = out
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
            node = nxt
        node[parts[-1]] = _parse_value(text.strip())
    return out


def load_config(cls: type[C], path: str | None = None, overrides: Sequence[str] = (),
                base: Mapping[str, Any] | None = None) -> C:
    """cls (RLConfig, SFTConfig, or a stage's own) from a TOML file (optional), a base dict
    (optional, under the file) and overrides (on top)."""
    d: dict[str, Any] = dict(base or {})
    if path is not None:
        try:
            with open(path, "rb") as f:
                file_d = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path!r} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
        d = _merge(d, file_d)
    return from_dict(cls, apply_overrides(d, overrides))


def _merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
