// The register-tiled matrix product shared by the CPU kernels (float32): the
// MLP kernel's two products and their gradients (mlp.cc) and the patchify
// convolutions (patch_conv.cc). Header-only, internal linkage.
#ifndef FAER_JAX_KERNELS_GEMM_H_
#define FAER_JAX_KERNELS_GEMM_H_

#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common.h"

namespace faer {
namespace {

// Matrix products. One register tile serves every product here:
//   acc[i][v] += sum_{k < K} A[i * ars + k * aks] * B[k * bks + v * V]
// for R rows and NV vectors of V columns. A is read in place, row-major or
// transposed (Lhs); B from memory or packed into panels (Operand).

// Rows per register tile: 2 * MR accumulators + 2 operands + 1 broadcast fill
// 27 of AVX-512's 32 registers (MR = 12) or 15 of AVX2's 16 (MR = 6).
constexpr int MR = V == 16 ? 12 : 6;

template <int R, int NV>
inline void Tile(const float* A, int64_t ars, int64_t aks, const float* B, int64_t bks, int64_t K,
                 vec (&acc)[MR][2]) {
  // Two depths per loop trip: the tile alone (12 x 32, K = 512, one core)
  // went from 110 to 115-116 GFLOP/s (of ~116.5), the MLP forward at C = 512
  // 104 -> 106-107; four per trip ran at 111. Same sums, same order.
#pragma GCC unroll 2
  for (int64_t k = 0; k < K; ++k) {
    vec b[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) b[v] = load(B + k * bks + v * V);
#pragma GCC unroll 12
    for (int i = 0; i < R; ++i) {
      const float a = A[i * ars + k * aks];
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[i][v] += b[v] * a;
    }
  }
}

// A (M x K): element (m, k) at data[m * row + k * depth]. Row-major A has
// row = ld, depth = 1 (Rows); the transpose of a row-major matrix, row = 1,
// depth = ld.
struct Lhs {
  const float* data;
  int64_t row, depth;
  Lhs from(int64_t k0) const { return {data + k0 * depth, row, depth}; }
};

inline Lhs Rows(const float* a, int64_t ld) { return {a, ld, 1}; }

// One R x NV*V block at (r, c): start from zero or from `init` (row stride
// ld_init), run the tile over K, hand every vector to epi(row, col, value).
// B points at this block's columns.

//
// Never inlined: inside a caller with more values live (the FFI handler's
// lambdas), GCC kept part of the 24 accumulators on the stack, which cost the
// fc1 + GELU product of the forward 25 % (C = 96) in the built library.
template <int R, int NV, class Epi>
__attribute__((noinline)) void Block(int64_t r, int64_t c, int64_t K, const Lhs& A, const float* B, int64_t bks, const float* init,
                  int64_t ld_init, Epi& epi) {
  vec acc[MR][2];
#pragma GCC unroll 12
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v)
      acc[i][v] = init ? load(init + (r + i) * ld_init + c + v * V) : vec{};
  Tile<R, NV>(A.data + r * A.row, A.row, A.depth, B, bks, K, acc);
#pragma GCC unroll 12
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) epi(r + i, c + v * V, acc[i][v]);
}

// B (K x N) either as it lies in memory (Plain: row stride ld) or packed by
// Pack() into panels of 2V columns (32 with AVX-512), each K x 2V contiguous
// (the last one padded with zeros), so that the panel a register tile reads is
// one dense stream.
struct Operand {
  const float* data;
  int64_t row, panel;  // strides of k and of a panel
  const float* at(int64_t k, int64_t c) const { return data + (c / (2 * V)) * panel + k * row + c % (2 * V); }
  Operand from(int64_t k0, int64_t c0) const { return {at(k0, c0), row, panel}; }
};

inline Operand Plain(const float* b, int64_t ld) { return {b, ld, 2 * V}; }

// One matrix to pack: B (K x N), element (k, n) at b[k * ks + n * ns], into
// `buffer` (kept by the caller, reused from call to call).
struct PackJob {
  const float* b;
  int64_t K, N, ks, ns;
  std::vector<float>* buffer;
  int64_t panels() const { return (N + 2 * V - 1) / (2 * V); }
};

// Panel p of a job into out (K x 2V), zeros past column N.
void PackPanel(const PackJob& j, int64_t p, float* out) {
  constexpr int64_t PW = 2 * V;
  const int64_t w = std::min<int64_t>(PW, j.N - p * PW);
  const float* b = j.b + p * PW * j.ns;
  int64_t k0 = 0;
  if (j.ns == 1) {
    for (; k0 < j.K; ++k0) std::copy_n(b + k0 * j.ks, w, out + k0 * PW);
  } else if (j.ks == 1) {
    // A transpose: V values of k at a time, read along k for each column,
    // written out row by row (1.8x the element-by-element loop at 2048 x 512).
    for (; k0 + V <= j.K; k0 += V) {
      float t[V][PW];
      for (int64_t c = 0; c < w; ++c)
        for (int i = 0; i < V; ++i) t[i][c] = b[c * j.ns + k0 + i];
      for (int i = 0; i < V; ++i) std::copy_n(t[i], w, out + (k0 + i) * PW);
    }
  }
  for (; k0 < j.K; ++k0)
    for (int64_t c = 0; c < w; ++c) out[k0 * PW + c] = b[k0 * j.ks + c * j.ns];
  if (w < PW)
    for (int64_t k = 0; k < j.K; ++k) std::fill(out + k * PW + w, out + (k + 1) * PW, 0.f);
}

