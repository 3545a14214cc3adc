// The pointwise half of a ConvNeXt block, fused, for XLA:CPU (float32):
//
//   y = shortcut + drop_path(gamma * (gelu(x @ w1 + b1) @ w2 + b2))
//
// with x the block's normalised activations (M = N*H*W rows of C channels),
// w1 (C, F), w2 (F, C), F = 4C, GELU the exact erf form, and drop_path
// multiplying example n's rows by mask[n] and dividing by `keep`.
//
// XLA runs this as two library matrix products with separate passes for the
// bias, the GELU, the layer scale and the residual add, each streaming the
// 4C-wide hidden activation through memory (and, in the backward, more passes
// plus transposed copies for the weight gradients). Here the hidden
// activation lives only in a cache-sized tile: each task takes a tile of rows,
// computes a block of hidden columns with the matrix product's register tile,
// applies bias and GELU in registers, and feeds the block straight into the
// second product.
//
//   faer_mlp_forward         y
//   faer_mlp_forward_train   y, and for the backward the pre-activation
//                            p = x @ w1 + b1 (M, F) and z = h @ w2 + b2 (M, C)
//   faer_mlp_backward        from dy: dx (gradient at x), dw1, db1, dw2, db2,
//                            dgamma, summed over this call's rows
//
// Every sum runs in an order fixed by the shapes, not by the thread count:
// weight-gradient blocks are owned by one task at a time and visit the rows
// in order. Built at first use by faer_jax/kernels/__init__.py.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

#include "common.h"
#include "gemm.h"

