"""The Llama-family decoder against transformers on tiny random models, the engine path
(forward_flat) against the reference path, and the loader's refusals."""
from __future__ import annotations

import json
import os
import random

import pytest
import torch

import npr
from npr.models.attention import DenseAttention
from npr.models.config import ModelConfig
from npr.models.loader import CheckpointError

transformers = pytest.importorskip("transformers")

V = 160
BASE = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-6)
ROPE = {"rope_type": "default", "rope_theta": 10000.0}

# name -> (HF config class, model class, config overrides, save kwargs)
CASES = {
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True), {}),
    "llama_untied_bias_sharded": (
        "LlamaConfig", "LlamaForCausalLM",
        dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True),
        dict(max_shard_size="60KB")),
    "llama_rope_linear": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_parameters={**ROPE, "rope_type": "linear", "factor": 2.0}), {}),
    "llama_rope_llama3": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters={
        **ROPE, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}), {}),
    "llama_rope_yarn": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters={
        **ROPE, "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}), {}),
    "qwen2_bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False), {}),
    "qwen3_head_dim": ("Qwen3Config", "Qwen3ForCausalLM",
                       dict(head_dim=24, num_key_value_heads=1, tie_word_embeddings=True), {}),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights far from HF's init (norm weights 1, tiny matrices) so that a swapped or
    mis-sliced tensor changes the logits visibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            r = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * r)
            elif name.endswith("bias"):
                p.copy_(0.3 * r)
            elif "embed_tokens" in name:
                p.copy_(r)
            else:
                p.copy_(r * 1.5 / p.shape[-1] ** 0.5)


