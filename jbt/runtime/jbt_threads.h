// The number of threads jbt's C++ kernels use (JBT_NATIVE_THREADS, else the CPUs this process may
// run on) and how a kernel shares its work with XLA's CPU thread pool. Shared by the kernels
// through jbt/runtime/kernels.py (which puts this folder on the include path and this file in
// each build's cache key).
#pragma once

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
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

// Where a kernel's helper tasks run: XLA's CPU thread pool, the one XLA's own ops run on, set by a
// PoolScope for the duration of an FFI call. A kernel that started threads of its own would add
// them to the pool's, so that on a machine with as many pool threads as cores an op XLA runs
// beside the kernel shares a core with it (seen: a transpose beside a dot taking 3x its time
// alone). Without a scope (a call from outside XLA), or with JBT_NATIVE_POOL=0, threads of the
// kernel's own.
struct Pool {
  std::function<void(std::function<void()>)> schedule;
  int64_t threads;
};
inline thread_local const Pool* current_pool = nullptr;

template <typename P>  // xla::ffi::ThreadPool (passed in by the handler's Ctx<ThreadPool>)
class PoolScope {
 public:
  explicit PoolScope(P& pool)
      : pool_{[&pool](std::function<void()> task) { pool.Schedule(std::move(task)); }, pool.num_threads()},
        saved_(current_pool) {
    const char* off = std::getenv("JBT_NATIVE_POOL");
    current_pool = off && std::string(off) == "0" ? nullptr : &pool_;
  }
  ~PoolScope() { current_pool = saved_; }
  PoolScope(const PoolScope&) = delete;
  PoolScope& operator=(const PoolScope&) = delete;

 private:
  Pool pool_;
  const Pool* saved_;
};

// fn(u) for every u in [0, units), each exactly once, by the calling thread and up to `helpers`
// helper tasks (on the current pool, at most one per pool thread; else threads of their own), each
// claiming the next unit until none is left. The caller never waits for a helper that has not
// started (one queued behind XLA's other work finds nothing left and returns), so what the units
// compute, and the bits of any sums kept per unit, do not depend on how many helpers ran.
template <typename F>
void share(int64_t units, int64_t helpers, const F& fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::mutex mu;
    std::condition_variable cv;
    int active = 0;
    bool closed = false;
  };
  const Pool* pool = current_pool;
  helpers = std::max<int64_t>(0, std::min<int64_t>(helpers, units - 1));
  if (pool) helpers = std::min<int64_t>(helpers, pool->threads);
  if (helpers == 0) {
    for (int64_t u = 0; u < units; ++u) fn(u);
    return;
  }
  auto state = std::make_shared<State>();
  const F* f = &fn;  // used only by a helper that entered before the caller closed the state
  auto helper = [state, f, units] {
    {
      std::lock_guard<std::mutex> lock(state->mu);
      if (state->closed) return;
      ++state->active;
    }
    for (int64_t u; (u = state->next.fetch_add(1)) < units;) (*f)(u);
    {
      std::lock_guard<std::mutex> lock(state->mu);
      --state->active;
    }
    state->cv.notify_all();
  };
  std::vector<std::thread> own;
  for (int64_t h = 0; h < helpers; ++h) {
    if (pool) pool->schedule(helper);
    else own.emplace_back(helper);
  }
  for (int64_t u; (u = state->next.fetch_add(1)) < units;) fn(u);
  {
    std::unique_lock<std::mutex> lock(state->mu);
    state->closed = true;
    state->cv.wait(lock, [&] { return state->active == 0; });
  }
  for (auto& t : own) t.join();
}

// fn(u0, u1) over contiguous ranges covering [0, units), for up to `threads` threads (the caller
// and threads - 1 helpers), in up to 4 ranges a thread so that a helper starting late takes less.
template <typename F>
void split(int64_t units, int64_t threads, const F& fn) {
  const int64_t t = std::max<int64_t>(1, std::min<int64_t>(threads, units));
  const int64_t parts = t == 1 ? 1 : std::min<int64_t>(units, 4 * t);
  share(parts, t - 1, [&](int64_t k) { fn(units * k / parts, units * (k + 1) / parts); });
}

}  // namespace jbt
