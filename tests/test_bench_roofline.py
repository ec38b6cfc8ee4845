"""Benchmarks bound their targets by a roofline from measured rates (npr.bench.common.roofline_ms):
the formula, and the fields the attention and linear suites derive from it. The machine's rates
are given here, so the numbers are exact."""
import math

import pytest
import torch

from npr import _ext
from npr.bench import attention, common, linear

READ_GBS, GEMM_GFLOPS = 40.0, 170.0


def test_roofline_is_the_slower_of_memory_and_compute():
    assert common.roofline_ms(4e8, 1e8, READ_GBS, GEMM_GFLOPS) == pytest.approx(10.0)  # memory
    assert common.roofline_ms(4e6, 1.7e9, READ_GBS, GEMM_GFLOPS) == pytest.approx(10.0)  # FMA


def test_rates_around_measures_before_and_after_and_keeps_the_best(monkeypatch):
    seq = iter([(30.0, 150.0), (50.0, 140.0)])  # (read GB/s, GEMM GFLOP/s) before, after
    events = []

    def fake(device, dtype):
        events.append("measure")
        return next(seq)

    monkeypatch.setattr(common, "measure_rates", fake)
    out, read, gemm = common.rates_around("cpu", torch.float32, lambda: events.append("run") or 7)
    assert out == 7 and events == ["measure", "run", "measure"]
    assert (read, gemm) == (50.0, 150.0)


def test_measure_rates_is_not_cached(monkeypatch):
    reads = iter([31.0, 57.0])  # the read probe as the VM drifts between two calls
    monkeypatch.setattr(common, "_read_gbs", lambda device, nbytes, iters: next(reads))
    r = [common.measure_rates("cpu", torch.float32) for _ in range(2)]
    assert [read for read, _ in r] == [31.0, 57.0]  # probed again on every call
    assert all(math.isfinite(gemm) and gemm > 0.1 for _, gemm in r)  # a real torch.mm timing


def test_linear_finish_keeps_the_best_pass_with_its_rates():
    """Pass A: faster torch; pass B: faster kernel, measured at other rates. The row must take
    B's time and rates, and the best torch time of any pass."""
    base = {"case": "4096x4096", "storage": "fp32", "kernel": "packed", "rows": 1,
            "weight_bytes": 4 * 4096 * 4096}
    a = dict(base, ms=2.0, torch_ms=3.0, read_gbs=30.0, gemm_gflops=150.0)
    b = dict(base, ms=1.5, torch_ms=4.0, read_gbs=50.0, gemm_gflops=190.0)
    for raw in ([a, b], [b, a]):
        (row,) = linear._finish([dict(r) for r in raw])
        assert row["ms"] == 1.5 and row["torch_ms"] == 3.0
        assert row["read_bw_GB_s"] == 50.0 and row["gemm_GFLOP_s"] == 190.0
        assert row["roofline_ms"] == pytest.approx(4 * 4096 * 4096 / 50.0 / 1e6)


def test_linear_rooflines_bf16_storage_cannot_reach_1p3x():
    """8 rows of a 4096 x 4096 bf16 weight: 33.6 MB read in 0.84 ms, but 268 MFLOP of fp32 FMAs
    need 1.58 ms at 170 GFLOP/s: no fp32-compute kernel can run 8 rows in <= 1.3x one row here."""
    k = n = 4096
    raw = [{"case": "4096x4096", "storage": "bf16", "kernel": "packed", "rows": m, "ms": ms,
            "torch_ms": None, "weight_bytes": 2 * k * n, "read_gbs": READ_GBS,
            "gemm_gflops": GEMM_GFLOPS} for m, ms in ((1, 1.0), (8, 2.0))]
    rows = {r["rows"]: r for r in linear._finish(raw)}
    mem_ms, fma8_ms = 2 * k * n / READ_GBS / 1e6, 2 * 8 * k * n / GEMM_GFLOPS / 1e6
    assert rows[1]["roofline_ms"] == pytest.approx(mem_ms)
    assert rows[8]["roofline_ms"] == pytest.approx(fma8_ms)
    assert rows[8]["roofline_ratio_vs_1row"] == pytest.approx(fma8_ms / mem_ms)
    assert rows[8]["roofline_ratio_vs_1row"] > 1.8
    assert rows[8]["roofline_share"] == pytest.approx(fma8_ms / 2.0)
    # fp32 storage: twice the bytes, same FLOPs: memory-bound at 8 rows too
    raw32 = [dict(r, storage="fp32", weight_bytes=4 * k * n) for r in raw]
    rows32 = {r["rows"]: r for r in linear._finish(raw32)}
    assert rows32[8]["roofline_ratio_vs_1row"] == pytest.approx(1.0)


def test_attention_flops():
    # QK and PV: 2 multiply-adds (4 FLOPs) per query head, key and head-dim element
    assert attention._flops(Hq=16, D=128, P=8192, N=8, own=128) == 4 * 8 * 16 * 8320 * 128


@pytest.mark.skipif(not _ext.available(), reason="npr._C not built")
@pytest.mark.parametrize("gemm", [GEMM_GFLOPS, 0.5])  # memory-bound; compute-bound
def test_attention_case_reports_rooflines(gemm):
    P, N, own, Hq, Hkv, D = 256, 4, 32, 4, 2, 64
    row = attention._case("cpu", torch.float32, Hq, Hkv, D, P, N, own, 16, iters=1)
    row.update(read_gbs=READ_GBS, gemm_gflops=gemm)
    attention._add_rooflines(row)
    flops = 4 * N * Hq * (P + own) * D
    assert row["cascade_gflops"] == pytest.approx(flops / row["cascade_ms"] / 1e6)
    for method, mb in (("cascade", row["kv_mb_shared"]), ("flat", row["kv_mb_flat"])):
        expect = max(mb * 1e6 / READ_GBS, flops / gemm) / 1e6
        assert row[f"roofline_{method}_ms"] == pytest.approx(expect)
        assert row[f"{method}_roofline_share"] == pytest.approx(expect / row[f"{method}_ms"])
    assert row["roofline_speedup_vs_flat"] == pytest.approx(
        row["roofline_flat_ms"] / row["roofline_cascade_ms"])
    # both do the same FLOPs, so the roofline ratio never exceeds the ratio of bytes held, and
    # is 1 when both are compute-bound
    bytes_ratio = row["kv_mb_flat"] / row["kv_mb_shared"]
    assert 1.0 <= row["roofline_speedup_vs_flat"] <= bytes_ratio * (1 + 1e-9)
    if gemm < 1:
        assert row["roofline_speedup_vs_flat"] == pytest.approx(1.0)