namespace faer {
namespace {

typedef int32_t ivec __attribute__((vector_size(V * sizeof(int32_t)), aligned(4)));

inline vec splat(float a) { return vec{} + a; }
inline vec vmin(vec a, vec b) { return a < b ? a : b; }
inline vec vmax(vec a, vec b) { return a > b ? a : b; }

// erf(x) as a rational function of x on [-4, 4] (outside, erf is +-1 in
// float32); within 2 ulp-ish of the correctly rounded value (tests compare it
// with std::erf through the kernels).
inline vec Erf(vec x) {
  x = vmin(vmax(x, splat(-4.f)), splat(4.f));
  const vec x2 = x * x;
  vec p = x2 * -2.72614225801306e-10f + 2.77068142495902e-08f;
  p = p * x2 + -2.10102402082508e-06f;
  p = p * x2 + -5.69250639462346e-05f;
  p = p * x2 + -7.34990630326855e-04f;
  p = p * x2 + -2.95459980854025e-03f;
  p = p * x2 + -1.60960333262415e-02f;
  vec q = x2 * -1.45660718464996e-05f + -2.13374055278905e-04f;
  q = q * x2 + -1.68282697438203e-03f;
  q = q * x2 + -7.37332916720468e-03f;
  q = q * x2 + -1.42647390514189e-02f;
  return x * p / q;
}

// exp(x) for x <= 0 (the GELU derivative's Gaussian): 2^n * e^r with
// |r| <= ln2 / 2 and a degree-6 polynomial for e^r; 0 below -87.
inline vec ExpNonPositive(vec x) {
  const vec under = x < -87.f ? splat(0.f) : splat(1.f);
  x = vmax(x, splat(-87.f));
  const vec magic = splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  const vec n = (x * 1.44269504088896341f + magic) - magic;
  const vec r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  vec p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  const ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;
  vec scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale * under;
}

constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

// torch.nn.GELU(): x * 0.5 * (1 + erf(x / sqrt 2)). Its derivative (in the
// backward) is computed as torch's GeluBackward does:
// 0.5 * (1 + erf(x / sqrt 2)) + x * exp(-x^2 / 2) / sqrt(2 pi).
inline vec Gelu(vec x) { return x * 0.5f * (1.f + Erf(x * kSqrtHalf)); }

// The training forward's saved pre-activation and z are read again only by
// the backward, long after they have left the caches. Written with streaming
// stores (when the buffer allows them), they skip the read of each line that
// an ordinary store of a missing line starts first, and do not evict the
// task's tiles: one process, 2 threads, the training forward at C = 128
// (M = 50176, 103 MB of pre-activation) 74.4 -> 67.9 ms, at C = 512 (M = 3136)
// 64.5 -> 62.0 ms. A thread that streamed ends its task with a fence.
#if defined(__AVX512F__)
constexpr uintptr_t kStreamAlign = 64;
inline void Stream(float* p, vec v) {
  __m512 m;
  std::memcpy(&m, &v, sizeof(m));
  _mm512_stream_ps(p, m);
}
#elif defined(__AVX__)
constexpr uintptr_t kStreamAlign = 32;
inline void Stream(float* p, vec v) {  // V = 8 without AVX-512F (16 under FAER_JAX_WIDE_VECTORS: two halves)
  for (int i = 0; i < V; i += 8) {
    __m256 m;
    std::memcpy(&m, reinterpret_cast<const float*>(&v) + i, sizeof(m));
    _mm256_stream_ps(p + i, m);
  }
}
#else
constexpr uintptr_t kStreamAlign = 0;  // no streaming stores: ordinary ones
inline void Stream(float* p, vec v) { store(p, v); }
#endif

inline bool CanStream(const float* p) {
  if constexpr (kStreamAlign == 0) return false;
  else return reinterpret_cast<uintptr_t>(p) % kStreamAlign == 0;
}

// A saved activation's store: streamed where the call allows it.
inline void Save(float* p, vec v, bool stream) {
  if (stream) Stream(p, v);
  else store(p, v);
}

inline void StreamFence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}


// The forward's tasks: contiguous runs of rows, at most `most` rows each (so
// that a task's rows of x, the fc2 accumulator and a hidden block stay in the
// core's L2), a multiple of the pool's threads in number, cut at whole
// register tiles into sizes that differ by at most one tile. (Tasks of one
// size with a short last one left a thread idle for up to a task: at C = 512,
// 3136 rows, 2 threads, 17 tasks of 180 rows and one of 76. One process, 2
// threads, forward: C = 512 63.2-63.7 -> 61.1-62.6 ms, C = 384 35.4-36.2 ->
// 34.5-35.4 ms. Same sums, same order.)
struct RowTasks {
  int64_t M, tasks, tiles;
  RowTasks(int64_t M, int64_t C, int64_t threads) : M(M), tasks(std::max<int64_t>(1, threads)) {
    const int64_t most = C <= 256 ? 96 : 192;
    tiles = (M + MR - 1) / MR;
    while ((tiles + tasks - 1) / tasks * MR > most && tasks < tiles) tasks += std::max<int64_t>(1, threads);
    tasks = std::max<int64_t>(1, std::min(tasks, tiles));
  }
  int64_t begin(int64_t t) const { return std::min(M, t * tiles / tasks * MR); }
  int64_t most() const { return (tiles + tasks - 1) / tasks * MR; }  // rows of the largest task
};

// Hidden columns per block: at most 512 (each block of the fc2 product adds
// into the task's accumulator; 256 took ~1 % longer at C = 512).
inline int64_t HiddenBlock(int64_t F) { return std::min<int64_t>(F, 512); }

// Leading dimension of a row tile copied to scratch: padded by one vector so
// that the MR rows a register tile reads do not share L1 sets (C = 1024
// would put them 4 KB apart).
inline int64_t Padded(int64_t C) { return C + V; }

// The packed weights of the call in progress on this thread (kept: no new
// pages for every call).
thread_local std::vector<float> first_weights, second_weights;

struct Shapes {
  int64_t M, C, F, per_example;
};

bool CheckShapes(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& w1, const ffi::Buffer<ffi::F32>& w2,
                 Shapes* s) {
  auto xd = x.dimensions();
  auto ad = w1.dimensions();
  auto bd = w2.dimensions();
  if (xd.size() < 2 || ad.size() != 2 || bd.size() != 2) return false;
  s->C = xd.back();
  s->F = ad[1];
  s->M = 1;
  for (auto d : xd) s->M *= d;
  s->M /= s->C;
  s->per_example = xd[0] ? s->M / xd[0] : 1;
  return ad[0] == s->C && bd[0] == s->F && bd[1] == s->C && s->C % V == 0 && s->F % V == 0;
}

struct ForwardArgs {
  Shapes s;
  const float *x, *w1, *b1, *w2, *b2, *gamma, *shortcut, *mask;
  float keep;
  float *y, *pre, *z;  // pre and z: training only
  bool stream;         // pre and z written with streaming stores
};

// Rows [r0, r0 + rows) of the forward (rows <= tr, the task size the scratch is sized for).
template <bool kTrain>
void ForwardRows(const ForwardArgs& q, const Operand& W1, const Operand& W2, int64_t r0, int64_t rows, int64_t tr) {
  const int64_t C = q.s.C, F = q.s.F, fb = HiddenBlock(F), ld = Padded(C);
  const bool drop = q.keep != 1.f;
  // This task's rows of x, the fc2 accumulator, one hidden block, and the
  // partial sums of a product between passes.
  float* xr = Scratch(2 * tr * ld + tr * fb + tr * std::max(C, fb));
  float* acc = xr + tr * ld;
  float* h = acc + tr * ld;
  float* partial = h + tr * fb;
  for (int64_t r = 0; r < rows; ++r) std::copy_n(q.x + (r0 + r) * C, C, xr + r * ld);
  for (int64_t f0 = 0; f0 < F; f0 += fb) {
    const int64_t fn = std::min(fb, F - f0);
    Gemm(rows, fn, C, Rows(xr, ld), W1.from(0, f0), nullptr, 0, partial, [&](int64_t r, int64_t c, vec v) {
      v += load(q.b1 + f0 + c);
      if (kTrain) Save(q.pre + (r0 + r) * F + f0 + c, v, q.stream);
      store(h + r * fb + c, Gelu(v));
    });
    Gemm(rows, C, fn, Rows(h, fb), W2.from(f0, 0), f0 ? acc : nullptr, ld, partial,
         [&](int64_t r, int64_t c, vec v) { store(acc + r * ld + c, v); });
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = r0 + r;
    const float m = drop ? q.mask[row / q.s.per_example] : 1.f;
    for (int64_t c = 0; c < C; c += V) {
      const vec zv = load(acc + r * ld + c) + load(q.b2 + c);
      if (kTrain) Save(q.z + row * C + c, zv, q.stream);
      vec u = load(q.gamma + c) * zv;
      if (drop) u = u * m / q.keep;
      store(q.y + row * C + c, load(q.shortcut + row * C + c) + u);
    }
  }
  if (kTrain && q.stream) StreamFence();
}

template <bool kTrain>
ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w1, ffi::Buffer<ffi::F32> b1,
                   ffi::Buffer<ffi::F32> w2, ffi::Buffer<ffi::F32> b2, ffi::Buffer<ffi::F32> gamma,
                   ffi::Buffer<ffi::F32> shortcut, ffi::Buffer<ffi::F32> mask, float keep,
                   ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> pre, ffi::ResultBuffer<ffi::F32> z) {
  ForwardArgs q;
  if (!CheckShapes(x, w1, w2, &q.s))
    return ffi::Error::InvalidArgument("faer_mlp: expected x (..., C), w1 (C, F), w2 (F, C), C and F % 16 == 0");
  q.x = x.typed_data(), q.w1 = w1.typed_data(), q.b1 = b1.typed_data(), q.w2 = w2.typed_data();
  q.b2 = b2.typed_data(), q.gamma = gamma.typed_data(), q.shortcut = shortcut.typed_data();
  q.mask = mask.typed_data(), q.keep = keep, q.y = y->typed_data();
  q.pre = kTrain ? pre->typed_data() : nullptr;
  q.z = kTrain ? z->typed_data() : nullptr;
  // Rows of F and C floats (multiples of 16) keep every vector as aligned as the buffer's start.
  q.stream = kTrain && CanStream(q.pre) && CanStream(q.z);
  const int64_t M = q.s.M, C = q.s.C, F = q.s.F;
  const RowTasks split(M, C, pool.num_threads());
  const auto weights = Pack<2>(pool, {PackJob{q.w1, C, F, F, 1, &first_weights},    // fc1: K = C, N = F
                                     PackJob{q.w2, F, C, C, 1, &second_weights}});  // fc2: K = F, N = C
  const Operand &W1 = weights[0], &W2 = weights[1];
  ParallelFor(pool, split.tasks, [&](int64_t t) {
    const int64_t r0 = split.begin(t);
    ForwardRows<kTrain>(q, W1, W2, r0, split.begin(t + 1) - r0, split.most());
  });
  return ffi::Error::Success();
}

