// npr._C: the one Python extension module. Loading it runs every TORCH_LIBRARY registration
// (torch.ops.npr.*) and exposes the C++ classes bound with pybind11.
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <atomic>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "bindings.h"
#include "cpu_isa.h"
#include "thread_pool.h"
#include "tree_attention_cpu.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "npr compiled extension: torch.ops.npr kernels and C++ engine classes";
  npr::bind_scheduler(m);
#ifdef NPR_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  npr::bind_block_pool(m);
  npr::bind_tree_attention_plan(m);
  npr::bind_llama_layers(m);
  m.def("cpu_isa", []() { return npr::use_avx512() ? "avx512" : "avx2"; },
        "The vector ISA of the CPU kernels' variants: 'avx512' when the CPU has AVX-512 F/BW/DQ/VL "
        "and NPR_CPU_ISA is not 'avx2' (the AVX-512 variants of tree_attention for >= 16 query "
        "rows and of the packed linear for > 4 rows), else 'avx2'.");
  m.def("tree_attention_task_counts", &npr::tree_attention_task_counts, pybind11::arg("reset") = false,
        "Tasks run by npr::tree_attention's CPU kernels since the last reset: (row kernel, AVX2 "
        "wide kernel, AVX-512 wide kernel).");
  m.def("pool_workers", &npr::pool_workers,
        "Worker threads of npr's decode-kernel pool (npr::parallel_for) that exist now.");
  m.def("set_parallel_backend", &npr::set_parallel_backend, pybind11::arg("name"),
        "'npr' (default): the decode kernels split work with npr's pool, which never waits for a "
        "thread a busy neighbour process has descheduled; 'openmp': at::parallel_for (torch's "
        "OpenMP team), for side-by-side measurements.");
  m.def("parallel_backend", &npr::parallel_backend);
  m.def("set_thread_follows_openmp", &npr::set_thread_follows_openmp, pybind11::arg("on"),
        "On the calling thread: the decode kernels split work with at::parallel_for (torch's "
        "OpenMP team) while on, whatever the backend; npr.ops.follow_torch_threads() sets it "
        "around forwards whose linears run on torch's GEMM.");
  m.def("thread_follows_openmp", &npr::thread_follows_openmp);
  m.def("set_pool_threads", &npr::set_pool_threads, pybind11::arg("n"),
        "Threads of npr's pool: n > 0 fixes the count, 0 (default) follows torch.get_num_threads().");
  m.def("get_pool_threads", &npr::get_pool_threads);
  m.def(
      "_pool_cover",
      [](int64_t n, int64_t grain, int64_t throw_at) {
        // For tests: npr::parallel_for over [0, n): how many times each index was visited, and
        // the ids of the threads that ran ranges; throw_at >= 0 makes that index's range throw.
        std::vector<std::atomic<int64_t>> seen(static_cast<size_t>(n));
        std::mutex m;
        std::set<std::thread::id> ids;
        npr::parallel_for(0, n, grain, [&](int64_t b, int64_t e) {
          TORCH_CHECK(e - b >= 1 && (e - b >= grain || e == n), "range [", b, ", ", e,
                      ") shorter than the grain ", grain);
          {
            std::lock_guard<std::mutex> g(m);
            ids.insert(std::this_thread::get_id());
          }
          for (int64_t i = b; i < e; ++i) {
            if (i == throw_at) throw std::runtime_error("index " + std::to_string(i));
            seen[static_cast<size_t>(i)].fetch_add(1);
          }
        });
        std::vector<int64_t> out(static_cast<size_t>(n));
        for (int64_t i = 0; i < n; ++i) out[static_cast<size_t>(i)] = seen[static_cast<size_t>(i)].load();
        return std::make_pair(out, static_cast<int64_t>(ids.size()));
      },
      pybind11::arg("n"), pybind11::arg("grain"), pybind11::arg("throw_at") = -1,
      pybind11::call_guard<pybind11::gil_scoped_release>());
}