def _make_hf(case: str, seed: int) -> torch.nn.Module:
    cfg_cls, model_cls, over, _ = CASES[case]
    cfg = getattr(transformers, cfg_cls)(**{**BASE, "rope_parameters": dict(ROPE), **over})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    _randomize(model, seed)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[torch.nn.Module, str]]:
    """Every case built once per module run (fresh seed per run), saved as safetensors."""
    out = {}
    base_seed = random.SystemRandom().randrange(2**31)
    for i, (case, (_, _, _, save_kw)) in enumerate(CASES.items()):
        hf = _make_hf(case, base_seed + i)
        folder = str(tmp_path_factory.mktemp(case))
        hf.save_pretrained(folder, **save_kw)
        out[case] = (hf, folder)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def npr_layout(prefix: int, steps: tuple[int, ...],
               takeaway: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hand-built spec §2 layout: prefix (ending with the guideline), sibling steps that all
    start at p+1 and never see each other, takeaway at p + max L_k + 1.
    -> position_ids [L], mask bool [L, L]."""
    pos = list(range(prefix))
    group = [0] * prefix
    p = pos[-1]
    for k, n in enumerate(steps, 1):
        pos += [p + 1 + j for j in range(n)]
        group += [k] * n
    pos += [p + max(steps) + 1 + j for j in range(takeaway)]
    group += [0] * takeaway
    L, g = len(pos), torch.tensor(group)
    siblings = (g[:, None] > 0) & (g[None, :] > 0) & (g[:, None] != g[None, :])
    mask = torch.ones(L, L, dtype=torch.bool).tril() & ~siblings
    return torch.tensor(pos), mask


@pytest.mark.parametrize("case", list(CASES))
def test_causal_logits_match_transformers(saved, case):
    hf, folder = saved[case]
    model = npr.load_model(folder)
    g = torch.Generator().manual_seed(random.SystemRandom().randrange(2**31))
    ids = torch.randint(0, V, (2, 23), generator=g)
    with torch.inference_mode():
        ours, ref = model(ids), hf(ids).logits
    assert ours.dtype == torch.float32 and ours.shape == (2, 23, V)
    assert rel_err(ours, ref) <= 1e-4


@pytest.mark.parametrize("case", list(CASES))
def test_npr_mask_and_positions_match_transformers(saved, case):
    hf, folder = saved[case]
    model = npr.load_model(folder)
    pos_a, mask_a = npr_layout(6, (3, 5, 2), 4)
    pos_b, mask_b = npr_layout(6, (4, 3, 3), 4)  # same length, different layout
    pos, mask = torch.stack([pos_a, pos_b]), torch.stack([mask_a, mask_b])
    g = torch.Generator().manual_seed(random.SystemRandom().randrange(2**31))
    ids = torch.randint(0, V, (2, pos.shape[1]), generator=g)
    with torch.inference_mode():
        ours = model(ids, position_ids=pos, attention_mask=mask)
        # transformers 5.x takes a prepared 4-D mask [B, 1, L, L] as is (bool for SDPA)
        ref = hf(ids, attention_mask=mask[:, None], position_ids=pos).logits
        causal = model(ids)
    assert rel_err(ours, ref) <= 1e-4
    assert rel_err(causal, ref) > 1e-2  # the layout really changes the result


@pytest.mark.parametrize("case", ["llama_untied_bias_sharded", "qwen3_head_dim"])
def test_forward_flat_matches_forward(saved, case):
    _, folder = saved[case]
    model = npr.load_model(folder)
    pos_a, mask_a = npr_layout(5, (3, 4), 3)
    pos_b, mask_b = npr_layout(4, (2, 2, 3), 4)
    La, Lb = len(pos_a), len(pos_b)
    g = torch.Generator().manual_seed(random.SystemRandom().randrange(2**31))
    ids_a, ids_b = torch.randint(0, V, (La,), generator=g), torch.randint(0, V, (Lb,), generator=g)
    flat_mask = torch.zeros(La + Lb, La + Lb, dtype=torch.bool)  # two rows never see each other
    flat_mask[:La, :La], flat_mask[La:, La:] = mask_a, mask_b

    seen = []

    class Recording(DenseAttention):
        def __call__(self, layer_idx, q, k, v):
            seen.append((layer_idx, tuple(q.shape), tuple(k.shape), tuple(v.shape)))
            return super().__call__(layer_idx, q, k, v)

    with torch.inference_mode():
        ref_a = model(ids_a[None], pos_a[None], mask_a[None])[0]
        ref_b = model(ids_b[None], pos_b[None], mask_b[None])[0]
        flat = model.forward_flat(torch.cat([ids_a, ids_b]), torch.cat([pos_a, pos_b]),
                                  Recording(flat_mask))
        pick = torch.tensor([La - 1, La + 2, La + Lb - 1, 0])
        picked = model.forward_flat(torch.cat([ids_a, ids_b]), torch.cat([pos_a, pos_b]),
                                    DenseAttention(flat_mask), logits_indices=pick)
    ref = torch.cat([ref_a, ref_b])
    assert rel_err(flat, ref) <= 1e-5
    assert picked.shape == (4, model.config.vocab_size)
    assert rel_err(picked, ref[pick]) <= 1e-5
    T, cfg = La + Lb, model.config
    assert seen == [(i, (T, cfg.num_heads, cfg.head_dim), (T, cfg.num_kv_heads, cfg.head_dim),
                     (T, cfg.num_kv_heads, cfg.head_dim)) for i in range(cfg.num_layers)]
    assert (model.num_layers, model.num_kv_heads, model.head_dim, model.dtype) == (
        cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, torch.float32)


def test_load_hf_state_dict_pushes_trainer_weights(saved):
    hf, folder = saved["qwen2_bias"]
    model = npr.load_model(folder)
    hf2 = _make_hf("qwen2_bias", seed=random.SystemRandom().randrange(2**31))
    ids = torch.randint(0, V, (1, 17))
    with torch.inference_mode():
        before = model(ids)
        loaded = model.load_hf_state_dict((n, p.detach()) for n, p in hf2.named_parameters())
        after, ref = model(ids), hf2(ids).logits
    assert loaded == set(model.hf_weight_map())
    assert rel_err(after, ref) <= 1e-4 and rel_err(before, ref) > 1e-2
    with pytest.raises(KeyError, match="model.layers.0.self_attn.qkv_proj.weight"):
        model.load_hf_state_dict([("model.layers.0.self_attn.qkv_proj.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="model.norm.weight"):
        model.load_hf_state_dict([("model.norm.weight", torch.zeros(3))])


def test_dtype_and_bad_inputs(saved):
    _, folder = saved["llama_tied"]
    model = npr.load_model(folder, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    with torch.inference_mode():
        assert model(torch.randint(0, V, (1, 5))).dtype == torch.float32
    with pytest.raises(ValueError, match="out of range"):
        model(torch.tensor([[0, V]]))
    with pytest.raises(TypeError, match="bool"):
        model(torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 3, 3))
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(torch.zeros(1, 3, dtype=torch.long),
              attention_mask=torch.ones(1, 4, 4, dtype=torch.bool))


# --- config --------------------------------------------------------------------------------

def test_config_reads_old_and_new_rope_layouts():
    new = dict(model_type="llama", **BASE, rope_parameters={
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    old = dict(model_type="llama", **BASE, rope_theta=5e5, rope_scaling={
        "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})
    a, b = ModelConfig.from_hf_config(new), ModelConfig.from_hf_config(old)
    assert a == b and a.rope_theta == 5e5 and a.rope_type == "llama3"
    assert a.head_dim == 16 and a.num_layers == 2


def test_config_rejects_what_it_cannot_run():
    with pytest.raises(NotImplementedError, match="dynamic"):
        ModelConfig.from_hf_config(dict(model_type="llama", **BASE, rope_parameters={
            "rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}))
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig.from_hf_config(dict(model_type="llama", **{**BASE, "num_key_value_heads": 3}))
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.from_hf_config(dict(model_type="gpt2", **BASE))
    with pytest.raises(ValueError, match="factor"):
        ModelConfig.from_hf_config(dict(model_type="llama", **BASE, rope_parameters={
            "rope_type": "linear", "rope_theta": 1e4}))
    with pytest.raises(NotImplementedError, match="sliding"):
        ModelConfig.from_hf_config(dict(model_type="qwen2", **BASE, use_sliding_window=True))


# --- bad checkpoints -----------------------------------------------------------------------

def test_pickle_checkpoints_are_refused(saved, tmp_path):
    _, folder = saved["llama_tied"]
    with open(os.path.join(folder, "config.json")) as f:
        (tmp_path / "config.json").write_text(f.read())
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: pickle"):
        npr.load_model(tmp_path)
    with pytest.raises(CheckpointError, match="pickle"):
        npr.load_model(tmp_path / "pytorch_model.bin")


def _rewrite(folder: str, dst, edit) -> None:
    from safetensors.torch import load_file, save_file

    with open(os.path.join(folder, "config.json")) as f:
        (dst / "config.json").write_text(f.read())
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))


def test_wrong_shape_missing_and_unexpected_tensors_are_named(saved, tmp_path_factory):
    _, folder = saved["llama_tied"]
    name = "model.layers.1.self_attn.k_proj.weight"

    def wrong(t):
        t[name] = torch.zeros(t[name].shape[0] + 1, t[name].shape[1])

    d = tmp_path_factory.mktemp("wrong")
    _rewrite(folder, d, wrong)
    with pytest.raises(CheckpointError, match=f"{name}.*shape"):
        npr.load_model(d)
    d = tmp_path_factory.mktemp("missing")
    _rewrite(folder, d, lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match="missing.*model.layers.0.mlp.up_proj.weight"):
        npr.load_model(d)
    d = tmp_path_factory.mktemp("unexpected")
    _rewrite(folder, d, lambda t: t.__setitem__("model.layers.0.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="unexpected.*model.layers.0.extra.weight"):
        npr.load_model(d)


def test_shard_index_must_match_files(saved, tmp_path):
    _, folder = saved["llama_untied_bias_sharded"]
    files = sorted(os.listdir(folder))
    assert "model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1
    for f in files:
        (tmp_path / f).write_bytes(open(os.path.join(folder, f), "rb").read())
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    os.remove(tmp_path / shard)
    with pytest.raises(CheckpointError, match=shard):
        npr.load_model(tmp_path)


# --- GGUF ----------------------------------------------------------------------------------

def _llama_cpp_permute(w, n_head: int, n_head_kv: int):
    """convert_hf_to_gguf.py LlamaModel.permute, verbatim: the layout llama.cpp stores."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _write_gguf(hf: torch.nn.Module, path: str, rope_freqs=None) -> None:
    """A tiny GGUF file (F32) the way llama.cpp's converter lays it out, names from the gguf
    package's own HF -> GGUF tensor map."""
    import gguf

    cfg = hf.config
    arch = cfg.model_type
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_enum, cfg.num_hidden_layers)
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    if getattr(cfg, "head_dim", None):  # Qwen2 configs have none: hidden / heads
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        base, suffix = name.rsplit(".", 1)
        a = t.detach().numpy().copy()
        if arch == "llama" and base.endswith("q_proj"):
            a = _llama_cpp_permute(a, cfg.num_attention_heads, cfg.num_attention_heads)
        elif arch == "llama" and base.endswith("k_proj"):
            a = _llama_cpp_permute(a, cfg.num_attention_heads, cfg.num_key_value_heads)
        w.add_tensor(f"{names.get_name(base)}.{suffix}", a)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("case", ["llama_tied", "llama_untied_bias_sharded", "llama_rope_llama3",
                                  "qwen2_bias", "qwen3_head_dim"])