ffi::Error ForwardEval(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w1,
                       ffi::Buffer<ffi::F32> b1, ffi::Buffer<ffi::F32> w2, ffi::Buffer<ffi::F32> b2,
                       ffi::Buffer<ffi::F32> gamma, ffi::Buffer<ffi::F32> shortcut, ffi::Buffer<ffi::F32> mask,
                       float keep, ffi::ResultBuffer<ffi::F32> y) {
  return Forward<false>(pool, x, w1, b1, w2, b2, gamma, shortcut, mask, keep, y, y, y);
}

ffi::Error ForwardTrain(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w1,
                        ffi::Buffer<ffi::F32> b1, ffi::Buffer<ffi::F32> w2, ffi::Buffer<ffi::F32> b2,
                        ffi::Buffer<ffi::F32> gamma, ffi::Buffer<ffi::F32> shortcut, ffi::Buffer<ffi::F32> mask,
                        float keep, ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> pre,
                        ffi::ResultBuffer<ffi::F32> z) {
  return Forward<true>(pool, x, w1, b1, w2, b2, gamma, shortcut, mask, keep, y, pre, z);
}


// The backward. With dyp = dy * mask / keep (the gradient at gamma * z) and
// g = dyp * gamma (at z), for a tile of rows:
//   dh = g @ w2^T; with p the saved pre-activation, D = dh * gelu'(p), Hs = gelu(p);
//   dw1 += x^T D,  dw2 += Hs^T g,  db1 += colsum D,  db2 += colsum g,
//   dgamma += colsum(dyp * z);  dx = D @ w1^T.
// Rows go in super-tiles of S. Per super-tile, phase A has one task per block
// of hidden columns, which owns those columns of dw1, rows of dw2 and entries
// of db1 (and a share of the channels for dgamma and db2); phase B splits the
// super-tile's rows for dx and for the next super-tile's g. Every sum runs in
// an order fixed by the shapes alone (each weight-gradient entry adds the
// super-tiles in order), so results do not depend on the thread count.
// (Splitting by rows instead, with per-chunk partial weight gradients added at
// the end, measured no faster at C = 96 and 128.)
constexpr int64_t S = 240;  // rows per super-tile (20 register tiles)
static_assert(S <= KC, "a super-tile must be one pass of the weight-gradient products");

