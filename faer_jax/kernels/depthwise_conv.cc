// 7x7 depthwise convolution (stride 1, zero padding 3, NHWC, float32) for XLA:CPU.
//
// XLA:CPU has no fast depthwise convolution: its grouped convolution runs the
// conv as a dense one (C times the work), and the best pure-XLA formulation
// (49 shifted multiply-adds, faer_jax.models.layers.depthwise_conv_shifts) is
// memory-bound and gets fused into every consumer of its output, i.e. computed
// several times. These kernels read each input once per output tile, keep the
// partial sums in registers and skip the zero padding, like the direct
// convolutions oneDNN runs for PyTorch.
//
// Four XLA FFI handlers (jax.ffi), each over a batch of N examples:
//   faer_dw7_forward        y[n,h,w,c]  = sum_ij x[n,h+i-3,w+j-3,c] * k[i,j,c]
//                           (also the input gradient, called with k[::-1, ::-1])
//   faer_dw7_kernel_grad    dk[n,i,j,c] = sum_hw x[n,h+i-3,w+j-3,c] * g[n,h,w,c]
//                           (per example; the caller sums over n, so the batch
//                           axis can be sharded like any other)
//   faer_dw7_norm_forward   LayerNorm over c of y + bias, with each pixel's mean and 1/std
//   faer_dw7_norm_backward  its gradient at y, and per-row partial sums for the parameters
// Sums run in a fixed order that does not depend on the thread count.
// Built at first use by faer_jax/kernels/__init__.py.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common.h"

namespace faer {
namespace {

// Output pixels per register tile: their accumulators, the kernel row's 7
// vectors and the input vector take 24 of AVX-512's 32 registers (16 pixels)
// or all 16 of AVX2's (8 pixels).
constexpr int kTilePixels = V == 16 ? 16 : 8;

// Valid kernel offsets for output position `o` on an axis of length `len`.
inline int first_tap(int o) { return std::max(0, P - o); }
inline int last_tap(int o, int len) { return std::min(K - 1, len - 1 - o + P); }

// fn(std::integral_constant<int, n>()) for a runtime n in [1, T]: the tile
// functions below take their width as a template argument (registers).
template <int T, class Fn>
inline void WithTile(int n, Fn&& fn) {
  if (n == T) fn(std::integral_constant<int, T>());
  else if constexpr (T > 1) WithTile<T - 1>(n, fn);
}

// The row window of output pixels [w, w + T): each input pixel of the row
// (xr: the row at the current channels) that a tap reaches, loaded once, handed
// to fn(t, j, x) for every output pixel w + t it reaches through tap column j,
// in ascending input pixel; pixels in the zero padding are skipped. Unrolled
// fully, so t and j are constants in fn.
template <int T, class Fn>
inline void ForWindow(const float* xr, int W, int C, int w, Fn&& fn) {
#pragma GCC unroll 24
  for (int s = 0; s < T + K - 1; ++s) {
    const int p = w - P + s;  // input pixel
    if (p < 0 || p >= W) continue;
    const vec xv = load(xr + (int64_t)p * C);
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t)
      if (s - t >= 0 && s - t < K) fn(t, s - t, xv);
  }
}

// Output pixels [w, w + T) of row h (T <= W - w), channel vectors [0, cv): a
// register tile of T pixels x V channels. Per kernel row, its 7 vectors are
// loaded once and each input pixel of the row once, then added into every
// output pixel it reaches; input pixels in the zero padding are skipped. Each
// output sums its taps in the order (i, j), as a plain loop would.
template <int T>
__attribute__((noinline)) void ForwardTile(const float* x, const float* k, float* y, int W, int C, int h, int i0,
                                           int i1, int w, int cv) {
  for (int c = 0; c < cv; c += V) {
    vec acc[T] = {};
    for (int i = i0; i <= i1; ++i) {
      const float* xr = x + ((int64_t)(h + i - P) * W) * C + c;
      const float* kr = k + (int64_t)i * K * C + c;
      vec kv[K];
#pragma GCC unroll 7
      for (int j = 0; j < K; ++j) kv[j] = load(kr + (int64_t)j * C);
      ForWindow<T>(xr, W, C, w, [&](int t, int j, vec xv) { acc[t] += xv * kv[j]; });
    }
    for (int t = 0; t < T; ++t) store(y + (int64_t)(w + t) * C + c, acc[t]);
  }
}

// Output row h of one example (x: H x W x C; k: K x K x C) into y (W x C).
// One thread, 8 examples: 56x56x128 9.9 -> 3.7 ms, 14x14x512 3.7 -> 0.86 ms,
// 7x7x1024 10.2 -> 1.9 ms against the previous 4-pixel tiles (which reloaded
// each input vector for every tap and ran the border pixels, all of them on a
// 7x7 map, one accumulator at a time); 8- and 12-pixel tiles were in between.
void ForwardRow(const float* x, const float* k, float* y, int H, int W, int C, int h) {
  const int i0 = first_tap(h), i1 = last_tap(h, H);
  const int cv = C - C % V;
  constexpr int T = kTilePixels;
  for (int w = 0; w < W; w += T)
    WithTile<T>(std::min(T, W - w),
                [&](auto n) { ForwardTile<decltype(n)::value>(x, k, y, W, C, h, i0, i1, w, cv); });
  // Channels past the last full vector: scalar.
  for (int w = 0; w < W && cv < C; ++w) {
    const int j0 = first_tap(w), j1 = last_tap(w, W);
    for (int c = cv; c < C; ++c) {
      float acc = 0.f;
      for (int i = i0; i <= i1; ++i)
        for (int j = j0; j <= j1; ++j)
          acc += x[((int64_t)(h + i - P) * W + (w + j - P)) * C + c] * k[((int64_t)i * K + j) * C + c];
      y[(int64_t)w * C + c] = acc;
    }
  }
}

// dk[i, 0..6, c:c+V] += sum over output pixels [w, w + T) of row h of
// x[h+i-3, w+t+j-3] * g[h, w+t] (xr, gr: those rows at channel c): the T
// gradient vectors stay in registers and each input vector is loaded once.
// Each dk entry adds its terms in ascending w, as a plain loop would.
template <int T>
__attribute__((noinline)) void KernelGradTile(const float* xr, const float* gr, int W, int C, int w, float* dk) {
  vec acc[K], gv[T];
#pragma GCC unroll 7
  for (int j = 0; j < K; ++j) acc[j] = load(dk + j * V);
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t) gv[t] = load(gr + (int64_t)(w + t) * C);
  ForWindow<T>(xr, W, C, w, [&](int t, int j, vec xv) { acc[j] += xv * gv[t]; });
#pragma GCC unroll 7
  for (int j = 0; j < K; ++j) store(dk + j * V, acc[j]);
}

