// The fan-out of work over XLA's intra-op thread pool that both native extensions use.

#pragma once

#include <algorithm>
#include <atomic>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace tfx {

// Runs item(i) for i in [0, n) on the calling thread and up to threads - 1 pool tasks, items
// claimed in order from a shared counter. A thread makes its `item = make_worker()` (per-thread
// state such as scratch) when it claims its first item. The caller alone runs them all if no
// pool thread is free, so a busy pool cannot stall it; a task that starts after every item is
// claimed touches only the shared counters, which it keeps alive.
template <class MakeWorker>
void parallel_for(xla::ffi::ThreadPool& pool, long n, long threads, MakeWorker make_worker) {
  struct Counters {
    std::atomic<long> next{0}, done{0};
  };
  auto counters = std::make_shared<Counters>();
  auto work = [counters, n, &make_worker]() {
    long i = counters->next.fetch_add(1);
    if (i >= n) return;
    auto item = make_worker();
    for (; i < n; i = counters->next.fetch_add(1)) {
      item(i);
      counters->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (long t = 1; t < std::min(threads, n); ++t) pool.Schedule([counters, n, work]() {
    if (counters->next.load() < n) work();
  });
  work();
  while (counters->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

}  // namespace tfx
