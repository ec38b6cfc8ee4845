"""Checkpoints whose config claims absurd sizes fail fast, naming the file and the field.

Each file loads in a child process under a memory limit (RLIMIT_AS: what the child has mapped
after importing npr + 1 GiB) and a time limit, so a loader that builds per-layer structures
from the config, or allocates from it, fails the test instead of hanging the suite."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tiny import tiny_model

V = 61
LOAD_S = 10.0  # the load itself (imports excluded) must fail within this
CHILD_TIMEOUT_S = 180  # imports on a loaded machine included

CHILD = textwrap.dedent("""
    import json, resource, signal, sys, time
    import npr
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * resource.getpagesize()
    limit = mapped + (1 << 30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    signal.alarm(int(sys.argv[2]))
    t0 = time.perf_counter()
    try:
        npr.load_model(sys.argv[1])
        out = {"ok": True}
    except BaseException as e:
        out = {"ok": False, "type": type(e).__name__, "msg": str(e)}
    out["s"] = time.perf_counter() - t0
    print("RESULT " + json.dumps(out), flush=True)
""")


def load_in_child(path: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, path, str(int(LOAD_S * 3))],
                          capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"child died (rc {proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def assert_fails_fast(path: str, named: str, *fields: str) -> None:
    """Loading path fails within LOAD_S with a message naming `named` (a file) and fields."""
    r = load_in_child(path)
    assert not r["ok"], "a hostile file loaded"
    assert r["type"] in ("CheckpointError", "ValueError"), r
    assert named in r["msg"], r["msg"]
    for f in fields:
        assert f in r["msg"], r["msg"]
    assert r["s"] < LOAD_S, f"took {r['s']:.1f} s: {r['msg']}"


@pytest.fixture(scope="module")
def model():
    return tiny_model(V, seed=0, layers=2, hidden=32, heads=2, kv_heads=1, head_dim=16)


# --------------------------------------------------------------------------- GGUF

_GGUF_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
               "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf: str) -> str:
    base, suffix = hf.rsplit(".", 1)
    if base == "model.embed_tokens":
        return "token_embd." + suffix
    if base == "model.norm":
        return "output_norm." + suffix
    _, _, i, rest = base.split(".", 3)
    return f"blk.{i}.{_GGUF_LAYER[rest]}.{suffix}"


def write_gguf(path: str, model, **override) -> str:
    """model's weights as an F32 llama GGUF; override: metadata key (without "llama.") -> value,
    written as uint64 when it does not fit uint32."""
    import gguf

    c = model.config
    meta = {"block_count": c.num_layers, "context_length": c.max_position_embeddings,
            "embedding_length": c.hidden_size, "feed_forward_length": c.intermediate_size,
            "attention.head_count": c.num_heads, "attention.head_count_kv": c.num_kv_heads,
            "attention.key_length": c.head_dim, "vocab_size": c.vocab_size, **override}
    w = gguf.GGUFWriter(path, "llama")
    for k, v in meta.items():
        (w.add_uint32 if 0 <= v < 2**32 else w.add_uint64)(f"llama.{k}", v)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    for name, t in model.hf_weight_map().items():
        w.add_tensor(gguf_name(name), t.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_valid_gguf_loads_in_child(model, tmp_path):
    """The control: the same writer's file with honest metadata loads under the same limits."""
    r = load_in_child(write_gguf(str(tmp_path / "honest.gguf"), model))
    assert r["ok"], r


@pytest.mark.parametrize("key,value", [
    ("block_count", 10**6), ("block_count", 2**32 - 1), ("block_count", 2**40),
    ("embedding_length", 2**40), ("feed_forward_length", 10**9), ("vocab_size", 2**31 + 5),
    ("attention.head_count", 2**33), ("context_length", 2**40),
])
def test_hostile_gguf_fails_fast(model, tmp_path, key, value):
    path = write_gguf(str(tmp_path / f"hostile_{key}_{value}.gguf"), model, **{key: value})
    fields = {"feed_forward_length": ("mlp",)}.get(key, (f"llama.{key}",))
    assert_fails_fast(path, path, *fields)


# --------------------------------------------------------------------------- HF folders

def write_hf(folder: str, model, **override) -> str:
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    c = model.config
    cfg = {"model_type": "llama", "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
           "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
           "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
           "head_dim": c.head_dim, "max_position_embeddings": c.max_position_embeddings,
           "tie_word_embeddings": True, **override}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    save_file({n: t.contiguous() for n, t in model.hf_weight_map().items()},
              os.path.join(folder, "model.safetensors"))
    return folder


def test_valid_hf_folder_loads_in_child(model, tmp_path):
    r = load_in_child(write_hf(str(tmp_path / "honest"), model))
    assert r["ok"], r


@pytest.mark.parametrize("key,value", [
    ("num_hidden_layers", 10**9), ("num_hidden_layers", 10**30), ("num_hidden_layers", 3),
    ("num_hidden_layers", "2"), ("num_hidden_layers", 2.0), ("hidden_size", 10**9),
    ("intermediate_size", 2**31 - 1), ("vocab_size", 2**31), ("num_attention_heads", 2**40),
    ("max_position_embeddings", 10**12),
])
def test_hostile_config_json_fails_fast(model, tmp_path, key, value):
    folder = write_hf(str(tmp_path / "hostile"), model, **{key: value})
    if key in ("hidden_size", "intermediate_size"):  # within bounds: the tensor shapes differ
        assert_fails_fast(folder, folder, "shape", "mlp" if key == "intermediate_size" else "")
    else:
        assert_fails_fast(folder, os.path.join(folder, "config.json"), key)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("tied,bias", [(True, False), (False, True)])
def test_expected_hf_shapes_equal_the_models_weight_map(model_type, tied, bias):
    """expected_hf_shapes is arithmetic on the config (no model built): it must still name
    exactly the tensors of the model's hf_weight_map, with their shapes."""
    from npr.models.config import ModelConfig
    from npr.models.llama import LlamaDecoder

    cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=3,
                      num_heads=4, num_kv_heads=2, head_dim=6, model_type=model_type,
                      tie_word_embeddings=tied, qkv_bias=bias, o_bias=bias, mlp_bias=bias,
                      qk_norm=model_type == "qwen3")
    meta = LlamaDecoder(cfg, device="meta")
    want = {n: tuple(t.shape) for n, t in meta.hf_weight_map().items()}
    assert LlamaDecoder.expected_hf_shapes(cfg) == want


