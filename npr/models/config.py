"""ModelConfig: the one config of the Llama-family decoder (Llama, SmolLM2, Qwen2, Qwen3).

Built from a Hugging Face config.json (transformers 4.x and 5.x layouts) or from GGUF metadata
(npr.models.gguf). Everything the model needs is explicit here; nothing is read from the
checkpoint at run time.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

# HF model_type -> what differs between the families we share one decoder with.
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
# RoPE variants implemented in npr.models.rope (HF names).
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# Upper bound of every size in the config: token ids, positions and row indices are int32 in the
# C++ scheduler and kernels.
MAX_SIZE = 2**31 - 1


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # HF rope parameters without rope_theta, e.g. {"rope_type": "llama3", "factor": 8.0, ...};
    # {"rope_type": "default"} when the model uses plain RoPE.
    rope_scaling: dict[str, Any] = field(default_factory=lambda: {"rope_type": "default"})
    max_position_embeddings: int = 4096
    qkv_bias: bool = False  # Qwen2: q/k/v projections carry a bias
    o_bias: bool = False  # Llama attention_bias=True also biases o_proj
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k before RoPE
    tie_word_embeddings: bool = False
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None  # the checkpoint's storage dtype, informational

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= MAX_SIZE:
                raise ValueError(f"ModelConfig.{name} must be an int in [1, 2**31 - 1], "
                                 f"got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig: num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if not (self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps)):
            raise ValueError(f"ModelConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ValueError(f"ModelConfig.rope_theta must be > 0, got {self.rope_theta}")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"ModelConfig.model_type {self.model_type!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        self.rope_scaling = _validate_rope(dict(self.rope_scaling or {"rope_type": "default"}),
                                           self.max_position_embeddings)

    @property
    def rope_type(self) -> str:
        return self.rope_scaling["rope_type"]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_hf_config(cls, d: dict[str, Any], where: str = "config.json") -> ModelConfig:
        """From the dict of a Hugging Face config.json (LlamaConfig / Qwen2Config / Qwen3Config).
        where: the file's name in error messages."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a JSON object of config fields, got a JSON "
                             f"{_json_kind(d)}")
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{where}: model_type {model_type!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if key not in d:
                raise ValueError(f"{where}: missing required key {key!r}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim",
                    "max_position_embeddings"):
            v = d.get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)
                                  or not 0 < v <= MAX_SIZE):
                raise ValueError(f"{where}: {key} must be an int in [1, 2**31 - 1], got {v!r}")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise NotImplementedError(
                f"{where}: hidden_act {act!r} is not supported (only silu)")
        layer_types = d.get("layer_types") or []
        if d.get("use_sliding_window") and (
                not layer_types or "sliding_attention" in layer_types):
            raise NotImplementedError(f"{where}: sliding-window attention is not supported")
        if "sliding_attention" in layer_types:
            raise NotImplementedError(f"{where}: sliding-window attention is not supported")

        hidden, heads = d["hidden_size"], d["num_attention_heads"]
        head_dim = d.get("head_dim") or (128 if model_type == "qwen3" else hidden // heads)
        attention_bias = bool(d.get("attention_bias", False))
        if model_type == "qwen2":  # Qwen2 always biases q/k/v, never o_proj
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = attention_bias
        max_pos = d.get("max_position_embeddings", 4096 if model_type == "llama" else 32768)
        theta, rope = _rope_from_hf(d, max_pos, where)
        dtype = d.get("dtype") or d.get("torch_dtype")
        kwargs = dict(
            vocab_size=d["vocab_size"], hidden_size=hidden,
            intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
            num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads, head_dim=head_dim,
            rms_norm_eps=_number(d, "rms_norm_eps", 1e-6, where), rope_theta=theta,
            rope_scaling=rope,
            max_position_embeddings=max_pos, qkv_bias=qkv_bias, o_bias=o_bias,
            mlp_bias=bool(d.get("mlp_bias", False)) if model_type == "llama" else False,
            qk_norm=model_type == "qwen3",
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), model_type=model_type,
            bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            torch_dtype=str(dtype).replace("torch.", "") if dtype else None,
        )
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:  # __post_init__'s checks, with the file named
            raise ValueError(f"{where}: {e}") from e
        except NotImplementedError as e:
            raise NotImplementedError(f"{where}: {e}") from e