// Packs each job's B into panels of 2V columns, each K x 2V contiguous (the last
// one padded with zeros), so that the panel a register tile reads is one dense
// stream; the panels are spread over the caller and the pool's threads (on
// the caller alone, one thread, packing took 1.1-1.5 ms of a 65 ms MLP forward
// at C = 512 and 3.2 ms of its backward, 4.3 ms with fresh pages; the whole
// step's time moved within its noise). Each buffer's floats start on a cache
// line, so every vector load of a panel reads one line. Returns the operands
// in the order of the jobs.
template <size_t J>
std::array<Operand, J> Pack(ffi::ThreadPool& pool, const std::array<PackJob, J>& jobs) {
  std::array<Operand, J> operands;
  std::array<float*, J> bases;
  int64_t total = 0;
  for (size_t i = 0; i < J; ++i) {
    const PackJob& j = jobs[i];
    constexpr int64_t line = 64 / sizeof(float);
    j.buffer->resize(j.panels() * j.K * 2 * V + line);
    float* data = j.buffer->data();
    bases[i] = data + (line - (reinterpret_cast<uintptr_t>(data) / sizeof(float)) % line) % line;
    operands[i] = {bases[i], 2 * V, 2 * V * j.K};
    total += j.panels();
  }
  ParallelFor(pool, total, [&](int64_t t) {
    size_t i = 0;
    while (t >= jobs[i].panels()) t -= jobs[i++].panels();
    PackPanel(jobs[i], t, bases[i] + t * jobs[i].K * 2 * V);
  });
  return operands;
}

// Depth of a pass. A 32-column panel of 512 rows (64 KB) streams from L2; 256
// rows would fit L1, but the extra round trips of the partial sums cost more:
// one thread, KC = 512 against 256, the MLP forward at C = 384 / 512 took 3-4 %
// less time and the backward's dh product 5-9 % less.
constexpr int64_t KC = 512;

// out (M x N, N % V == 0) = [init +] A (M x K) B (K x N), in passes over KC
// of the depth; every panel of B stays in cache while all M rows
// pass it. Between passes the partial sums wait in `partial` (M x N); epi sees
// only the final values.
template <class Epi>
void Gemm(int64_t M, int64_t N, int64_t K, const Lhs& A, const Operand& B, const float* init, int64_t ld_init,
          float* partial, Epi&& epi) {
  auto keep_partial = [&](int64_t r, int64_t c, vec v) { store(partial + r * N + c, v); };
  const int64_t mr = M - M % MR;
  // Rows past the last whole register tile: in tiles of 8 (where MR > 8), 4 and 1.
  const int64_t m8 = MR > 8 ? mr + (M - mr) / 8 * 8 : mr, m4 = m8 + (M - m8) / 4 * 4;
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t kn = std::min(KC, K - k0);
    const float* in = k0 ? partial : init;
    const int64_t ld_in = k0 ? N : ld_init;
    const Lhs a = A.from(k0);
    auto pass = [&](auto& out) {
      for (int64_t c = 0; c < N; c += 2 * V) {
        const bool last_panel = c + 2 * V > N;
        const int64_t bks = B.row;
        const float* b = B.at(k0, c);
        auto columns = [&](auto nv) {
          constexpr int NV = decltype(nv)::value;
          for (int64_t r = 0; r < mr; r += MR) {
            // The next tile's starting values (the weight gradients being
            // added to lie in memory, not cache): fetched while this one runs.
            if (in && r + 2 * MR <= M)
              for (int i = 0; i < MR; ++i)
                for (int v = 0; v < NV; ++v) __builtin_prefetch(in + (r + MR + i) * ld_in + c + v * V);
            Block<MR, NV>(r, c, kn, a, b, bks, in, ld_in, out);
          }
          if constexpr (MR > 8)
            for (int64_t r = mr; r < m8; r += 8) Block<8, NV>(r, c, kn, a, b, bks, in, ld_in, out);
          for (int64_t r = m8; r < m4; r += 4) Block<4, NV>(r, c, kn, a, b, bks, in, ld_in, out);
          for (int64_t r = m4; r < M; ++r) Block<1, NV>(r, c, kn, a, b, bks, in, ld_in, out);
        };
        if (last_panel) columns(std::integral_constant<int, 1>());
        else columns(std::integral_constant<int, 2>());
      }
    };
    if (k0 + kn < K) pass(keep_partial);
    else pass(epi);
  }
}

// Per-thread scratch that grows to the largest size asked for and is kept.
thread_local std::vector<float> scratch;

float* Scratch(int64_t size) {
  if ((int64_t)scratch.size() < size) scratch.resize(size);
  return scratch.data();
}

}  // namespace
}  // namespace faer

#endif  // FAER_JAX_KERNELS_GEMM_H_
