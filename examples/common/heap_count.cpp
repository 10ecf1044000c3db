// Counting malloc/free for heap_count.hpp: each call goes on to glibc's own (__libc_malloc, ...)
// and adds or takes away malloc_usable_size of the block. Operator new, Eigen's aligned
// allocations and the threading runtime all come through here.
#include "heap_count.hpp"

#include <atomic>

#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define DEMO_HEAP_UNCOUNTED
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__) || !defined(__GLIBC__)
#define DEMO_HEAP_UNCOUNTED
#endif

namespace {
std::atomic<std::size_t> live_bytes{0}, peak_bytes{0};
}

namespace demo::heap {
#ifdef DEMO_HEAP_UNCOUNTED
bool available() { return false; }
#else
bool available() { return true; }
#endif
std::size_t live() { return live_bytes.load(std::memory_order_relaxed); }
std::size_t peak() { return peak_bytes.load(std::memory_order_relaxed); }
void reset_peak() { peak_bytes.store(live(), std::memory_order_relaxed); }
}  // namespace demo::heap

#ifndef DEMO_HEAP_UNCOUNTED
#include <malloc.h>

extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
void __libc_free(void*);

namespace {
void* counted(void* p) {
  if (p) {
    const std::size_t now = live_bytes.fetch_add(malloc_usable_size(p), std::memory_order_relaxed) + malloc_usable_size(p);
    std::size_t seen = peak_bytes.load(std::memory_order_relaxed);
    while (now > seen && !peak_bytes.compare_exchange_weak(seen, now, std::memory_order_relaxed)) {
    }
  }
  return p;
}
void uncount(void* p) {
  if (p) live_bytes.fetch_sub(malloc_usable_size(p), std::memory_order_relaxed);
}
}  // namespace

void* malloc(std::size_t n) { return counted(__libc_malloc(n)); }
void* calloc(std::size_t k, std::size_t n) { return counted(__libc_calloc(k, n)); }
void free(void* p) {
  uncount(p);
  __libc_free(p);
}
void* realloc(void* p, std::size_t n) {
  if (p && n == 0) {  // glibc frees here
    free(p);
    return nullptr;
  }
  const std::size_t before = p ? malloc_usable_size(p) : 0;
  void* q = __libc_realloc(p, n);
  if (!q) return nullptr;  // p untouched
  live_bytes.fetch_sub(before, std::memory_order_relaxed);
  return counted(q);
}
void* memalign(std::size_t align, std::size_t n) { return counted(__libc_memalign(align, n)); }
void* aligned_alloc(std::size_t align, std::size_t n) { return memalign(align, n); }
int posix_memalign(void** out, std::size_t align, std::size_t n) {
  if (align < sizeof(void*) || (align & (align - 1)) != 0) return 22;  // EINVAL
  void* p = memalign(align, n);
  if (!p && n) return 12;  // ENOMEM
  *out = p;
  return 0;
}
}
#endif
