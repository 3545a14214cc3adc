// CC Attention's 7x7 grouped convolution (stride 1, zero padding 3, NHWC,
// float32) for XLA:CPU: the forward and the kernel gradient. The input
// gradient is the forward of the output gradient with the kernel flipped and
// its in/out channels swapped (built by the caller).
//
// CC Attention runs this conv on the last stage's small map (7x7 at 224 px),
// where 43 % of a 7x7 kernel's taps fall on the zero padding; these kernels
// skip them exactly. XLA:CPU instead runs a grouped conv as dense ones over the
// padded input (see faer_jax.models.layers.GroupedConv).
//
//   faer_gconv7_forward      y[n,h,w,g*O+o]  = sum_{i,j,c} x[n,h+i-3,w+j-3,g*I+c] * k[i,j,c,g*O+o]
//   faer_gconv7_kernel_grad  dk[i,j,c,g*O+o] = sum_{n,h,w} x[n,h+i-3,w+j-3,g*I+c] * dy[n,h,w,g*O+o]
//                            (over this call's batch; the caller sums over devices)
//
// x: (N, H, W, G*I), k: (7, 7, I, G*O) as flax's nn.Conv stores it; O must be
// a multiple of 16. Sums run in a fixed order, whatever the thread count.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"

namespace faer {
namespace {

// The forward as a matrix product per tap: for each output position (h, w)
// where tap (i, j) lands inside the input, acc[(h, w, n), o] += x[n, h+i-3,
// w+j-3, g*I + c] * k[i, j, c, g*O + o]. Pixels are ordered (h, w, n), so a
// register tile of TN examples at one position shares the tap's validity and
// the padding is skipped exactly. A task owns OB output channels of a group
// (it owned 2V, and read the group's whole input again for every 2V); the
// kernel's block of CB input x OB output channels is packed contiguous (read in
// place, its rows lie CO floats apart: 4 KB at base, all in one set of L1), and
// each tile of TN examples' input serves the block's register tiles (TV*V wide)
// in turn. Tiles of 8 examples (16 accumulators; AVX2: 6 and 12) and blocks of
// 128 input channels (Zen 4, 16x7x7x1024: 118 ms with 4 and 64, 70 ms with 8 and
// 128; 12 examples 96 ms, 256 channels 79 ms). 64 output channels: the forward
// alone at 16x7x7x768 and 16x7x7x1024, 4 groups, 2 Zen 1 threads (medians of 9,
// three rounds): 119-128 -> 112-119 ms and 248-264 -> 196-207 ms; OB of 32-128
// and CB of 64-128 within the noise of each other, CB 32 slower. The blocking
// keeps the sums and their order: the same bits whatever OB and CB.
constexpr int CB = 128;
constexpr int OB = 64;
constexpr int kTileExamples = V == 16 ? 8 : 6;  // AVX2: 12 accumulators of its 16 registers

template <int TN, int TV>
__attribute__((noinline)) void ForwardTile(const float* x, int64_t x_example, const float* k, int cn, float* acc_out,
                                           int64_t acc_example) {
  vec acc[TN][TV];
  for (int p = 0; p < TN; ++p)
    for (int v = 0; v < TV; ++v) acc[p][v] = load(acc_out + p * acc_example + v * V);
  for (int c = 0; c < cn; ++c) {
    vec kv[TV];
    for (int v = 0; v < TV; ++v) kv[v] = load(k + (c * TV + v) * V);  // packed: row c's TV vectors
    for (int p = 0; p < TN; ++p) {
      const float xs = x[p * x_example + c];
      for (int v = 0; v < TV; ++v) acc[p][v] += kv[v] * xs;
    }
  }
  for (int p = 0; p < TN; ++p)
    for (int v = 0; v < TV; ++v) store(acc_out + p * acc_example + v * V, acc[p][v]);
}

// TN examples at one position, all ov output vectors of the block: tiles of 2
// vectors, then one. k is the block packed by PackKernel.
template <int TN>
void ForwardTiles(const float* x, int64_t x_example, const float* k, int cn, float* acc, int ov) {
  int v = 0;
  for (; v + 2 <= ov; v += 2) ForwardTile<TN, 2>(x, x_example, k + cn * v * V, cn, acc + v * V, ov * V);
  if (v < ov) ForwardTile<TN, 1>(x, x_example, k + cn * v * V, cn, acc + v * V, ov * V);
}

// The kernel block k[c, v*V ...] (cn rows of ov vectors, rows k_row apart) as
// ForwardTiles reads it: each tile's columns (2 vectors, or the last 1) for
// rows 0, 1, ... contiguous.
void PackKernel(const float* k, int64_t k_row, int cn, int ov, float* packed) {
  for (int v = 0; v < ov; v += 2) {
    const int tv = std::min(2, ov - v);
    float* out = packed + (int64_t)cn * v * V;
    for (int c = 0; c < cn; ++c)
      for (int u = 0; u < tv; ++u) store(out + (c * tv + u) * V, load(k + c * k_row + (v + u) * V));
  }
}

void ForwardBlock(const float* x, int64_t N, int H, int W, int C, const float* k, int cn, int i, int j, float* acc,
                  int ov) {
  // acc: (H, W, N, ov*V) for this output block; x points at channel g*I + c0 of example 0.
  const int h0 = std::max(0, P - i), h1 = std::min(H - 1, H - 1 + P - i);
  const int w0 = std::max(0, P - j), w1 = std::min(W - 1, W - 1 + P - j);
  const int64_t x_example = (int64_t)H * W * C, acc_example = (int64_t)ov * V;
  for (int h = h0; h <= h1; ++h)
    for (int w = w0; w <= w1; ++w) {
      const float* xp = x + ((int64_t)(h + i - P) * W + (w + j - P)) * C;
      float* ap = acc + ((int64_t)h * W + w) * N * acc_example;
      int64_t n = 0;
      for (; n + kTileExamples <= N; n += kTileExamples)
        ForwardTiles<kTileExamples>(xp + n * x_example, x_example, k, cn, ap + n * acc_example, ov);
      for (; n + 4 <= N; n += 4) ForwardTiles<4>(xp + n * x_example, x_example, k, cn, ap + n * acc_example, ov);
      switch (N - n) {
        case 3: ForwardTiles<3>(xp + n * x_example, x_example, k, cn, ap + n * acc_example, ov); break;
        case 2: ForwardTiles<2>(xp + n * x_example, x_example, k, cn, ap + n * acc_example, ov); break;
        case 1: ForwardTiles<1>(xp + n * x_example, x_example, k, cn, ap + n * acc_example, ov); break;
        default: break;
      }
    }
}

thread_local std::vector<float> accumulator;
thread_local std::vector<float> packed_kernel;

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k, int64_t groups,
                   ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto kd = k.dimensions();
  if (xd.size() != 4 || kd.size() != 4 || kd[0] != K || kd[1] != K || groups <= 0 || xd[3] != kd[2] * groups ||
      kd[3] % groups != 0 || (kd[3] / groups) % V != 0)
    return ffi::Error::InvalidArgument("faer_gconv7: expected x (N,H,W,G*I), kernel (7,7,I,G*O), O % 16 == 0");
  const int64_t N = xd[0];
  const int H = xd[1], W = xd[2], C = xd[3];
  const int I = kd[2], G = groups, CO = kd[3], O = CO / G;
  const int oblocks = (O + OB - 1) / OB;
  const float* xp = x.typed_data();
  const float* kp = k.typed_data();
  float* yp = y->typed_data();
  // One task per (group, block of OB output channels).
  ParallelFor(pool, (int64_t)G * oblocks, [&](int64_t t) {
    const int g = (int)(t / oblocks);
    const int o0 = (int)(t % oblocks) * OB;
    const int ov = std::min(OB, O - o0) / V;
    const int64_t size = N * H * W * ov * V;
    if ((int64_t)accumulator.size() < size) accumulator.resize(size);
    float* acc = accumulator.data();
    std::fill(acc, acc + size, 0.f);
    packed_kernel.resize(CB * OB);
    for (int i = 0; i < K; ++i)
      for (int j = 0; j < K; ++j)
        for (int c0 = 0; c0 < I; c0 += CB) {
          const int cn = std::min(CB, I - c0);
          PackKernel(kp + ((int64_t)(i * K + j) * I + c0) * CO + (int64_t)g * O + o0, CO, cn, ov,
                     packed_kernel.data());
          ForwardBlock(xp + (int64_t)g * I + c0, N, H, W, C, packed_kernel.data(), cn, i, j, acc, ov);
        }
    for (int h = 0; h < H; ++h)
      for (int w = 0; w < W; ++w)
        for (int64_t n = 0; n < N; ++n)
          std::copy_n(acc + (((int64_t)h * W + w) * N + n) * ov * V, ov * V,
                      yp + ((n * H + h) * W + w) * CO + (int64_t)g * O + o0);
  });
  return ffi::Error::Success();
}

// dk[i, j, c0:c0+TC, g*O + o : +TV*V] for one tap (i, j), over example n: a
// register tile of TC input channels x TV output vectors, added to the sums so
// far in acc_io, over the positions where the tap is inside the input.
template <int TC, int TV>
__attribute__((noinline)) void KernelGradTile(const float* x, const float* dy, int64_t n, int H, int W, int C,
                                              int CO, int i, int j, int c0, int o0, float* acc_io) {
  vec acc[TC][TV];
  for (int c = 0; c < TC; ++c)
    for (int v = 0; v < TV; ++v) acc[c][v] = load(acc_io + (c * TV + v) * V);
  const int h0 = std::max(0, P - i), h1 = std::min(H - 1, H - 1 + P - i);
  const int w0 = std::max(0, P - j), w1 = std::min(W - 1, W - 1 + P - j);
  for (int h = h0; h <= h1; ++h)
    for (int w = w0; w <= w1; ++w) {
      const float* gp = dy + ((n * H + h) * W + w) * CO + o0;
      const float* xr = x + ((n * H + h + i - P) * W + (w + j - P)) * C + c0;
      vec gv[TV];
      for (int v = 0; v < TV; ++v) gv[v] = load(gp + v * V);
      for (int c = 0; c < TC; ++c) {
        const float xs = xr[c];
        for (int v = 0; v < TV; ++v) acc[c][v] += gv[v] * xs;
      }
    }
  for (int c = 0; c < TC; ++c)
    for (int v = 0; v < TV; ++v) store(acc_io + (c * TV + v) * V, acc[c][v]);
}

// Input channels per kernel-gradient tile: 12 x 32 outputs, 24 accumulators,
// with AVX-512 (with 4, 8 accumulators, the kernel gradient took about twice as
// long at 16x7x7x1024); 6 x 16 with AVX2.
constexpr int kGradChannels = V == 16 ? 12 : 6;
// Input channels per task: the task's register tiles take turns over one
// example at a time, so that the example's rows of dy, read from memory once,
// serve kGradBlock channels from L1. With one tile per task, all of the
// group's dy (0.8 MB at 16x7x7x1024) was read again for every 1.4 MFLOP tile:
// base's training step, 2 AVX2 (Zen 1) cores, 370 -> 279 ms for this call.
// Each sum still visits the examples and positions in order: the same bits.
constexpr int kGradBlock = 48;  // 4 AVX-512 tiles, 8 AVX2 ones

template <int TV>
void KernelGradBlock(const float* x, const float* dy, int64_t N, int H, int W, int C, int CO, int i, int j,
                     int c0, int tc, int o0, float* dk) {
  float acc[kGradBlock * 2 * V] = {};  // channel c's TV vectors at (c * TV + v) * V
  for (int64_t n = 0; n < N; ++n) {
    int c = 0;
    for (; c + kGradChannels <= tc; c += kGradChannels)
      KernelGradTile<kGradChannels, TV>(x, dy, n, H, W, C, CO, i, j, c0 + c, o0, acc + c * TV * V);
    for (; c + 4 <= tc; c += 4)
      KernelGradTile<4, TV>(x, dy, n, H, W, C, CO, i, j, c0 + c, o0, acc + c * TV * V);
    for (; c < tc; ++c) KernelGradTile<1, TV>(x, dy, n, H, W, C, CO, i, j, c0 + c, o0, acc + c * TV * V);
  }
  for (int c = 0; c < tc; ++c)
    for (int v = 0; v < TV; ++v) store(dk + (int64_t)c * CO + v * V, load(acc + (c * TV + v) * V));
}

ffi::Error KernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy, int64_t groups,
                      ffi::ResultBuffer<ffi::F32> dk) {
  auto xd = x.dimensions();
  auto gd = dy.dimensions();
  auto kd = dk->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || kd.size() != 4 || xd[0] != gd[0] || xd[1] != gd[1] ||
      xd[2] != gd[2] || groups <= 0 || xd[3] != kd[2] * groups || gd[3] != kd[3] || kd[0] != K || kd[1] != K ||
      (kd[3] / groups) % V != 0)
    return ffi::Error::InvalidArgument("faer_gconv7: expected x (N,H,W,G*I), dy (N,H,W,G*O), O % 16 == 0");
  const int64_t N = xd[0];
  const int H = xd[1], W = xd[2], C = xd[3];
  const int I = kd[2], G = groups, CO = kd[3], O = CO / G;
  const float* xp = x.typed_data();
  const float* gp = dy.typed_data();
  float* kp = dk->typed_data();
  const int cblocks = (I + kGradBlock - 1) / kGradBlock;
  // One task per (tap, group, block of kGradBlock input channels): it owns its output.
  ParallelFor(pool, (int64_t)K * K * G * cblocks, [&](int64_t t) {
    const int cb = (int)(t % cblocks);
    const int g = (int)(t / cblocks % G);
    const int tap = (int)(t / cblocks / G);
    const int i = tap / K, j = tap % K;
    const int c = cb * kGradBlock, tc = std::min(kGradBlock, I - c);
    float* out = kp + ((int64_t)tap * I + c) * CO + (int64_t)g * O;
    int o = 0;
    for (; o + 2 * V <= O; o += 2 * V)
      KernelGradBlock<2>(xp, gp, N, H, W, C, CO, i, j, g * I + c, tc, g * O + o, out + o);
    if (o < O) KernelGradBlock<1>(xp, gp, N, H, W, C, CO, i, j, g * I + c, tc, g * O + o, out + o);
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace faer

XLA_FFI_DEFINE_HANDLER_SYMBOL(FaerGconv7Forward, faer::Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // kernel
                                  .Attr<int64_t>("groups")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FaerGconv7KernelGrad, faer::KernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Attr<int64_t>("groups")
                                  .Ret<ffi::Buffer<ffi::F32>>());