// dk[i, j, c0:c0+V] (or the scalar tail when c0 >= cv) of one example.
// (16-pixel tiles, against one pixel at a time with 8 loads per 7 multiply-adds;
// one thread, 8 examples: 56x56x128 8.5 -> 7.1 ms, 28x28x256 3.9 -> 2.6 ms,
// 14x14x512 2.25 -> 1.75 ms; same sums.)
void KernelGradChunk(const float* x, const float* g, float* dk, int H, int W, int C, int c0) {
  const int cv = C - C % V;
  if (c0 < cv) {
    constexpr int T = kTilePixels;
    for (int i = 0; i < K; ++i) {
      float acc[K * V] = {};  // dk[i, 0..6, c0:c0+V]
      // Output rows h that see input row h + i - P.
      const int h0 = std::max(0, P - i), h1 = std::min(H - 1, H - 1 + P - i);
      for (int h = h0; h <= h1; ++h) {
        const float* xr = x + ((int64_t)(h + i - P) * W) * C + c0;
        const float* gr = g + ((int64_t)h * W) * C + c0;
        for (int w = 0; w < W; w += T)
          WithTile<T>(std::min(T, W - w), [&](auto n) { KernelGradTile<decltype(n)::value>(xr, gr, W, C, w, acc); });
      }
      for (int j = 0; j < K; ++j) std::copy_n(acc + j * V, V, dk + ((int64_t)i * K + j) * C + c0);
    }
  } else {
    for (int c = cv; c < C; ++c)
      for (int i = 0; i < K; ++i)
        for (int j = 0; j < K; ++j) {
          float acc = 0.f;
          for (int h = std::max(0, P - i); h <= std::min(H - 1, H - 1 + P - i); ++h)
            for (int w = std::max(0, P - j); w <= std::min(W - 1, W - 1 + P - j); ++w)
              acc += x[((int64_t)(h + i - P) * W + (w + j - P)) * C + c] * g[((int64_t)h * W + w) * C + c];
          dk[((int64_t)i * K + j) * C + c] = acc;
        }
  }
}

