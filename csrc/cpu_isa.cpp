#include "cpu_isa.h"

#include <cctype>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace npr {

bool use_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  const char* env = std::getenv("NPR_CPU_ISA");  // ~100 ns; read per call so tests can switch
  if (env == nullptr || *env == '\0') return has;
  std::string v(env);
  for (char& ch : v) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  if (v == "avx2") return false;
  if (v == "auto" || v == "avx512") return has;
  throw std::invalid_argument("NPR_CPU_ISA must be auto, avx512 or avx2 (got '" + std::string(env) +
                              "')");
}

}  // namespace npr
