// The instruction set of the CPU loops that have more than one copy (bag pooling, the fused
// optimizer update), chosen at run time: the extension is built for baseline x86-64, as
// PyTorch's and FBGEMM's CPU kernels are, and picks AVX2 or AVX-512 copies where the CPU has
// them. Every copy gives the same bits: the same operations in the same order, no a*b+c
// contraction (setup.py: -ffp-contract=off); tests pin each copy in turn to check that.
#pragma once

#include <string>

namespace embedding_ext::cpu {

constexpr int kPortable = 0, kAvx2 = 1, kAvx512 = 2;

// The target attributes of each copy (a function compiled with one may inline the portable
// helpers it calls). Never inlined: each copy stays a function of its own instruction set.
#define EMBEDDING_EXT_TARGET_PORTABLE __attribute__((noinline))
#define EMBEDDING_EXT_TARGET_AVX2 __attribute__((target("avx2,f16c"), noinline))
#define EMBEDDING_EXT_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c"), noinline))

// The copy to run: the best this CPU has, unless a test pinned a lower one.
int cpu_isa();

// "auto" (the best this CPU has, the default), or one of "portable", "avx2", "avx512"
// (refused if the CPU lacks it). For tests and benchmarks (_C._set_cpu_isa).
void set_cpu_isa(const std::string& name);
std::string cpu_isa_name();

}  // namespace embedding_ext::cpu
