// Shared by the CPU kernels: vector type, loads and stores, and a parallel-for
// on XLA's intra-op thread pool. Header-only, internal linkage.
#ifndef FAER_JAX_KERNELS_COMMON_H_
#define FAER_JAX_KERNELS_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace faer {
namespace {

constexpr int K = 7;    // kernel size
constexpr int P = 3;    // padding

// Channels per vector: one AVX-512 register (16 floats, 32 registers), or one
// AVX2 register (8 floats, 16 registers) where the build has no AVX-512F. The
// register tiles below are sized from V to fit the register file.
// FAER_JAX_WIDE_VECTORS gives the AVX-512 build's vectors and tiles to a build
// without AVX-512F (GCC splits each vector operation in two, and the tiles spill
// registers): slow, for running that build's code on any AVX2 machine
// (FAER_JAX_CPU_KERNELS=wide, the tests).
#if defined(__AVX512F__) || defined(FAER_JAX_WIDE_VECTORS)
constexpr int V = 16;
#else
constexpr int V = 8;
#endif

typedef float vec __attribute__((vector_size(V * sizeof(float)), aligned(4)));
// The same vector, read and written in place of floats (any alignment).
typedef float unaligned_vec __attribute__((vector_size(V * sizeof(float)), aligned(4), may_alias));

// One vector move each way. (A memcpy here became two 16-byte moves through the
// stack for 8-float vectors with GCC 12: the AVX2 build's MLP forward ran ~9x
// slower.)
inline vec load(const float* p) { return *reinterpret_cast<const unaligned_vec*>(p); }
inline void store(float* p, vec v) { *reinterpret_cast<unaligned_vec*>(p) = v; }
inline void store(float* p, float v) { *p = v; }

// load<vec> or load<float>: for code written once over whole vectors and a tail.
template <class T>
inline T load(const float* p) {
  if constexpr (std::is_same_v<T, vec>) return load(p);
  else return *p;
}

// The sum of a vector's lanes, in a fixed order: halves added lane-wise.
inline float hsum(vec v) {
  float s[V];
  store(s, v);
  for (int w = V / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) s[l] += s[l + w];
  return s[0];
}

// fn(c, T()) for the C channels of a pixel: T = vec at c = 0, 16, ... while a
// whole vector fits, then T = float for the rest.
template <class Fn>
inline void ForChannels(int C, Fn&& fn) {
  int c = 0;
  for (; c + V <= C; c += V) fn(c, vec{});
  for (; c < C; ++c) fn(c, 0.f);
}

// The sum over the channels of what fn(c, T()) returns (as ForChannels calls
// it): lane-wise over the vectors, across the lanes, then the tail in order.
template <class Fn>
inline float SumChannels(int C, Fn&& fn) {
  vec acc = {};
  int c = 0;
  for (; c + V <= C; c += V) acc += fn(c, vec{});
  float sum = hsum(acc);
  for (; c < C; ++c) sum += fn(c, 0.f);
  return sum;
}

// Runs fn(0..n-1) on the caller and on XLA's intra-op threads. Tasks are
// claimed from a shared counter; the caller waits only for helpers that have
// started, so it never waits on a task the pool has not run (the pool may be
// busy, or be the caller's own thread).
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const std::function<void(int64_t)>& fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> active{0};
  };
  auto state = std::make_shared<State>();
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  const std::function<void(int64_t)>* body = &fn;
  const int64_t total = n;
  for (int64_t t = 0; t < helpers; ++t) {
    pool.Schedule([state, body, total]() {
      state->active.fetch_add(1);
      for (int64_t i = state->next.fetch_add(1); i < total; i = state->next.fetch_add(1)) (*body)(i);
      state->active.fetch_sub(1);
    });
  }
  for (int64_t i = state->next.fetch_add(1); i < total; i = state->next.fetch_add(1)) fn(i);
  while (state->active.load() != 0) std::this_thread::yield();
}

}  // namespace
}  // namespace faer

#endif  // FAER_JAX_KERNELS_COMMON_H_
