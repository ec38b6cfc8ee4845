"""`npr bench threads --quick`: every (neighbours, rows, backend, threads) case, consistent ratios,
and the backend and thread count restored afterwards."""
import json

import pytest
import torch

from npr import _C, cli


def test_bench_threads_quick_rows(tmp_path):
    before = torch.get_num_threads()
    out = tmp_path / "threads.json"
    assert cli.main(["bench", "threads", "--quick", "--threads", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    cases = {(r["busy_neighbours"], r["rows"], r["backend"], r["threads"]) for r in rows}
    assert cases == {(b, n, k, t) for b in (0, 1) for n in (1, 8) for k in ("npr", "openmp")
                     for t in (1, 2)}
    by = {(r["busy_neighbours"], r["rows"], r["backend"], r["threads"]): r for r in rows}
    for (b, n, k, t), r in by.items():
        assert r["tokens"] == 8 * n  # --quick: 8 new tokens per prompt
        assert r["tok_s"] == pytest.approx(r["tokens"] / r["median_s"])
        assert r["decode_tok_s"] > 0
        one = by[(b, n, k, 1)]
        assert r["vs_1_thread"] == pytest.approx(r["median_s"] / one["median_s"])
        if t == 1:
            assert r["vs_1_thread"] == 1 and r["decode_vs_1_thread"] == 1
    assert _C.parallel_backend() == "npr" and torch.get_num_threads() == before
