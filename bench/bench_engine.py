"""The engine's decode step (schedule, model forward over the paged cache, sampling, scheduler
update) at 1 / 8 / 64 rows on SmolLM2-135M-Instruct (real weights, fp32): the rows are n samples
of one 256-token prompt (prefilled once, shared in the KV cache), each then decoding its own
tokens, as in parallel sampling."""
from __future__ import annotations

import pytest
import torch

import npr
from npr import _ext

pytestmark = pytest.mark.skipif(not _ext.available(), reason="npr._C not built")

CONTEXT = 256


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    model = npr.load_model(smollm2_gguf, dtype=torch.float32)
    tok = npr.load_tokenizer(smollm2_gguf)
    return model, tok


@pytest.mark.parametrize("rows", [1, 8, 64])
def bench_engine_step(benchmark, record, smollm2, rows):
    model, tok = smollm2
    eng = npr.Engine(model, tok, kv_cache_tokens=rows * (CONTEXT + 256) + 1024, max_rows=rows)
    eos = torch.tensor(sorted(set(eng.eos_ids)), dtype=torch.long)

    def no_eos(ids, logits):  # keeps every row decoding for the whole benchmark
        return logits.index_fill(0, eos, float("-inf"))

    text = "Count the numbers from one to one thousand, one per line, in words. "
    base = tok.encode(text * (CONTEXT // 8), add_special_tokens=False)[:CONTEXT]
    sp = npr.SamplingParams(temperature=1.0, seed=0, n=rows, max_new_tokens=100_000,
                            parallel="off", logits_processors=[no_eos])
    ids = [eng.add_request(input_ids=base, params=sp)]
    for _ in range(8):  # prefill, until all rows decode
        if _step_rows(eng) == rows:
            break

    def step():
        assert _step_rows(eng) == rows

    record(op="engine_step", rows=rows, context=CONTEXT, model="SmolLM2-135M-Instruct",
           dtype=torch.float32, rows_are="n samples of one prompt",
           sampling="temperature 1, one logits processor per row")
    benchmark.pedantic(step, rounds=10 if rows < 64 else 5, warmup_rounds=1)
    eng.abort(ids)
    assert eng.pool_stats()["used_blocks"] == 0


def _step_rows(eng) -> int:
    """Runs one step; returns its row count."""
    before = eng.stats["rows"]
    eng.step()
    return eng.stats["rows"] - before
