"""Which threads the CPU kernels split their work with (csrc/thread_pool.h).

By default npr's kernels use npr's pool, which never waits for a thread that a busy neighbour
process has descheduled. A forward whose linears run on torch's GEMM (MKL on torch's OpenMP team:
more rows than the decode kernels take) keeps that team spinning between its GEMMs; there the
kernels join the team instead of waking the pool onto the same cores (measured on a 2-core VM,
tiny Llama at 64 rows: the step 15% faster, and attention, which the pool split no faster than
one thread, 1.4x faster).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from npr import _ext


@contextlib.contextmanager
def follow_torch_threads(on: bool = True) -> Iterator[None]:
    """While inside (and `on`), npr's CPU kernels called from this thread split work with
    at::parallel_for, torch's OpenMP team, whatever npr._C.set_parallel_backend says."""
    if not on or not _ext.available():
        yield
        return
    C = _ext._C
    before = C.thread_follows_openmp()
    C.set_thread_follows_openmp(True)
    try:
        yield
    finally:
        C.set_thread_follows_openmp(before)
