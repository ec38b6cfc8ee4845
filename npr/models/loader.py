"""npr.load_model / npr.load_tokenizer: Hugging Face folders (safetensors) and GGUF files.

Loading never runs code from a checkpoint: only safetensors and GGUF are read; pickle-based
files (pytorch_model.bin, *.pt, ...) are refused. Every tensor name and shape in the file headers
is checked against the config before the model is allocated. Nothing touches the network.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from npr.models.config import ModelConfig
from npr.models.llama import IGNORED_SUFFIXES, LlamaDecoder

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_SAFETENSORS_DTYPES = {"F64", "F32", "F16", "BF16"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded safely or does not match its config."""


def _refuse_pickle(path: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: pickle-based checkpoints are refused (unpickling can run arbitrary code). "
        "Convert it to safetensors (transformers: model.save_pretrained(dir, "
        "safe_serialization=True)) or GGUF, then load that.")


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device,
                   ckpt: str | None) -> torch.dtype:
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.replace("torch.", ""), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        dtype = resolved
    if dtype is not None:
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point type, got {dtype}")
        return dtype
    if device.type == "cpu":
        return torch.float32  # this CPU computes bf16/fp16 GEMMs ~35x slower than fp32
    if ckpt in ("bfloat16", "float16"):
        return getattr(torch, ckpt)
    return torch.bfloat16


def load_model(path: str | os.PathLike, dtype: torch.dtype | str | None = None,
               device: str | torch.device = "cpu") -> LlamaDecoder:
    """Load a Llama/SmolLM2/Qwen2/Qwen3 model from a HF folder (config.json + *.safetensors,
    sharded or not) or a .gguf file. dtype None: fp32 on CPU, the checkpoint's half type (else
    bf16) on accelerators. Returns the model in eval mode."""
    path = os.fspath(path)
    device = torch.device(device)
    if os.path.isdir(path):
        model = _load_hf_folder(path, dtype, device)
    elif path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such GGUF file")
        model = _load_gguf(path, dtype, device)
    elif path.endswith(PICKLE_SUFFIXES):
        raise _refuse_pickle(path)
    elif not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such folder or .gguf file")
    else:
        raise CheckpointError(f"{path}: expected a Hugging Face folder or a .gguf file")
    return model.eval()


# --- Hugging Face folders -------------------------------------------------------------------

