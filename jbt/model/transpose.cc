// A 2-D transpose ([R, C] -> [C, R]) as an XLA FFI call, for the weight gradients' x^T g on a CPU
// (jbt/model/matmul.py): XLA fuses the producer of x into its own transposing copy and then runs
// that fusion at a fraction of memory speed; this one reads a materialized x in 32 x 32 blocks.
// Elements of 2 or 4 bytes; the columns are split over up to JBT_NATIVE_THREADS threads.

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "jbt_threads.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 32;

template <typename E>
void transpose_columns(const E* __restrict in, E* __restrict out, int64_t R, int64_t C, int64_t c0, int64_t c1) {
  for (int64_t cb = c0; cb < c1; cb += kBlock) {
    const int64_t ce = std::min(cb + kBlock, c1);
    for (int64_t rb = 0; rb < R; rb += kBlock) {
      const int64_t re = std::min(rb + kBlock, R);
      for (int64_t c = cb; c < ce; ++c) {
        E* o = out + c * R;
        for (int64_t r = rb; r < re; ++r) o[r] = in[r * C + c];
      }
    }
  }
}

template <typename E>
void transpose(const void* in, void* out, int64_t R, int64_t C) {
  const E* x = static_cast<const E*>(in);
  E* y = static_cast<E*>(out);
  const int64_t blocks = (C + kBlock - 1) / kBlock;
  jbt::split(blocks, std::min<int64_t>(jbt::num_threads(), R * C / (1 << 18) + 1), [&](int64_t b0, int64_t b1) {
    transpose_columns<E>(x, y, R, C, std::min(C, b0 * kBlock), std::min(C, b1 * kBlock));
  });
}

ffi::Error Transpose(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y) {
  jbt::PoolScope<ffi::ThreadPool> scope(pool);
  auto dims = x.dimensions();
  if (dims.size() != 2) return ffi::Error(ffi::ErrorCode::kInvalidArgument, "transpose: a 2-D array is needed");
  const int64_t R = dims[0], C = dims[1];
  switch (ffi::ByteWidth(x.element_type())) {
    case 2:
      transpose<uint16_t>(x.untyped_data(), y->untyped_data(), R, C);
      break;
    case 4:
      transpose<uint32_t>(x.untyped_data(), y->untyped_data(), R, C);
      break;
    default:
      return ffi::Error(ffi::ErrorCode::kInvalidArgument, "transpose: elements of 2 or 4 bytes only");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JbtTranspose, Transpose, ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