struct BackwardArgs {
  Shapes s;
  const float *x, *w1, *w2, *gamma, *pre, *z, *dy, *mask;
  float keep;
  float *dx, *dw1, *db1, *dw2, *db2, *dgamma;
};

// g for rows [a, b) of the super-tile at r0, into G, and those rows of x into
// X (both row stride ld: x's own stride, C, puts the rows that a transposed
// read visits 2-4 KB apart at C = 512-1024, all in the same few L1 sets).
void MakeG(const BackwardArgs& q, int64_t r0, int64_t a, int64_t b, float* G, float* X, int64_t ld) {
  const int64_t C = q.s.C;
  const bool drop = q.keep != 1.f;
  for (int64_t r = a; r < b; ++r) {
    const int64_t row = r0 + r;
    const float m = drop ? q.mask[row / q.s.per_example] : 1.f;
    for (int64_t c = 0; c < C; c += V) {
      vec d = load(q.dy + row * C + c);
      if (drop) d = d * m / q.keep;
      store(G + r * ld + c, d * load(q.gamma + c));
    }
    std::copy_n(q.x + row * C, C, X + r * ld);
  }
}

// dh for rows [0, rows) x hidden columns [f0, f0 + fn) of the super-tile at
// r0, then D, into D (row stride ldf, column f0 + c: all hidden columns, for
// the input gradient) and into this task's Dl (row stride ldl, column c), and
// Hs into the task's Hl (likewise). The weight gradients read the task's
// copies: rows ~1 KB apart instead of 8 KB at C = 512, fewer pages per
// register tile (one thread, 13 super-tiles, same process: the weight
// gradients 149.8 -> 144.8 ms at C = 512, 81.1 -> 76.3 ms at C = 384; the
// whole backward on 2 threads in JAX moved within its noise, ~2 %). The
// block of the saved pre-activation is first copied row by row into `partial`
// (rows x fn): read in the epilogue's order, 12 rows at a time, it came from
// memory at a fraction of the bandwidth (the prefetcher does not follow it).
// db1 += the column sums of D, added in the epilogue (which sees each column's
// rows in ascending order).
void HiddenGradient(const BackwardArgs& q, int64_t r0, int64_t rows, int64_t f0, int64_t fn, const float* G,
                    int64_t ld, const Operand& W2T, float* D, int64_t ldf, float* Dl, float* Hl, int64_t ldl,
                    float* partial) {
  const int64_t C = q.s.C, F = q.s.F;
  float* P = partial;
  partial += rows * fn;
  for (int64_t r = 0; r < rows; ++r) std::copy_n(q.pre + (r0 + r) * F + f0, fn, P + r * fn);
  Gemm(rows, fn, C, Rows(G, ld), W2T.from(0, f0), nullptr, 0, partial, [&](int64_t r, int64_t c, vec v) {
    const vec p = load(P + r * fn + c);
    const vec cdf = 0.5f * (1.f + Erf(p * kSqrtHalf));
    const vec d = v * (cdf + p * (ExpNonPositive(p * p * -0.5f) * kInvSqrt2Pi));
    store(D + r * ldf + f0 + c, d);
    store(Dl + r * ldl + c, d);
    store(q.db1 + f0 + c, load(q.db1 + f0 + c) + d);
    store(Hl + r * ldl + c, p * cdf);
  });
}

