// npr::parallel_for's pool (thread_pool.h explains why it is not at::parallel_for).
//
// One job at a time. The job is published as one 64-bit ticket: epoch (16 bits) | item count
// (24) | next unclaimed item (24). A thread claims item i by a compare-exchange of the ticket it
// read to ticket + 1, so a claim succeeds only on the job that is current at that instant (a
// stale worker's exchange fails once the ticket moved on, and an ABA match is a valid claim of
// the current job). The job's function is read only after a successful claim, and the caller
// does not publish the next job until every claimed item reported done: the function is then
// still the claimed job's.
#include "thread_pool.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <immintrin.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace npr {
namespace {

constexpr uint64_t kIdxBits = 24, kCountBits = 24;
constexpr uint64_t kIdxMask = (uint64_t(1) << kIdxBits) - 1;
constexpr uint64_t kCountMask = (uint64_t(1) << kCountBits) - 1;
constexpr int64_t kMaxItems = int64_t(kIdxMask);

inline uint64_t idx_of(uint64_t t) { return t & kIdxMask; }
inline uint64_t count_of(uint64_t t) { return (t >> kIdxBits) & kCountMask; }
inline bool has_work(uint64_t t) { return idx_of(t) < count_of(t); }

inline void cpu_relax() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_pause();
#endif
}

thread_local bool t_in_pool = false;  // a pool worker, or a caller inside its own job

class Pool {
 public:
  // The function of the current job: ranges[i] = [begin + i * step, min(end, ... + step)).
  struct Job {
    const std::function<void(int64_t, int64_t)>* f = nullptr;
    int64_t begin = 0, end = 0, step = 1;
  };

  int64_t workers() {
    std::lock_guard<std::mutex> g(grow_);
    return static_cast<int64_t>(workers_.size());
  }

  // Runs the job's n items with up to `threads` threads (the caller included). false: the pool
  // was busy with another caller; the caller then runs the range itself.
  bool run(const Job& job, int64_t n, int64_t threads) {
    std::unique_lock<std::mutex> busy(caller_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    ensure_workers(threads - 1);
    job_ = job;
    error_ = nullptr;
    active_.store(threads - 1, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    epoch_ = (epoch_ + 1) & 0xffff;
    const uint64_t t0 = (epoch_ << (kIdxBits + kCountBits)) | (uint64_t(n) << kIdxBits);
    ticket_.store(t0, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      wake_.fetch_add(1, std::memory_order_seq_cst);
      wake_.notify_all();
    }
    t_in_pool = true;
    int64_t mine = 0;
    while (claim_and_run()) ++mine;
    t_in_pool = false;
    // Every item is claimed; wait for the ones other threads hold. Briefly spinning, then
    // asleep on a futex: a holder that a busy neighbour descheduled gets this core when it goes
    // idle (the scheduler pulls runnable threads to idle cores), where spinning or yielding would
    // keep the core busy and leave the holder waiting for its own core.
    const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(150);
    for (int spins = 1;; ++spins) {
      const int64_t d = done_.load(std::memory_order_acquire);
      if (d + mine >= n) break;
      if (spins % 64 == 0 && std::chrono::steady_clock::now() > spin_until) {
        caller_waiting_.store(true, std::memory_order_seq_cst);
        if (done_.load(std::memory_order_seq_cst) == d) done_.wait(d, std::memory_order_acquire);
        caller_waiting_.store(false, std::memory_order_relaxed);
      } else {
        cpu_relax();
      }
    }
    if (error_) std::rethrow_exception(error_);
    return true;
  }

 private:
  // Claims one item of the current job and runs it; false when no item is left.
  bool claim_and_run() {
    uint64_t t = ticket_.load(std::memory_order_acquire);
    while (has_work(t)) {
      if (ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel,
                                        std::memory_order_acquire)) {
        const int64_t i = static_cast<int64_t>(idx_of(t));
        const Job& j = job_;
        const int64_t b = j.begin + i * j.step;
        try {
          (*j.f)(b, std::min(j.end, b + j.step));
        } catch (...) {  // rethrown by the caller once every claimed item is done
          std::lock_guard<std::mutex> g(error_mutex_);
          if (!error_) error_ = std::current_exception();
        }
        return true;
      }
    }
    return false;
  }

  void worker_loop(int64_t id) {
    using clock = std::chrono::steady_clock;
    t_in_pool = true;
    auto mine = [&](uint64_t t) { return has_work(t) && id < active_.load(std::memory_order_relaxed); };
    for (;;) {
      // regions of one decode step come microseconds apart: spin ~200 us before sleeping
      auto deadline = clock::now() + std::chrono::microseconds(200);
      for (int spins = 1;; ++spins) {
        if (mine(ticket_.load(std::memory_order_acquire))) {
          int64_t k = 0;
          while (claim_and_run()) ++k;
          if (k) {
            done_.fetch_add(k, std::memory_order_seq_cst);
            if (caller_waiting_.load(std::memory_order_seq_cst)) done_.notify_all();
          }
          deadline = clock::now() + std::chrono::microseconds(200);
        } else {
          cpu_relax();
        }
        if (spins % 64 == 0 && clock::now() > deadline) break;
      }
      const uint32_t w = wake_.load(std::memory_order_seq_cst);
      sleepers_.fetch_add(1, std::memory_order_seq_cst);
      if (!mine(ticket_.load(std::memory_order_seq_cst)))
        wake_.wait(w, std::memory_order_seq_cst);  // futex: no CPU while asleep
      sleepers_.fetch_sub(1, std::memory_order_seq_cst);
    }
  }

  void ensure_workers(int64_t want) {
    std::lock_guard<std::mutex> g(grow_);
    while (static_cast<int64_t>(workers_.size()) < want) {
      const int64_t id = static_cast<int64_t>(workers_.size());
      workers_.emplace_back([this, id] { worker_loop(id); });
      workers_.back().detach();  // the pool lives until exit
    }
  }

  std::mutex caller_, grow_;
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> ticket_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<bool> caller_waiting_{false};
  std::atomic<uint32_t> wake_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<int64_t> active_{0};  // workers with id < active_ take items of the current job
  uint64_t epoch_ = 0;
  Job job_;
  std::mutex error_mutex_;
  std::exception_ptr error_;
};

// The pool is created on first use; a forked child (DataLoader workers, multiprocessing 'fork')
// has none of the parent's threads, so it starts a pool of its own (the parent's object is left
// untouched: its threads do not exist in the child).
std::atomic<Pool*> g_pool{nullptr};
std::once_flag g_atfork_once;

Pool& pool() {
  std::call_once(g_atfork_once, [] {
    pthread_atfork(nullptr, nullptr, [] { g_pool.store(nullptr); });
  });
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p) return *p;
  static std::mutex m;
  std::lock_guard<std::mutex> g(m);
  p = g_pool.load(std::memory_order_acquire);
  if (!p) {
    p = new Pool();  // never deleted: workers must outlive every caller, exit included
    g_pool.store(p, std::memory_order_release);
  }
  return *p;
}

