// npr._C: the one Python extension module. Loading it runs every TORCH_LIBRARY registration
// (torch.ops.npr.*) and exposes the C++ classes bound with pybind11.
#include <torch/extension.h>

#include "bindings.h"
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
  m.def("cpu_attention_isa", []() { return npr::tree_attention_avx512_usable() ? "avx512" : "avx2"; },
        "The ISA of npr::tree_attention's CPU kernel for tasks with >= 16 query rows: 'avx512' when "
        "the CPU has AVX-512 and NPR_CPU_ISA is not 'avx2', else 'avx2'.");
}