ffi::Error CheckShapes(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& k) {
  auto xd = x.dimensions();
  auto kd = k.dimensions();
  if (xd.size() != 4) return ffi::Error::InvalidArgument("faer_dw7: input must be NHWC (rank 4)");
  if (kd.size() != 3 || kd[0] != K || kd[1] != K || kd[2] != xd[3])
    return ffi::Error::InvalidArgument("faer_dw7: kernel must be (7, 7, C)");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                   ffi::ResultBuffer<ffi::F32> y) {
  if (auto e = CheckShapes(x, k); e.failure()) return e;
  auto d = x.dimensions();
  const int64_t N = d[0];
  const int H = d[1], W = d[2], C = d[3];
  const float* xp = x.typed_data();
  const float* kp = k.typed_data();
  float* yp = y->typed_data();
  const int64_t image = (int64_t)H * W * C;
  ParallelFor(pool, N * H, [&](int64_t t) {
    const int64_t n = t / H;
    const int h = (int)(t % H);
    ForwardRow(xp + n * image, kp, yp + n * image + (int64_t)h * W * C, H, W, C, h);
  });
  return ffi::Error::Success();
}

ffi::Error KernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                      ffi::ResultBuffer<ffi::F32> dk) {
  auto d = x.dimensions();
  if (d.size() != 4 || g.dimensions().size() != 4) return ffi::Error::InvalidArgument("faer_dw7: NHWC inputs");
  for (int a = 0; a < 4; ++a)
    if (g.dimensions()[a] != d[a]) return ffi::Error::InvalidArgument("faer_dw7: x and g differ in shape");
  const int64_t N = d[0];
  const int H = d[1], W = d[2], C = d[3];
  const int cv = C - C % V;
  const int chunks = cv / V + (cv < C ? 1 : 0);
  const float* xp = x.typed_data();
  const float* gp = g.typed_data();
  float* dkp = dk->typed_data();
  const int64_t image = (int64_t)H * W * C;
  ParallelFor(pool, N * chunks, [&](int64_t t) {
    const int64_t n = t / chunks;
    KernelGradChunk(xp + n * image, gp + n * image, dkp + n * K * K * C, H, W, C, (int)(t % chunks) * V);
  });
  return ffi::Error::Success();
}


// The fused ConvNeXt pair: z = LayerNorm(dwconv(x) + bias) over channels, with
// the LayerNorm's scale and shift; mean((y - mean)^2) as torch computes it.
// Also returns each pixel's mean and 1/sqrt(var + eps) for the backward pass.
// y (one row, W x C) becomes y + bias. The channel sums run over 16 lanes,
// then across them (SumChannels): the scalar sums they replace were one long
// dependency chain each and took longer than the convolution (16x14x14x512,
// 2 threads: 2.15 ms against the conv's 0.65).
void NormalizeRow(float* y, const float* bias, const float* scale, const float* shift, float eps, int W, int C,
                  float* z, float* mean_out, float* rstd_out) {
  for (int w = 0; w < W; ++w) {
    float* yp = y + (int64_t)w * C;
    const float mean = SumChannels(C, [&](int c, auto lanes) {
                         using T = decltype(lanes);
                         const T v = load<T>(yp + c) + load<T>(bias + c);
                         store(yp + c, v);
                         return v;
                       }) / C;
    const float sq = SumChannels(C, [&](int c, auto lanes) {
      using T = decltype(lanes);
      const T d = load<T>(yp + c) - mean;
      return d * d;
    });
    const float rstd = 1.f / std::sqrt(sq / C + eps);
    float* zp = z + (int64_t)w * C;
    ForChannels(C, [&](int c, auto lanes) {
      using T = decltype(lanes);
      store(zp + c, (load<T>(yp + c) - mean) * rstd * load<T>(scale + c) + load<T>(shift + c));
    });
    mean_out[w] = mean;
    rstd_out[w] = rstd;
  }
}

thread_local std::vector<float> row_buffer;

float* RowBuffer(int64_t size) {
  if ((int64_t)row_buffer.size() < size) row_buffer.resize(size);
  return row_buffer.data();
}

