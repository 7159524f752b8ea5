// The portable copy of the bag pooling loops (bag_pool.h), for baseline x86-64 and other
// CPUs.
#include "bag_pool.h"

namespace embedding_ext::cpu {

EMBEDDING_EXT_DEFINE_POOL_COPY(pool_register_blocks_portable, kPortable, EMBEDDING_EXT_TARGET_PORTABLE)

}  // namespace embedding_ext::cpu