// The weight gradients of hidden columns [f0, f0 + fn) over rows [0, rows) of
// the super-tile at r0, added in place to dw1 (C x F) and dw2 (F x C), in one
// pass over the rows: dw1 and dw2 (4 MB each at C = 512) come from memory and
// go back once per super-tile. (In two halves of 120 rows instead, a B
// panel and the A rows of a register tile fit in L1 together, but the
// read-modify-write happened twice: the whole backward, 2 threads, the two
// alternated in one process, took 2-5 % longer at C = 96 ... 512, e.g.
// 151.9 against 145.0 ms at C = 512. Same sums, same order.)
void WeightGradients(const BackwardArgs& q, int64_t rows, int64_t f0, int64_t fn, const float* G, const float* X,
                     int64_t ld, const float* Dl, const float* Hl, int64_t ldl, float* dw1, float* dw2) {
  const int64_t C = q.s.C, F = q.s.F;
  Gemm(C, fn, rows, Lhs{X, 1, ld}, Plain(Dl, ldl), dw1 + f0, F, nullptr,
       [&](int64_t r, int64_t c, vec v) { store(dw1 + r * F + f0 + c, v); });
  Gemm(fn, C, rows, Lhs{Hl, 1, ldl}, Plain(G, ld), dw2 + f0 * C, C, nullptr,
       [&](int64_t r, int64_t c, vec v) { store(dw2 + (f0 + r) * C + c, v); });
}