def _rope_from_hf(d: dict[str, Any], max_pos: int,
                  where: str = "config.json") -> tuple[float, dict[str, Any]]:
    """transformers 5.x keeps rope in config["rope_parameters"] (rope_theta inside); 4.x keeps
    rope_theta at top level and scaling in config["rope_scaling"] ("type" in very old files)."""
    key = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
    params = d.get(key) or {}
    if not isinstance(params, dict):
        raise ValueError(f"{where}: {key} must be a JSON object (or null), got a JSON "
                         f"{_json_kind(params)}: {str(params)[:80]}")
    params = dict(params)
    if params and all(isinstance(v, dict) for v in params.values()):
        raise NotImplementedError(f"{where}: per-layer-type rope parameters are not supported")
    if params.get("rope_theta") is not None:
        theta = _number(params, "rope_theta", None, f"{where}: {key}")
    else:
        theta = _number(d, "rope_theta", 10000.0, where)
    params.pop("rope_theta", None)
    for k, v in params.items():
        if k in _NUMERIC_ROPE_KEYS and v is not None:
            _number(params, k, None, f"{where}: {key}")
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    prf = params.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if prf not in (None, 1, 1.0):
        raise NotImplementedError(f"{where}: partial_rotary_factor={prf} is not supported")
    if rope_type in ("llama3", "yarn") and "original_max_position_embeddings" not in params:
        # HF gives a top-level original_max_position_embeddings priority, else max positions.
        params["original_max_position_embeddings"] = d.get("original_max_position_embeddings",
                                                           max_pos)
    return theta, {"rope_type": rope_type, **params}


_NUMERIC_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                      "original_max_position_embeddings", "beta_fast", "beta_slow",
                      "attention_factor", "mscale", "mscale_all_dim")


def _json_kind(v: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null",
            int: "number", float: "number"}.get(type(v), type(v).__name__)


def _number(d: dict[str, Any], key: str, default: Any, where: str) -> float:
    """d[key] (default when absent or null) as a float; a clear error naming where and key for
    a string, list, bool, NaN or inf."""
    v = d.get(key)
    v = default if v is None else v
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{where}: {key} must be a finite number, got {v!r}")
    return float(v)


_REQUIRED_ROPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
}


def _validate_rope(r: dict[str, Any], max_pos: int) -> dict[str, Any]:
    rope_type = r.get("rope_type", "default")
    if rope_type == "dynamic":
        raise NotImplementedError(
            "rope_type 'dynamic' (dynamic NTK scaling) is not supported: its frequencies depend on "
            "the current sequence length, which a paged multi-row engine does not have")
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"rope_type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    r["rope_type"] = rope_type
    if rope_type == "yarn":
        r.setdefault("original_max_position_embeddings", max_pos)
        if r.get("factor") is None:  # HF: factor defaults to max / original positions
            r["factor"] = max_pos / r["original_max_position_embeddings"]
    for key in _REQUIRED_ROPE_KEYS[rope_type]:
        if r.get(key) is None:
            raise ValueError(f"rope_type {rope_type!r} needs rope parameter {key!r}; got {r}")
    if "factor" in r and not r["factor"] > 0:
        raise ValueError(f"rope parameter factor must be > 0, got {r['factor']}")
    if rope_type == "llama3" and not r["high_freq_factor"] > r["low_freq_factor"]:
        raise ValueError("llama3 rope: high_freq_factor must exceed low_freq_factor")
    return r