std::atomic<bool> g_use_openmp{false};
thread_local bool t_follows_openmp = false;  // set_thread_follows_openmp
std::atomic<int64_t> g_pool_threads{0};  // > 0: the pool's thread count instead of torch's

}  // namespace

void set_parallel_backend(const std::string& name) {
  TORCH_CHECK(name == "npr" || name == "openmp",
              "parallel backend must be 'npr' (npr's pool) or 'openmp' (at::parallel_for), got '",
              name, "'");
  g_use_openmp.store(name == "openmp");
}

void set_pool_threads(int64_t n) {
  TORCH_CHECK(n >= 0, "pool threads must be >= 0 (0: torch.get_num_threads()), got ", n);
  g_pool_threads.store(n);
}

int64_t get_pool_threads() {
  const int64_t n = g_pool_threads.load(std::memory_order_relaxed);
  return n > 0 ? n : at::get_num_threads();
}

void set_thread_follows_openmp(bool on) { t_follows_openmp = on; }
bool thread_follows_openmp() { return t_follows_openmp; }

std::string parallel_backend() { return g_use_openmp.load() ? "openmp" : "npr"; }

void parallel_for(int64_t begin, int64_t end, int64_t grain,
                  const std::function<void(int64_t, int64_t)>& f) {
  if (end <= begin) return;
  if (t_follows_openmp || g_use_openmp.load(std::memory_order_relaxed)) {
    at::parallel_for(begin, end, grain, f);
    return;
  }
  const int64_t range = end - begin;
  grain = std::max<int64_t>(1, grain);
  const int64_t threads = t_in_pool || at::in_parallel_region() ? 1 : get_pool_threads();
  if (threads <= 1 || range <= grain) {
    f(begin, end);
    return;
  }
  // floor: every range but the last is at least grain long
  int64_t n = std::min<int64_t>({range / grain, threads * kItemsPerThread, kMaxItems});
  const int64_t step = (range + n - 1) / n;
  n = (range + step - 1) / step;
  if (n <= 1) {
    f(begin, end);
    return;
  }
  if (!pool().run(Pool::Job{&f, begin, end, step}, n, threads)) f(begin, end);
}

int64_t pool_workers() {
  Pool* p = g_pool.load();
  return p ? p->workers() : 0;
}

}  // namespace npr