// dgamma and db2 over rows [0, rows) of the super-tile at r0, channels c0, c0 + step, ...
void ScaleGradients(const BackwardArgs& q, int64_t r0, int64_t rows, const float* G, int64_t ld, int64_t c0,
                    int64_t step, float* dgamma, float* db2) {
  const int64_t C = q.s.C;
  const bool drop = q.keep != 1.f;
  for (int64_t c = c0; c < C; c += step) {
    vec dg = load(dgamma + c), db = load(db2 + c);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t row = r0 + r;
      vec d = load(q.dy + row * C + c);
      if (drop) d = d * q.mask[row / q.s.per_example] / q.keep;
      dg += d * load(q.z + row * C + c);
      db += load(G + r * ld + c);
    }
    store(dgamma + c, dg);
    store(db2 + c, db);
  }
}

// dx for rows [a, a + n) of the super-tile at r0.
void InputGradient(const BackwardArgs& q, int64_t r0, int64_t a, int64_t n, const float* D, int64_t ldf,
                   const Operand& W1T, float* partial) {
  const int64_t C = q.s.C, F = q.s.F;
  Gemm(n, C, F, Rows(D + a * ldf, ldf), W1T, nullptr, 0, partial,
       [&](int64_t r, int64_t c, vec v) { store(q.dx + (r0 + a + r) * C + c, v); });
}