def test_gguf_logits_match_transformers(saved, case, tmp_path):
    pytest.importorskip("gguf")
    hf, _ = saved[case]
    freqs = None
    if case == "llama_rope_llama3":  # llama.cpp stores llama3 rope as per-frequency divisors
        d = hf.config.head_dim
        default = 1.0 / (hf.config.rope_parameters["rope_theta"]
                         ** (torch.arange(0, d, 2, dtype=torch.float) / d))
        freqs = (default / hf.model.rotary_emb.inv_freq).numpy()
    path = str(tmp_path / "tiny.gguf")
    _write_gguf(hf, path, freqs)
    model = npr.load_model(path)
    assert model.config.tie_word_embeddings == hf.config.tie_word_embeddings
    pos, mask = npr_layout(6, (3, 5, 2), 4)
    ids = torch.randint(0, V, (1, len(pos)))
    with torch.inference_mode():
        ours = model(ids, pos[None], mask[None])
        ref = hf(ids, attention_mask=mask[None, None], position_ids=pos[None]).logits
    assert rel_err(ours, ref) <= 1e-4


@pytest.mark.parametrize("qwen3", [False, True])
def test_packed_decode_weights_match_and_follow_in_place_updates(qwen3):
    """pack_weights: decode-sized forwards read packed copies through the fused streaming
    linears; results equal the plain path and follow in-place weight changes (optimizer steps,
    weight pushes)."""
    from npr.models.attention import DenseAttention
    from tiny import tiny_model

    torch.manual_seed(0)
    model = tiny_model(97, seed=3, qk_norm=qwen3, model_type="qwen3" if qwen3 else "llama")
    ids = torch.randint(0, 97, (5,))
    pos = torch.arange(5)
    attn = DenseAttention(torch.tril(torch.ones(5, 5, dtype=torch.bool)))
    plain = model.forward_flat(ids, pos, attn)
    model.pack_weights()
    packed = model.forward_flat(ids, pos, attn)
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        model.layers[0].qkv_weight.mul_(1.5)
        model.embed_tokens.add_(0.01)
    model.pack_weights(None)
    want = model.forward_flat(ids, pos, attn)
    model.pack_weights(torch.float32)
    model.forward_flat(ids, pos, attn)  # packs
    with torch.no_grad():
        model.layers[0].qkv_weight.mul_(1 / 1.5)
        model.embed_tokens.sub_(0.01)
    torch.testing.assert_close(model.forward_flat(ids, pos, attn), plain, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want, plain)
    model.pack_weights(torch.bfloat16)
    assert (model.forward_flat(ids, pos, attn) - plain).abs().max() < 0.05 * plain.abs().max()


def test_rope_table_rows_equal_rope_cos_sin():
    from npr.models.rope import RopeTable, rope_cos_sin

    table = RopeTable()
    inv = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    for pos in (torch.tensor([0, 5, 3, 1023]), torch.tensor([4000, 7, 2500]),  # grows past 1024
                torch.zeros(0, dtype=torch.long)):
        for dtype in (torch.float32, torch.bfloat16):
            cos, sin = table(pos, inv, 1.25, dtype)
            want_cos, want_sin = rope_cos_sin(pos, inv, 1.25, dtype)
            assert cos.dtype == dtype and cos.shape == (len(pos), 16)
            torch.testing.assert_close(cos, want_cos, rtol=0, atol=1e-6)
            torch.testing.assert_close(sin, want_sin, rtol=0, atol=1e-6)
    inv.mul_(0.5)  # changed in place (a resumed checkpoint, a GGUF rescale): rebuilt
    torch.testing.assert_close(table(torch.tensor([9]), inv, 1.0, torch.float32)[0],
                               rope_cos_sin(torch.tensor([9]), inv, 1.0, torch.float32)[0])
