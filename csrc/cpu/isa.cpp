#include "isa.h"

#include <c10/util/Exception.h>

#include <atomic>

namespace embedding_ext::cpu {
namespace {

const char* const kIsaNames[] = {"portable", "avx2", "avx512"};

int best_isa() {
#if defined(__x86_64__)
  static const int best = [] {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512dq");
    return avx512 ? kAvx512 : avx2 ? kAvx2 : kPortable;
  }();
  return best;
#else
  return kPortable;
#endif
}

std::atomic<int> pinned_isa{-1};

}  // namespace

int cpu_isa() {
  const int pinned = pinned_isa.load(std::memory_order_relaxed);
  return pinned >= 0 ? pinned : best_isa();
}

void set_cpu_isa(const std::string& name) {
  if (name == "auto") {
    pinned_isa = -1;
    return;
  }
  for (int isa = kPortable; isa <= kAvx512; ++isa) {
    if (name != kIsaNames[isa]) continue;
    TORCH_CHECK(isa <= best_isa(), "_set_cpu_isa: this CPU has no ", name, " (best: ",
                kIsaNames[best_isa()], ")");
    pinned_isa = isa;
    return;
  }
  TORCH_CHECK(false, "_set_cpu_isa: 'name' must be 'auto', 'portable', 'avx2' or 'avx512', got '",
              name, "'");
}

std::string cpu_isa_name() { return kIsaNames[cpu_isa()]; }

}  // namespace embedding_ext::cpu