void BackwardByHiddenBlocks(ffi::ThreadPool& pool, const BackwardArgs& q, const Operand& W1T, const Operand& W2T) {
  const int64_t M = q.s.M, C = q.s.C, F = q.s.F;
  std::fill_n(q.dw1, C * F, 0.f);
  std::fill_n(q.db1, F, 0.f);
  std::fill_n(q.dw2, F * C, 0.f);
  std::fill_n(q.db2, C, 0.f);
  std::fill_n(q.dgamma, C, 0.f);
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // Hidden blocks: multiples of 32, at most 256 wide, at least two per thread where F allows.
  const int64_t fb = std::min<int64_t>(256, std::max<int64_t>(2 * V, F / (2 * threads) / (2 * V) * (2 * V)));
  const int64_t fblocks = (F + fb - 1) / fb;
  const int64_t ld = Padded(C), ldf = Padded(F);
  thread_local std::vector<float> buffers;
  buffers.resize(2 * S * ld + S * ldf);
  float *G = buffers.data(), *X = G + S * ld, *D = X + S * ld;
  // Row groups of phase B: as many as threads, whole register tiles.
  const int64_t group = (S / threads + MR - 1) / MR * MR;
  const int64_t groups = (S + group - 1) / group;
  const int64_t first = std::min(S, M);
  ParallelFor(pool, groups, [&](int64_t t) { MakeG(q, 0, t * group, std::min(first, (t + 1) * group), G, X, ld); });
  for (int64_t r0 = 0; r0 < M; r0 += S) {
    const int64_t rows = std::min(S, M - r0);
    ParallelFor(pool, fblocks, [&](int64_t t) {
      const int64_t f0 = t * fb, fn = std::min(fb, F - f0);
      const int64_t ldl = fn + V;
      float* scratch = Scratch(2 * rows * fn + 2 * rows * ldl);
      float *Dl = scratch + 2 * rows * fn, *Hl = Dl + rows * ldl;
      HiddenGradient(q, r0, rows, f0, fn, G, ld, W2T, D, ldf, Dl, Hl, ldl, scratch);
      WeightGradients(q, rows, f0, fn, G, X, ld, Dl, Hl, ldl, q.dw1, q.dw2);
      ScaleGradients(q, r0, rows, G, ld, t * V, fblocks * V, q.dgamma, q.db2);
    });
    const int64_t next = r0 + S, next_rows = std::max<int64_t>(0, std::min(S, M - next));
    ParallelFor(pool, groups, [&](int64_t t) {
      const int64_t a = t * group, n = std::max<int64_t>(0, std::min(group, rows - a));
      if (n > 0) InputGradient(q, r0, a, n, D, ldf, W1T, Scratch(n * C));
      if (next_rows) MakeG(q, next, a, std::min(next_rows, a + group), G, X, ld);
    });
  }
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w1,
                    ffi::Buffer<ffi::F32> w2, ffi::Buffer<ffi::F32> gamma, ffi::Buffer<ffi::F32> pre,
                    ffi::Buffer<ffi::F32> z, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> mask, float keep,
                    ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dw1, ffi::ResultBuffer<ffi::F32> db1,
                    ffi::ResultBuffer<ffi::F32> dw2, ffi::ResultBuffer<ffi::F32> db2,
                    ffi::ResultBuffer<ffi::F32> dgamma) {
  BackwardArgs q;
  if (!CheckShapes(x, w1, w2, &q.s) || pre.element_count() != q.s.M * q.s.F ||
      z.element_count() != q.s.M * q.s.C || dy.element_count() != q.s.M * q.s.C)
    return ffi::Error::InvalidArgument("faer_mlp_backward: expected x, z, dy (..., C), pre (..., F), w1 (C, F), "
                                       "w2 (F, C), C and F % 16 == 0");
  q.x = x.typed_data(), q.w1 = w1.typed_data(), q.w2 = w2.typed_data(), q.gamma = gamma.typed_data();
  q.pre = pre.typed_data(), q.z = z.typed_data(), q.dy = dy.typed_data(), q.mask = mask.typed_data();
  q.keep = keep;
  q.dx = dx->typed_data(), q.dw1 = dw1->typed_data(), q.db1 = db1->typed_data();
  q.dw2 = dw2->typed_data(), q.db2 = db2->typed_data(), q.dgamma = dgamma->typed_data();
  const int64_t C = q.s.C, F = q.s.F;
  const auto weights = Pack<2>(pool, {PackJob{q.w2, C, F, 1, C, &first_weights},    // dh = g w2^T: K = C, N = F
                                     PackJob{q.w1, F, C, 1, F, &second_weights}});  // dx = D w1^T: K = F, N = C
  const Operand &W2T = weights[0], &W1T = weights[1];
  BackwardByHiddenBlocks(pool, q, W1T, W2T);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace faer

#define FAER_MLP_FORWARD_ARGS                                    \
  ffi::Ffi::Bind()                                               \
      .Ctx<ffi::ThreadPool>()                                    \
      .Arg<ffi::Buffer<ffi::F32>>() /* x (..., C) */             \
      .Arg<ffi::Buffer<ffi::F32>>() /* w1 (C, F) */              \
      .Arg<ffi::Buffer<ffi::F32>>() /* b1 (F) */                 \
      .Arg<ffi::Buffer<ffi::F32>>() /* w2 (F, C) */              \
      .Arg<ffi::Buffer<ffi::F32>>() /* b2 (C) */                 \
      .Arg<ffi::Buffer<ffi::F32>>() /* gamma (C) */              \
      .Arg<ffi::Buffer<ffi::F32>>() /* shortcut (..., C) */      \
      .Arg<ffi::Buffer<ffi::F32>>() /* drop-path mask (N) */     \
      .Attr<float>("keep")                                       \
      .Ret<ffi::Buffer<ffi::F32>>() /* y (..., C) */

XLA_FFI_DEFINE_HANDLER_SYMBOL(FaerMlpForward, faer::ForwardEval, FAER_MLP_FORWARD_ARGS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(FaerMlpForwardTrain, faer::ForwardTrain,
                              FAER_MLP_FORWARD_ARGS
                                  .Ret<ffi::Buffer<ffi::F32>>()   // pre-activation (..., F)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // z (..., C)

XLA_FFI_DEFINE_HANDLER_SYMBOL(FaerMlpBackward, faer::Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x (..., C)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w1 (C, F)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w2 (F, C)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // gamma (C)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // pre-activation (..., F)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // z (..., C)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy (..., C)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // drop-path mask (N)
                                  .Attr<float>("keep")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dx (..., C)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dw1 (C, F)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // db1 (F)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dw2 (F, C)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // db2 (C)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dgamma (C)
