// npr._C: the one Python extension module. Loading it runs every TORCH_LIBRARY registration
// (torch.ops.npr.*) and exposes the C++ classes bound with pybind11.
#include <pybind11/stl.h>
#include <torch/extension.h>

#include "bindings.h"
#include "cpu_isa.h"
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
  m.def("cpu_isa", []() { return npr::use_avx512() ? "avx512" : "avx2"; },
        "The vector ISA of the CPU kernels' variants: 'avx512' when the CPU has AVX-512 F/BW/DQ/VL "
        "and NPR_CPU_ISA is not 'avx2' (the AVX-512 variants of tree_attention for >= 16 query "
        "rows and of the packed linear for > 4 rows), else 'avx2'.");
  m.def("tree_attention_task_counts", &npr::tree_attention_task_counts, pybind11::arg("reset") = false,
        "Tasks run by npr::tree_attention's CPU kernels since the last reset: (row kernel, AVX2 "
        "wide kernel, AVX-512 wide kernel).");
}
