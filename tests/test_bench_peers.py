"""`npr bench peers`: the F32 GGUF written for llama.cpp holds the shipped file's weights exactly,
llama.cpp's peer decodes the workload's phases in NPR's shape (prompt in sequence 0, one batch of
n tokens per branch step, the branches copied back into sequence 0), and the quick run's rows."""
from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from npr import cli
from npr.bench.llama_cpp_peer import LlamaCppPeer, f32_gguf


def test_f32_gguf_keeps_metadata_and_dequantized_weights(tmp_path):
    import gguf

    rng = np.random.default_rng(0)
    src = str(tmp_path / "q.gguf")
    w = gguf.GGUFWriter(src, "llama")
    w.add_block_count(1)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "<c>"])
    w.add_float32("llama.rope.freq_base", 12345.0)
    q = rng.standard_normal((4, 64)).astype(np.float32)
    w.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(q, gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    norm = rng.standard_normal(64).astype(np.float32)
    w.add_tensor("blk.0.attn_norm.weight", norm)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    dst = f32_gguf(src, str(tmp_path / "sub" / "f32.gguf"))
    a, b = gguf.GGUFReader(src), gguf.GGUFReader(dst)
    assert b.fields["general.file_type"].contents() == 0  # LLAMA_FTYPE_ALL_F32
    for key in ("general.architecture", "llama.block_count", "tokenizer.ggml.model",
                "tokenizer.ggml.tokens", "llama.rope.freq_base"):
        assert b.fields[key].contents() == a.fields[key].contents(), key
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert ta.keys() == tb.keys()
    for name, t in tb.items():
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(t.shape) == list(ta[name].shape), name
        want = gguf.quants.dequantize(ta[name].data, ta[name].tensor_type)
        np.testing.assert_array_equal(np.asarray(t.data).reshape(want.shape), want)
    assert not (tmp_path / "sub" / "f32.gguf.part").exists()


@pytest.mark.slow
def test_f32_gguf_of_smollm2_loads_to_the_same_model(smollm2_gguf, tmp_path):
    import npr

    f32 = f32_gguf(smollm2_gguf, str(tmp_path / "smollm2.f32.gguf"))
    a = npr.load_model(smollm2_gguf, dtype=torch.float32).state_dict()
    b = npr.load_model(f32, dtype=torch.float32).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


class _FakeLlama:
    """The four memory calls run_phases makes, recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def llama_memory_clear(self, mem, data):
        self.calls.append(("clear",))

    def llama_memory_seq_cp(self, mem, src, dst, p0, p1):
        self.calls.append(("cp", src, dst, p0, p1))

    def llama_memory_seq_rm(self, mem, seq, p0, p1):
        self.calls.append(("rm", seq, p0, p1))

    def llama_synchronize(self, ctx):
        self.calls.append(("sync",))


def test_llama_cpp_peer_decodes_the_phases_in_npr_shape():
    peer = object.__new__(LlamaCppPeer)  # the workload logic alone: no llama.cpp needed
    peer.L, peer.mem, peer.ctx, peer.n_ctx = _FakeLlama(), None, None, 100
    batches: list[list[tuple]] = []

    def decode(items):
        batches.append(items)
        return [7] * sum(1 for it in items if it[3])

    peer._decode = decode
    prompt = [1, 2, 3]
    ph = {"pre": 2, "branches": [3, 5, 4], "post": 2}
    assert peer.run_phases(prompt, ph) > 0
    # the prompt in sequence 0, logits of its last token only
    assert batches[0] == [(1, 0, 0, False), (2, 1, 0, False), (3, 2, 0, True)]
    assert batches[1:3] == [[(7, 3, 0, True)], [(7, 4, 0, True)]]
    # max(L_k) = 5 steps of one token per branch, all at the same position, branch k in sequence k
    for s, b in enumerate(batches[3:8]):
        assert b == [(7, 5 + s, k, True) for k in range(3)]
    # after the join the takeaway continues at fork + max(L_k) in sequence 0
    assert batches[8:] == [[(7, 10, 0, True)], [(7, 11, 0, True)]]
    calls = peer.L.calls
    assert calls[0] == ("clear",) and calls[-1] == ("sync",)
    assert calls[1:3] == [("cp", 0, 1, -1, -1), ("cp", 0, 2, -1, -1)]  # the fork shares the prefix
    assert calls[3:7] == [("cp", 1, 0, 5, -1), ("rm", 1, -1, -1), ("cp", 2, 0, 5, -1), ("rm", 2, -1, -1)]
    with pytest.raises(ValueError, match="context holds 10"):
        peer.n_ctx = 10
        peer.run_phases(prompt, ph)


def test_bench_peers_quick_rows(tmp_path, smollm2_gguf):
    out = tmp_path / "peers.json"
    assert cli.main(["bench", "peers", "--quick", "--json", str(out),
                     "--f32-gguf", str(tmp_path / "f32.gguf")]) == 0
    rows = json.loads(out.read_text())["rows"]
    peers = {"hf_batched"}
    if importlib.util.find_spec("llama_cpp") is not None:
        peers |= {"llama_cpp_f32", "llama_cpp_q4_1"}
    assert {(r["n"], r["peer"]) for r in rows} == {(n, p) for n in (1, 4) for p in peers}
    for r in rows:
        assert r["npr_vs_peer"] == pytest.approx(r["peer_s"] / r["npr_s"])
        assert r["npr_tok_s"] == pytest.approx(r["tokens"] / r["npr_s"])
        # one block of n branches of 16 forced content tokens (--quick)
        assert r["tokens"] > r["critical_path"] if r["n"] > 1 else r["tokens"] == r["critical_path"]
    # npr's row is the same run for every peer of one n
    for n in (1, 4):
        assert len({r["npr_s"] for r in rows if r["n"] == n}) == 1
