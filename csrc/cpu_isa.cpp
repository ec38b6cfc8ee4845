#include "cpu_isa.h"

#include <cstdlib>
#include <cstring>

namespace npr {

bool use_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  if (!has) return false;
  const char* isa = std::getenv("NPR_CPU_ISA");
  return isa == nullptr || std::strcmp(isa, "avx2") != 0;
}

}  // namespace npr
