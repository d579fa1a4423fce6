// The number of threads jbt's C++ kernels use: JBT_NATIVE_THREADS, else the CPUs this process may
// run on. Shared by the kernels through jbt/runtime/kernels.py (which puts this folder on the
// include path and this file in each build's cache key).
#pragma once

#include <sched.h>

#include <algorithm>
#include <cstdlib>
#include <thread>

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

}  // namespace jbt
