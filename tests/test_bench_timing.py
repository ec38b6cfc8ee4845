"""Benchmark timing helpers (npr.bench.common): functions whose time ratios are reported are timed
call by call in turn, so the machine's drift hits them alike."""
from npr.bench import common, linear


def test_time_interleaved_alternates_calls():
    calls = []
    t = common.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                warmup=1, iters=3)
    assert calls == ["a", "b"] * 4  # 1 warmup round + 3 timed rounds, a and b in turn
    assert set(t) == {"a", "b"} and all(r["iters"] == 3 for r in t.values())
    assert all(0 <= r["best_s"] <= r["median_s"] for r in t.values())


def test_linear_best_ms_rotates_one_copy_sequence_across_row_counts():
    """Every call must take the next weight copy of ONE rotation, whatever the row count, so a
    call never finds the copy the previous call just read (cold weights, as in a decode step)."""
    used = []
    cases = {m: [lambda m=m, c=c: used.append(c) for c in range(3)] for m in (1, 8)}
    ms = linear._best_ms(cases, iters=4)
    assert set(ms) == {1, 8}
    assert all(used[i] != used[i + 1] for i in range(len(used) - 1))
