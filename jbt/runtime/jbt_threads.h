// The number of threads jbt's C++ kernels use: JBT_NATIVE_THREADS, else the CPUs this process may
// run on. Shared by the kernels through jbt/runtime/kernels.py (which puts this folder on the
// include path and this file in each build's cache key).
#pragma once

#include <sched.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <thread>
#include <vector>

namespace jbt {

inline int num_threads() {
  if (const char* s = std::getenv("JBT_NATIVE_THREADS")) {
    int n = std::atoi(s);
    if (n > 0) return n;
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// fn(u0, u1) over contiguous ranges of [0, units), one range for each of up to `threads` threads
// (never more threads than units), the calling thread taking the first range.
template <typename F>
void split(int64_t units, int64_t threads, const F& fn) {
  const int64_t t = std::max<int64_t>(1, std::min<int64_t>(threads, units));
  std::vector<std::thread> pool;
  for (int64_t k = 1; k < t; ++k) pool.emplace_back(fn, units * k / t, units * (k + 1) / t);
  fn(int64_t(0), units / t);
  for (auto& th : pool) th.join();
}

}  // namespace jbt
