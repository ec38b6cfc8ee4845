// The npr operator namespace. Each op file adds its schema with TORCH_LIBRARY_FRAGMENT(npr, m)
// and its kernels with TORCH_LIBRARY_IMPL(npr, <backend>, m), so torch.ops.npr.* dispatches by
// device. Kept free of torch/extension.h so it compiles in seconds.
#include <torch/library.h>

TORCH_LIBRARY(npr, m) {}
