"""npr::parallel_for, the decode kernels' thread pool: every index once in ranges of at least the
grain, at most torch.get_num_threads() threads, exceptions reach the caller and leave the pool
usable, concurrent callers and forked children work, and the kernels give the same bits at any
thread count."""
from __future__ import annotations

import multiprocessing as mp
import threading

import pytest
import torch

import npr
from npr import _C
from npr.models.llama import PACKED_ROWS_MAX
from npr.ops.linear import SMALL_ROWS_MAX


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("nth", [1, 2, 4])
@pytest.mark.parametrize("n,grain", [(1, 1), (7, 1), (7, 3), (100, 1), (1000, 50), (12345, 7),
                                     (64, 64), (65, 64)])
def test_every_index_once(threads, nth, n, grain):
    threads(nth)
    seen, used = _C._pool_cover(n, grain)  # ranges shorter than the grain raise inside
    assert seen == [1] * n
    assert 1 <= used <= nth
    if nth == 1 or n <= grain:
        assert used == 1


def test_workers_follow_the_thread_count(threads):
    threads(4)
    for _ in range(50):
        _C._pool_cover(100000, 1)
    assert _C.pool_workers() >= 1  # created on demand, the caller is one of the threads
    threads(2)
    for _ in range(20):
        _, used = _C._pool_cover(100000, 1)
        assert used <= 2  # the extra workers take no items


def test_an_exception_reaches_the_caller_and_the_pool_stays_usable(threads):
    threads(2)
    for at in (0, 5, 999):
        with pytest.raises(RuntimeError, match=f"index {at}"):
            _C._pool_cover(1000, 1, at)
        seen, _ = _C._pool_cover(1000, 1)
        assert seen == [1] * 1000


def test_concurrent_callers(threads):
    threads(2)
    errors: list[BaseException] = []

    def hammer():
        try:
            for _ in range(200):
                seen, _ = _C._pool_cover(257, 2)
                assert seen == [1] * 257
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    ts = [threading.Thread(target=hammer) for _ in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in ts) and not errors


def _child(q, x, w, want):
    # Only npr's pool here: torch's own OpenMP team hangs in a child forked after the parent used
    # it (GNU libgomp is not fork-safe; torch's DataLoader workers run at 1 thread for that).
    torch.set_num_threads(2)
    seen, _ = _C._pool_cover(5000, 1)
    q.put((seen == [1] * 5000, torch.equal(npr.ops.linear(x, w), want)))


def test_a_forked_child_gets_its_own_pool(threads):
    threads(2)
    x, w = torch.randn(8, 256), torch.randn(512, 256)
    want = npr.ops.linear(x, w)  # the parent's workers exist now
    _C._pool_cover(5000, 1)
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q, x, w, want))
    p.start()
    p.join(timeout=120)
    if p.exitcode is None:
        p.kill()
    assert p.exitcode == 0, "the forked child hung or crashed"
    assert q.get(timeout=5) == (True, True)


@pytest.mark.parametrize("rows", [1, 8, 64])
def test_decode_kernels_give_the_same_bits_at_any_thread_count(threads, rows):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 576, generator=g)
    w = torch.randn(1536, 576, generator=g)
    wp = npr.ops.pack_linear_weight(w)
    nw = torch.randn(576, generator=g)
    outs = []
    for nth in (1, 2, 3):
        threads(nth)
        outs.append((npr.ops.linear(x, w), npr.ops.linear(x, wp),
                     npr.ops.rms_norm(x, nw, 1e-5)))
    for o in outs[1:]:
        for a, b in zip(o, outs[0]):
            assert torch.equal(a, b)


def test_pool_threads_and_backend_switches(threads):
    threads(2)
    try:
        _C.set_pool_threads(1)
        assert _C.get_pool_threads() == 1
        assert _C._pool_cover(10000, 1) == ([1] * 10000, 1)  # torch has 2, the pool 1
        _C.set_pool_threads(0)
        assert _C.get_pool_threads() == torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="pool threads must be >= 0"):
            _C.set_pool_threads(-1)
        _C.set_parallel_backend("openmp")
        assert _C.parallel_backend() == "openmp"
        seen, used = _C._pool_cover(1000, 3)  # at::parallel_for covers the range the same way
        assert seen == [1] * 1000 and used <= 2
        with pytest.raises(RuntimeError, match="parallel backend must be 'npr'"):
            _C.set_parallel_backend("tbb")
    finally:
        _C.set_pool_threads(0)
        _C.set_parallel_backend("npr")
    assert _C.parallel_backend() == "npr"


def test_follow_torch_threads_is_per_thread_and_restored(threads):
    from npr.ops.threads import follow_torch_threads

    threads(2)
    seen_elsewhere = []
    with follow_torch_threads():
        assert _C.thread_follows_openmp()
        t = threading.Thread(target=lambda: seen_elsewhere.append(_C.thread_follows_openmp()))
        t.start()
        t.join()
        with follow_torch_threads(False):  # off: leaves the setting as it is
            assert _C.thread_follows_openmp()
        seen, used = _C._pool_cover(1000, 3)  # at::parallel_for covers the range the same way
        assert seen == [1] * 1000 and used <= 2
    assert seen_elsewhere == [False] and not _C.thread_follows_openmp()
    with pytest.raises(KeyError), follow_torch_threads():
        raise KeyError("inside")
    assert not _C.thread_follows_openmp()


@pytest.mark.parametrize("tokens,follows", [(8, False), (SMALL_ROWS_MAX + 1, True),
                                            (PACKED_ROWS_MAX + 1, True)])
def test_a_forward_of_many_rows_runs_the_kernels_on_torch_threads(tokens, follows):
    # Past SMALL_ROWS_MAX rows (decode copies or torch's GEMM) npr's kernels (here: where
    # attention is called) run on torch's threads.
    from tests.tiny import tiny_model

    model = tiny_model(50)
    model.pack_weights(torch.float32)
    seen = []

    def attn(i, q, k, v):
        seen.append(_C.thread_follows_openmp())
        return q

    with torch.inference_mode():
        model.forward_flat(torch.zeros(tokens, dtype=torch.long),
                           torch.arange(tokens), attn)
    assert seen and set(seen) == {follows}
    assert not _C.thread_follows_openmp()
