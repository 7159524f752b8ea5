#include "output_allocator.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>

#include <sys/mman.h>

#include <cstdlib>
#include <list>
#include <mutex>
#include <string>

namespace embedding_ext::cpu {
namespace {

// Below this, malloc's own free lists already reuse memory.
constexpr size_t kMinCachedBytes = size_t(1) << 20;
constexpr size_t kHugePage = size_t(2) << 20;

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

int64_t limit_from_env() {
  const char* mb = std::getenv("EMBEDDING_EXT_CPU_CACHE_MB");
  return (mb ? std::atoll(mb) : 1024) << 20;
}

struct Block {
  void* ptr;
  size_t bytes;
};

class ReusingAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    const size_t bytes = round_up(std::max<size_t>(n, 1), kHugePage);
    void* ptr = take_cached(bytes);
    if (ptr == nullptr) {
      ptr = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      TORCH_CHECK(ptr != MAP_FAILED, "embedding_ext: could not map ", bytes,
                  " bytes for an output tensor");
      madvise(ptr, bytes, MADV_HUGEPAGE);  // advisory: fine if THP is off
    }
    return {ptr, new Block{ptr, bytes}, &ReusingAllocator::release, c10::Device(c10::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  int64_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(cached_);
  }

  void set_limit(int64_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    limit_ = static_cast<size_t>(std::max<int64_t>(bytes, 0));
    trim_locked();
  }

  void release_all() {
    std::lock_guard<std::mutex> lock(mutex_);
    const size_t keep = limit_;
    limit_ = 0;
    trim_locked();
    limit_ = keep;
  }

  static ReusingAllocator& get() {
    static ReusingAllocator* instance = new ReusingAllocator();  // never destroyed: outlives tensors
    return *instance;
  }

 private:
  ReusingAllocator() : limit_(static_cast<size_t>(std::max<int64_t>(limit_from_env(), 0))) {}

  void* take_cached(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = free_.rbegin(); it != free_.rend(); ++it) {  // newest first
      if (it->bytes == bytes) {
        void* ptr = it->ptr;
        free_.erase(std::next(it).base());
        cached_ -= bytes;
        return ptr;
      }
    }
    return nullptr;
  }

  static void release(void* ctx) {
    Block* block = static_cast<Block*>(ctx);
    get().give_back(block->ptr, block->bytes);
    delete block;
  }

  // The most recently freed buffers are the ones a loop will ask for again: keep those,
  // evicting the longest-cached ones to stay under the limit.
  void give_back(void* ptr, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (bytes <= limit_) {
        free_.push_back({ptr, bytes});
        cached_ += bytes;
        trim_locked();
        return;
      }
    }
    munmap(ptr, bytes);
  }

  void trim_locked() {
    while (cached_ > limit_ && !free_.empty()) {
      const Block oldest = free_.front();
      free_.pop_front();
      munmap(oldest.ptr, oldest.bytes);
      cached_ -= oldest.bytes;
    }
  }

  std::mutex mutex_;
  std::list<Block> free_;  // oldest first; reuse needs an exact size match
  size_t cached_ = 0;
  size_t limit_;
};

}  // namespace

at::Tensor empty_output(c10::IntArrayRef sizes, const c10::TensorOptions& options) {
  size_t bytes = options.dtype().itemsize();
  for (int64_t s : sizes) bytes *= static_cast<size_t>(s);
  if (bytes < kMinCachedBytes) return at::empty(sizes, options);
  return at::detail::empty_generic(sizes, &ReusingAllocator::get(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), std::nullopt);
}

int64_t cached_output_bytes() { return ReusingAllocator::get().cached_bytes(); }
void set_output_cache_limit(int64_t bytes) { ReusingAllocator::get().set_limit(bytes); }
void release_cached_outputs() { ReusingAllocator::get().release_all(); }

}  // namespace embedding_ext::cpu
