// The AVX2 copy of the bag pooling loops (bag_pool.h).
#include "bag_pool.h"

namespace embedding_ext::cpu {

#if defined(__x86_64__)
EMBEDDING_EXT_DEFINE_POOL_COPY(pool_register_blocks_avx2, kAvx2, EMBEDDING_EXT_TARGET_AVX2)
#endif

}  // namespace embedding_ext::cpu
