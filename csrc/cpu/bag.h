// Controls of the CPU pooled lookup (csrc/cpu/bag.cpp) for tests and benchmarks.
#pragma once

#include <string>

namespace embedding_ext {
namespace cpu {

// The instruction set the pooling loops run (and whether the sparse gradient's row copies
// use AVX2 streaming stores): "auto" (the best this CPU has, the default), or one of
// "portable", "avx2", "avx512" (refused if the CPU lacks it). Every choice gives the same
// bits; tests pin each in turn to check that.
void set_bag_pooling_isa(const std::string& name);
std::string bag_pooling_isa();

}  // namespace cpu
}  // namespace embedding_ext