ffi::Error NormForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                       ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> shift,
                       float eps, ffi::ResultBuffer<ffi::F32> z, ffi::ResultBuffer<ffi::F32> mean,
                       ffi::ResultBuffer<ffi::F32> rstd) {
  if (auto e = CheckShapes(x, k); e.failure()) return e;
  auto d = x.dimensions();
  const int64_t N = d[0];
  const int H = d[1], W = d[2], C = d[3];
  const int64_t image = (int64_t)H * W * C;
  const float *xp = x.typed_data(), *kp = k.typed_data();
  const float *bp = bias.typed_data(), *sp = scale.typed_data(), *tp = shift.typed_data();
  float *zp = z->typed_data(), *mp = mean->typed_data(), *rp = rstd->typed_data();
  ParallelFor(pool, N * H, [&](int64_t t) {
    const int64_t n = t / H;
    const int h = (int)(t % H);
    float* row = RowBuffer((int64_t)W * C);
    ForwardRow(xp + n * image, kp, row, H, W, C, h);
    const int64_t at = (n * H + h) * W;
    NormalizeRow(row, bp, sp, tp, eps, W, C, zp + at * C, mp + at, rp + at);
  });
  return ffi::Error::Success();
}

// Given dz = d(loss)/dz, the gradient at y = dwconv(x) + bias:
//   dy = rstd * (dz*scale - mean_c(dz*scale) - xhat * mean_c(dz*scale*xhat)),
// and per (example, row) partial sums of dz*xhat (scale), dz (shift) and dy
// (bias); the caller sums them. y is recomputed from x rather than stored.
ffi::Error NormBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                        ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> mean,
                        ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> dz, ffi::ResultBuffer<ffi::F32> dy,
                        ffi::ResultBuffer<ffi::F32> partials) {
  if (auto e = CheckShapes(x, k); e.failure()) return e;
  auto d = x.dimensions();
  const int64_t N = d[0];
  const int H = d[1], W = d[2], C = d[3];
  const int64_t image = (int64_t)H * W * C;
  const float *xp = x.typed_data(), *kp = k.typed_data(), *bp = bias.typed_data(), *sp = scale.typed_data();
  const float *mp = mean.typed_data(), *rp = rstd.typed_data(), *gp = dz.typed_data();
  float *dyp = dy->typed_data(), *pp = partials->typed_data();
  ParallelFor(pool, N * H, [&](int64_t t) {
    const int64_t n = t / H;
    const int h = (int)(t % H);
    float* row = RowBuffer((int64_t)W * C);
    ForwardRow(xp + n * image, kp, row, H, W, C, h);
    float* dscale = pp + t * 3 * C;
    float* dshift = dscale + C;
    float* dbias = dshift + C;
    for (int c = 0; c < 3 * C; ++c) dscale[c] = 0.f;
    for (int w = 0; w < W; ++w) {
      const int64_t at = (n * H + h) * W + w;
      const float m = mp[at], r = rp[at];
      const float* y = row + (int64_t)w * C;
      const float* g = gp + at * C;
      auto xhat = [&](int c, auto lanes) {
        using T = decltype(lanes);
        return (load<T>(y + c) + load<T>(bp + c) - m) * r;
      };
      const float a = SumChannels(C, [&](int c, auto lanes) {
                        using T = decltype(lanes);
                        return load<T>(g + c) * load<T>(sp + c);
                      }) / C;
      const float b = SumChannels(C, [&](int c, auto lanes) {
                        using T = decltype(lanes);
                        return load<T>(g + c) * load<T>(sp + c) * xhat(c, lanes);
                      }) / C;
      float* out = dyp + at * C;
      ForChannels(C, [&](int c, auto lanes) {
        using T = decltype(lanes);
        const T gc = load<T>(g + c), xh = xhat(c, lanes);
        const T v = r * (gc * load<T>(sp + c) - a - xh * b);
        store(out + c, v);
        store(dscale + c, load<T>(dscale + c) + gc * xh);
        store(dshift + c, load<T>(dshift + c) + gc);
        store(dbias + c, load<T>(dbias + c) + v);
      });
    }
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace faer

using faer::Forward;
using faer::KernelGrad;
using faer::NormBackward;
using faer::NormForward;

XLA_FFI_DEFINE_HANDLER_SYMBOL(FaerDw7Forward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FaerDw7KernelGrad, KernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FaerDw7NormForward, NormForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // kernel
                                  .Arg<ffi::Buffer<ffi::F32>>()  // conv bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // norm scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // norm shift
                                  .Attr<float>("eps")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // z
                                  .Ret<ffi::Buffer<ffi::F32>>()   // mean
                                  .Ret<ffi::Buffer<ffi::F32>>());  // rstd

XLA_FFI_DEFINE_HANDLER_SYMBOL(FaerDw7NormBackward, NormBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // kernel
                                  .Arg<ffi::Buffer<ffi::F32>>()  // conv bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // norm scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // rstd
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dz
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dy
                                  .Ret<ffi::Buffer<ffi::F32>>());  // partial sums (N, H, 3, C)
