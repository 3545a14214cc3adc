// The CPU's peak float32 FLOP/s as this build sees it: every thread of XLA's
// intra-op pool runs 12 independent chains of vector fused multiply-adds (more
// than enough to hide the FMA latency) for a fixed count, and the wall time of
// the slowest gives 2 * V * 12 * count * threads / seconds (V: floats per vector). The benchmark
// divides achieved FLOP/s by this for a CPU MFU (faer_jax/benchmark/flops.py).
//
//   faer_peak_flops   () -> f32[] FLOP/s

#include <chrono>

#include "common.h"

namespace faer {
namespace {

constexpr int kChains = 12;
constexpr int64_t kIterations = 20000000;

float Chains(int64_t iterations) {
  vec acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = vec{} + (1.f + 1e-3f * i);
  const vec b = vec{} + 0.999999f, c = vec{} + 1e-7f;
  for (int64_t it = 0; it < iterations; ++it)
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) acc[i] = acc[i] * b + c;
  float sum = 0.f;
  for (int i = 0; i < kChains; ++i)
    for (int j = 0; j < V; ++j) sum += acc[i][j];
  return sum;
}

ffi::Error Peak(ffi::ThreadPool pool, ffi::ResultBuffer<ffi::F32> out) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  std::vector<float> sink(threads);
  const auto start = std::chrono::steady_clock::now();
  ParallelFor(pool, threads, [&](int64_t t) { sink[t] = Chains(kIterations); });
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  float keep = 0.f;
  for (float s : sink) keep += s;
  // The sums feed the result (times zero) so the loops cannot be dropped.
  out->typed_data()[0] = (float)(2.0 * V * kChains * kIterations * threads / seconds) + 0.f * keep;
  return ffi::Error::Success();
}

}  // namespace
}  // namespace faer

XLA_FFI_DEFINE_HANDLER_SYMBOL(FaerPeakFlops, faer::Peak,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Ret<ffi::Buffer<ffi::F32>>());
