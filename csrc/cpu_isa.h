// Which vector ISA the CPU kernels may use. The build targets AVX2 + FMA + F16C; a few kernels
// have AVX-512 variants (tree_attention_avx512.cpp, linear_avx512.cpp) compiled with target
// pragmas and chosen at run time.
#pragma once

namespace npr {

// True when the CPU has AVX-512 F/BW/DQ/VL and NPR_CPU_ISA is unset, "auto" or "avx512"; false
// for NPR_CPU_ISA=avx2 (case-insensitive). Any other value throws std::invalid_argument. Read on
// every call, so tests can run both paths in one process.
bool use_avx512();

}  // namespace npr
