"""Llama-family decoder (Llama, SmolLM2, Qwen2, Qwen3) and its loaders.

    ModelConfig                      config dataclass (from config.json or GGUF metadata)
    LlamaDecoder                     the model: forward (reference), forward_flat (engine)
    DenseAttention(mask)             reference implementation of forward_flat's attention protocol
    load_model(path, dtype, device)  HF safetensors folder or .gguf file
    load_tokenizer(path)
"""
from npr.models.attention import DenseAttention, FlatAttention
from npr.models.config import ModelConfig
from npr.models.llama import LlamaDecoder
from npr.models.loader import CheckpointError, load_model, load_tokenizer

__all__ = ["CheckpointError", "DenseAttention", "FlatAttention", "LlamaDecoder", "ModelConfig",
           "load_model", "load_tokenizer"]