def _safetensors_files(folder: str) -> tuple[list[str], dict[str, str] | None]:
    """-> (weight files, {tensor name: file} from the shard index or None when unsharded)."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        doc = _read_json(index)
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no weight_map")
        weight_map = {name: _shard_path(folder, index, file) for name, file in weight_map.items()}
        for file in set(weight_map.values()):
            if not os.path.isfile(file):
                raise CheckpointError(f"{index}: shard {os.path.basename(file)!r} is missing")
        return sorted(set(weight_map.values())), weight_map
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        pickles = sorted(f for f in os.listdir(folder) if f.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise _refuse_pickle(os.path.join(folder, pickles[0]))
        raise CheckpointError(f"{folder}: no *.safetensors weights found")
    return [os.path.join(folder, f) for f in files], None


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def _shard_path(folder: str, index: str, file: Any) -> str:
    """A shard named by the index, as a path inside folder; names that leave it (absolute,
    '..') are refused: an index must not make the loader read files elsewhere."""
    if not isinstance(file, str) or not file.endswith(".safetensors"):
        raise CheckpointError(f"{index}: shard names must be *.safetensors file names, "
                              f"got {file!r}")
    path = os.path.normpath(os.path.join(folder, file))
    rel = os.path.relpath(path, os.path.normpath(folder))
    if os.path.isabs(file) or rel == os.pardir or rel.startswith(os.pardir + os.sep):
        raise CheckpointError(f"{index}: shard {file!r} is outside the checkpoint folder "
                              f"{folder}; refused")
    return path


def _read_headers(folder: str) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """-> {tensor name: (file, shape, dtype)} read from safetensors headers (no tensor data)."""
    from safetensors import safe_open

    files, index = _safetensors_files(folder)
    out: dict[str, tuple[str, tuple[int, ...], str]] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                entries = []
                for n in f.keys():
                    sl = f.get_slice(n)
                    entries.append((n, tuple(int(s) for s in sl.get_shape()), sl.get_dtype()))
        except Exception as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from e
        for name, shape, dt in entries:
            if name in out:
                raise CheckpointError(f"tensor {name!r} appears in both {out[name][0]} and {file}")
            out[name] = (file, shape, dt)
    if index is not None:
        for name, file in index.items():
            if name not in out or out[name][0] != file:
                raise CheckpointError(f"tensor {name!r} is listed in the shard index under "
                                      f"{os.path.basename(file)} but is not in that file")
    return out


_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.")


def _check_layer_count(names: Iterable[str], cfg: ModelConfig, where: str, field: str) -> None:
    """The config's layer count must be the file's, checked from tensor names before anything
    per layer is built: a config claiming 10**9 layers fails here, at once."""
    layers = {int(m.group(1)) for n in names if (m := _LAYER_NAME.match(n))}
    have = max(layers) + 1 if layers else 0
    if cfg.num_layers != have:
        held = f"layers 0..{have - 1}" if layers else "no layer"
        raise CheckpointError(f"{where}: {field} = {cfg.num_layers}, but the weights hold "
                              f"tensors of {held}")


def _check_against_config(shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
                          tied: bool, where: str) -> None:
    for name, shape in shapes.items():
        if name.endswith(IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        if name not in expected:
            raise CheckpointError(f"{where}: unexpected tensor {name!r} (not a parameter of the "
                                  "model its config describes)")
        if tuple(shape) != expected[name]:
            raise CheckpointError(f"{where}: tensor {name!r} has shape {list(shape)}, the config "
                                  f"expects {list(expected[name])}")
    missing = sorted(set(expected) - set(shapes))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{where}: missing tensor(s) {', '.join(missing[:5])}{more}")


def read_hf_config(folder: str) -> ModelConfig:
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{folder}: no config.json")
    return ModelConfig.from_hf_config(_read_json(cfg_path), where=cfg_path)


def _load_hf_folder(folder: str, dtype: Any, device: torch.device) -> LlamaDecoder:
    from safetensors import safe_open

    cfg = read_hf_config(folder)
    headers = _read_headers(folder)
    for name, (file, _, st_dtype) in headers.items():
        if st_dtype not in _SAFETENSORS_DTYPES and not name.endswith(IGNORED_SUFFIXES):
            raise CheckpointError(
                f"{file}: tensor {name!r} has dtype {st_dtype}, expected a float type")
    _check_layer_count(headers, cfg, os.path.join(folder, "config.json"), "num_hidden_layers")
    _check_against_config({n: h[1] for n, h in headers.items()},
                          LlamaDecoder.expected_hf_shapes(cfg), cfg.tie_word_embeddings, folder)
    model = LlamaDecoder(cfg, dtype=_resolve_dtype(dtype, device, cfg.torch_dtype), device=device)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for file in sorted({h[0] for h in headers.values()}):
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)

    model.load_hf_state_dict(tensors(), strict=True)
    return model


# --- GGUF -----------------------------------------------------------------------------------

def _load_gguf(path: str, dtype: Any, device: torch.device) -> LlamaDecoder:
    from npr.models import gguf as g

    reader = g.open_reader(path)
    cfg = g.config_from_gguf(reader, path)
    shapes: dict[str, tuple[int, ...]] = {}
    for gname, shape in g.tensor_shapes(reader).items():
        if gname == g.ROPE_FREQS:
            continue
        name = g.hf_name(gname)
        if name is None:
            raise CheckpointError(f"{path}: unexpected GGUF tensor {gname!r}")
        shapes[name] = shape
    _check_layer_count(shapes, cfg, path, f"GGUF metadata {cfg.model_type}.block_count")
    _check_against_config(shapes, LlamaDecoder.expected_hf_shapes(cfg),
                          cfg.tie_word_embeddings, path)
    model = LlamaDecoder(cfg, dtype=_resolve_dtype(dtype, device, None), device=device)
    model.load_hf_state_dict(g.iter_tensors(reader, cfg), strict=True)
    factors = g.rope_freq_factors(reader)
    if factors is not None:
        if factors.shape != model.inv_freq.shape:
            raise CheckpointError(f"{path}: {g.ROPE_FREQS} has shape {list(factors.shape)}, "
                                  f"expected {list(model.inv_freq.shape)}")
        model.inv_freq = model.inv_freq / factors.to(model.inv_freq.device)
    return model


# --- tokenizers -----------------------------------------------------------------------------

def load_tokenizer(path: str | os.PathLike) -> Any:
    """HF folder -> AutoTokenizer.from_pretrained(folder); .gguf -> the tokenizer transformers
    builds from the file's metadata. Offline only."""
    from transformers import AutoTokenizer

    path = os.fspath(path)
    if os.path.isdir(path):
        try:
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:  # no tokenizer files here: transformers' long message
            below = sorted(os.path.relpath(root, path) for root, _, files in os.walk(path)
                           if root != path and {"tokenizer.json", "tokenizer_config.json"} & set(files))
            hint = f"; folders below it that hold one: {below[:5]}" if below else ""
            raise CheckpointError(f"{path}: no tokenizer in this folder (tokenizer.json / "
                                  f"tokenizer_config.json){hint}") from e
    if path.endswith(".gguf") and os.path.isfile(path):
        from npr.models.gguf import open_reader

        open_reader(path)  # a truncated or corrupt file: an error naming it
        folder, name = os.path.split(os.path.abspath(path))
        try:
            return AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        except Exception as e:  # transformers' GGUF parser: raw struct / Unicode errors
            raise CheckpointError(f"{path}: cannot build a tokenizer from this GGUF file's "
                                  f"metadata ({type(e).__name__}: {e})") from e
    raise FileNotFoundError(f"{path}: expected a Hugging Face folder or an existing .gguf file")
