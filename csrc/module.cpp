// npr._C: the one Python extension module. Loading it runs every TORCH_LIBRARY registration
// (torch.ops.npr.*) and exposes the C++ classes bound with pybind11.
#include <torch/extension.h>

#include "bindings.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "npr compiled extension: torch.ops.npr kernels and C++ engine classes";
  npr::bind_scheduler(m);
#ifdef NPR_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  npr::bind_block_pool(m);
}
