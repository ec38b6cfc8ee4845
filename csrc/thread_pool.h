// npr::parallel_for: the decode kernels' thread pool, made for a machine shared with other busy
// processes (a trainer beside the engine, torchrun ranks on a 2-core box).
//
// at::parallel_for (OpenMP here) ends every region at a barrier that waits for each thread of the
// team, so one thread descheduled by a neighbour process stalls the region for a scheduler time
// slice (milliseconds) even when the others could have done its share; a decode step runs
// hundreds of regions. Here the range is cut into small items that threads claim from a shared
// ticket; the caller claims items too and waits only for items another thread has actually
// claimed. A worker that has not woken yet when the items run out simply finds none: the caller
// never waits for a thread that is not running. Workers spin briefly between regions (regions of
// one decode step come microseconds apart) and then sleep on a futex (passive wait).
//
// Threads: at::get_num_threads() at each call (torch.set_num_threads; torchrun's
// OMP_NUM_THREADS), the caller included. Calls from a pool worker, from inside an OpenMP/ATen
// parallel region, or while another thread is using the pool run serially on the calling thread.
#pragma once
#include <cstdint>
#include <functional>
#include <string>

namespace npr {

// Calls f(b, e) on disjoint ranges that cover [begin, end), each at least `grain` long (except
// the last), from up to at::get_num_threads() threads; returns when all calls returned. f must
// not throw (the kernels check their arguments before the parallel part).
void parallel_for(int64_t begin, int64_t end, int64_t grain,
                  const std::function<void(int64_t, int64_t)>& f);

// Items the range is cut into per thread: enough that the threads that are running take over
// the share of one that is not, few enough that each item reads a long contiguous span.
inline constexpr int64_t kItemsPerThread = 4;

// "npr" (default) or "openmp": route parallel_for to at::parallel_for instead, for side-by-side
// measurements (npr bench threads).
void set_parallel_backend(const std::string& name);
std::string parallel_backend();

// On this thread, while on: parallel_for runs on at::parallel_for (torch's OpenMP team). For
// forwards whose linears run on torch's GEMM: its team is spinning hot between the GEMMs, and
// waking the pool would put a second spinning thread on the cores the team holds (measured on a
// 2-core VM: the tiny model's 64-row step 15% slower, attention no faster than on 1 thread).
void set_thread_follows_openmp(bool on);
bool thread_follows_openmp();

// The pool's thread count: n > 0 fixes it, 0 (the default) follows at::get_num_threads().
void set_pool_threads(int64_t n);
int64_t get_pool_threads();

// For tests: how many pool worker threads exist now (0 before the first parallel call).
int64_t pool_workers();

}  // namespace npr
