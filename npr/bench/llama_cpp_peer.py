"""llama.cpp as a peer of `npr bench peers`, through llama-cpp-python's low-level C API.

The workload is the one npr's engine runs natively, in llama.cpp's own terms: one context with a
unified KV cache, the prompt (and the tokens before the fork) in sequence 0, `seq_cp` of sequence
0 to sequences 1..n-1 at the fork (cells are shared, not copied), one batch of n tokens per step
(token k in sequence k), then the branches' cells copied back into sequence 0 for the takeaway, so
the takeaway attends to every branch as in NPR's join. Greedy (argmax of the logits), one decode
call per step, as HF's batched peer does.

`f32_gguf` writes an F32 GGUF of a quantized file with the gguf package (every tensor
dequantized, metadata copied, file type set to ALL_F32): llama.cpp then computes at npr's
precision, and the original file gives its quantized speed as a separate row.
"""
from __future__ import annotations

import ctypes
import os
import time
from typing import Any

import numpy as np

GGUF_FILE_TYPE_ALL_F32 = 0  # llama_ftype LLAMA_FTYPE_ALL_F32


def f32_gguf(src: str, dst: str) -> str:
    """Write dst: src with every tensor dequantized to F32 (same names, shapes and metadata).
    Returns dst. Written to a temporary name first, so an interrupted write leaves no half file."""
    import gguf

    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    tmp = dst + ".part"
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    w = gguf.GGUFWriter(tmp, arch)
    for field in reader.fields.values():
        # GGUF.* are the reader's virtual fields; the writer writes the architecture itself
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        val = GGUF_FILE_TYPE_ALL_F32 if field.name == gguf.Keys.General.FILE_TYPE else field.contents()
        w.add_key_value(field.name, val, vtype, sub_type=sub)
    for t in reader.tensors:
        # dequantize gives the numpy layout ([rows, cols]); the writer stores its reverse as ne
        w.add_tensor(t.name, np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type),
                                                  dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, dst)
    return dst


class LlamaCppPeer:
    """One llama.cpp model and context sized for a forced parallel workload."""

    def __init__(self, path: str, *, n_ctx: int, n_seq: int, threads: int) -> None:
        import llama_cpp as L

        if not (hasattr(L, "llama_memory_seq_cp") and "kv_unified" in dict(L.llama_context_params._fields_)):
            raise RuntimeError(f"llama-cpp-python {getattr(L, '__version__', '?')} lacks the memory API "
                               "(llama_memory_seq_cp, kv_unified) the peer uses: pip install "
                               "'llama-cpp-python>=0.3.36'")
        self.L = L
        L.llama_backend_init()
        self._quiet = L.llama_log_callback(lambda level, text, user: None)  # keep a reference
        L.llama_log_set(self._quiet, ctypes.c_void_p())
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0  # the CPU, as npr and HF here
        self.model = L.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_ctx
        cp.n_ubatch = min(n_ctx, 512)
        cp.n_seq_max = n_seq
        cp.kv_unified = True
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} tokens for {path}")
        self.mem = L.llama_get_memory(self.ctx)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(n_ctx, 0, n_seq)
        self.n_ctx = n_ctx

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.L.llama_batch_free(self.batch)
            self.L.llama_free(self.ctx)
            self.L.llama_model_free(self.model)
            self.ctx = None

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order varies
        try:
            self.close()
        except Exception:
            pass

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> list[int]:
        """items: (token, position, sequence, wants logits). Decodes them as one batch; returns the
        greedy next token of every item that wanted logits, in order."""
        b = self.batch
        for i, (tok, pos, seq, logits) in enumerate(items):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = 1 if logits else 0
        b.n_tokens = len(items)
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        out = []
        for i, it in enumerate(items):
            if it[3]:
                row = np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
                out.append(int(row.argmax()))
        return out

    def run_phases(self, prompt: list[int], ph: dict[str, Any]) -> float:
        """Seconds to decode the phases (npr.bench.speedup._phases: `pre` tokens before the fork,
        `branches` = L_k per branch, `post` after the join) from a fresh cache."""
        L = self.L
        lens = ph["branches"]
        need = len(prompt) + ph["pre"] + sum(lens) + ph["post"] + 1
        if need > self.n_ctx:
            raise ValueError(f"workload needs {need} cache cells; the context holds {self.n_ctx}")
        L.llama_memory_clear(self.mem, True)
        t0 = time.perf_counter()
        P = len(prompt)
        nxt = self._decode([(t, i, 0, i == P - 1) for i, t in enumerate(prompt)])[0]
        pos = P
        for _ in range(ph["pre"]):
            nxt = self._decode([(nxt, pos, 0, True)])[0]
            pos += 1
        if lens:
            n = len(lens)
            for k in range(1, n):
                L.llama_memory_seq_cp(self.mem, 0, k, -1, -1)
            rows = [nxt] * n
            for s in range(max(lens)):
                rows = self._decode([(rows[k], pos + s, k, True) for k in range(n)])
            for k in range(1, n):  # the join: sequence 0 sees every branch's cells
                L.llama_memory_seq_cp(self.mem, k, 0, pos, -1)
                L.llama_memory_seq_rm(self.mem, k, -1, -1)
            pos += max(lens)
            nxt = rows[0]
        for _ in range(ph["post"]):
            nxt = self._decode([(nxt, pos, 0, True)])[0]
            pos += 1
        L.llama_synchronize(self.ctx)
        return time.perf_counter() - t0