# --------------------------------------------------------------------------- corrupt files

def write_gguf_with_tokenizer(path: str, model) -> str:
    """write_gguf plus a small gpt2-style tokenizer in the metadata (what load_tokenizer reads)."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(path, "llama")
    for k, v in {"block_count": c.num_layers, "context_length": c.max_position_embeddings,
                 "embedding_length": c.hidden_size, "feed_forward_length": c.intermediate_size,
                 "attention.head_count": c.num_heads, "attention.head_count_kv": c.num_kv_heads,
                 "attention.key_length": c.head_dim, "vocab_size": c.vocab_size}.items():
        w.add_uint32(f"llama.{k}", v)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    letters = [chr(ord("a") + i) for i in range(26)]
    toks = ["<s>", "</s>", "<unk>"] + letters + ["ab", "abc"]
    toks += [f"t{i}" for i in range(c.vocab_size - len(toks))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(toks)
    w.add_token_types([3, 3, 2] + [1] * (len(toks) - 3))
    w.add_token_merges(["a b", "ab c"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    for name, t in model.hf_weight_map().items():
        w.add_tensor(gguf_name(name), t.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _corruptions(path: str) -> dict[str, bytes]:
    """Seven truncations / corruptions of a GGUF file's bytes (header, metadata, tensor infos,
    tensor data), plus absurd lengths and counts."""
    import struct

    from gguf import GGUFReader

    r = GGUFReader(path)
    data = open(path, "rb").read()
    tok, arch = r.fields["tokenizer.ggml.tokens"], r.fields["general.architecture"]
    count_at = tok.offset + 8 + len(b"tokenizer.ggml.tokens") + 4 + 4  # the array's length
    assert struct.unpack("<Q", data[count_at:count_at + 8])[0] == V
    word = data.index(b"abc", tok.offset)
    name = data.index(b"llama", arch.offset)
    return {
        "cut_in_magic": data[:3],
        "cut_in_counts": data[:10],
        "cut_in_metadata": data[:tok.offset + 20],
        "cut_in_tensor_infos": data[:r.data_offset - 40],
        "cut_in_tensor_data": data[:-100],
        "token_not_utf8": data[:word] + b"\xff\xfe\xfd" + data[word + 3:],
        "architecture_not_utf8": data[:name] + b"\xffl\xfe" + data[name + 3:],
        "key_length_2_60": data[:arch.offset] + struct.pack("<Q", 2**60) + data[arch.offset + 8:],
        "token_count_2_40": data[:count_at] + struct.pack("<Q", 2**40) + data[count_at + 8:],
    }


CORRUPTIONS = ["cut_in_magic", "cut_in_counts", "cut_in_metadata", "cut_in_tensor_infos",
               "cut_in_tensor_data", "token_not_utf8", "architecture_not_utf8",
               "key_length_2_60", "token_count_2_40"]


@pytest.fixture(scope="module")
def tokenizer_gguf(model, tmp_path_factory):
    return write_gguf_with_tokenizer(str(tmp_path_factory.mktemp("tok") / "tok.gguf"), model)


def test_gguf_tokenizer_control_loads(tokenizer_gguf):
    import npr

    tok = npr.load_tokenizer(tokenizer_gguf)
    assert tok.encode("abc", add_special_tokens=False) == [30]


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_corrupt_gguf_errors_name_the_file(tokenizer_gguf, tmp_path, case):
    """load_tokenizer (transformers parses the metadata) and load_model raise a ValueError that
    names the file, never a raw struct.error / UnicodeDecodeError / IndexError."""
    import npr

    path = str(tmp_path / f"{case}.gguf")
    with open(path, "wb") as f:
        f.write(_corruptions(tokenizer_gguf)[case])
    with pytest.raises(ValueError) as e:
        npr.load_tokenizer(path)
    assert path in str(e.value)
    if case == "token_not_utf8":  # the model does not read the vocabulary's strings
        assert npr.load_model(path).config.num_layers == 2
        return
    with pytest.raises(ValueError) as e:
        npr.load_model(path)
    assert path in str(e.value)


BAD_CONFIGS = {
    "a_list": ("[1, 2]", "JSON object"),
    "invalid_json": ('{"model_type": "llama",', "not valid JSON"),
    "not_utf8": (b'{"model_type": "ll\xffama"}', "not valid JSON"),
    "rope_parameters_list": ({"rope_parameters": [{"rope_type": "linear"}]}, "rope_parameters"),
    "rope_scaling_string": ({"rope_scaling": "linear"}, "rope_scaling"),
    "rope_theta_string": ({"rope_parameters": {"rope_type": "default", "rope_theta": "1e4"}},
                          "rope_theta"),
    "rope_factor_list": ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4,
                                              "factor": [2]}}, "factor"),
    "rms_norm_eps_string": ({"rms_norm_eps": "1e-6"}, "rms_norm_eps"),
    "rms_norm_eps_nan": ('NAN', "rms_norm_eps"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_json_errors_name_the_file_and_field(model, tmp_path, case):
    import npr

    folder = write_hf(str(tmp_path / "ckpt"), model)
    cfg_path = os.path.join(folder, "config.json")
    content, field = BAD_CONFIGS[case]
    if isinstance(content, dict):
        cfg = json.load(open(cfg_path))
        cfg.update(content)
        content = json.dumps(cfg)
    elif content == "NAN":
        content = open(cfg_path).read().replace('"tie_word_embeddings"', '"rms_norm_eps": NaN, '
                                                '"tie_word_embeddings"')
    with open(cfg_path, "wb") as f:
        f.write(content.encode() if isinstance(content, str) else content)
    with pytest.raises(ValueError) as e:
        npr.load_model(folder)
    assert cfg_path in str(e.value) and field in str(e.value), str(e.value)


def _write_index(folder: str, model, shard: object) -> None:
    names = [n for n in model.hf_weight_map()]
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {n: shard for n in names}}, f)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "sub/../../outside.safetensors",
                                   "ABS", 7, "model.bin"])
def test_shard_index_cannot_name_files_outside_the_folder(model, tmp_path, shard):
    import npr
    from npr.models.loader import CheckpointError

    from safetensors.torch import save_file

    outside = str(tmp_path / "outside.safetensors")
    save_file({n: t.contiguous() for n, t in model.hf_weight_map().items()}, outside)
    folder = str(tmp_path / "ckpt")
    write_hf(folder, model)
    os.remove(os.path.join(folder, "model.safetensors"))
    _write_index(folder, model, outside if shard == "ABS" else shard)
    with pytest.raises(CheckpointError, match="model.safetensors.index.json") as e:
        npr.load_model(folder)
    assert "outside the checkpoint folder" in str(e.value) or "file names" in str(e.value)


def test_shard_index_inside_the_folder_loads(model, tmp_path):
    import npr

    folder = write_hf(str(tmp_path / "ckpt"), model)
    os.makedirs(os.path.join(folder, "shards"))
    os.rename(os.path.join(folder, "model.safetensors"),
              os.path.join(folder, "shards", "model-00001-of-00001.safetensors"))
    _write_index(folder, model, "shards/./model-00001-of-00001.safetensors")
    loaded = npr.load_model(folder)
    assert torch_equal_weights(loaded, model)


def test_bad_shard_index_json_names_the_file(model, tmp_path):
    import npr

    folder = write_hf(str(tmp_path / "ckpt"), model)
    index = os.path.join(folder, "model.safetensors.index.json")
    for content in ("[1]", "{not json"):
        with open(index, "w") as f:
            f.write(content)
        with pytest.raises(ValueError, match=index.replace(".", r"\.")):
            npr.load_model(folder)


def torch_equal_weights(a, b) -> bool:
    import torch

    wa, wb = a.hf_weight_map(), b.hf_weight_map()
    return wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa)


def test_load_tokenizer_of_a_folder_without_one_names_the_folders_that_have_one(tmp_path):
    import npr
    from npr.models.loader import CheckpointError
    from npr.tasks.tokenizer import build_tokenizer

    build_tokenizer().save_pretrained(str(tmp_path / "stage" / "model"))
    assert len(npr.load_tokenizer(tmp_path / "stage" / "model")) > 0
    with pytest.raises(CheckpointError, match=r"no tokenizer in this folder.*\['model'\]"):
        npr.load_tokenizer(tmp_path / "stage")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty: no tokenizer in this folder \(tokenizer.json"):
        npr.load_tokenizer(tmp_path / "empty")
