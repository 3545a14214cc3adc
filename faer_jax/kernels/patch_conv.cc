// ConvNeXt's patchify convolutions (the stem's 4x4 and the downsampling 2x2,
// stride = kernel size, no padding; NHWC, float32) for XLA:CPU, as matrix
// products over patches:
//
//   faer_patch_forward      y[n,a,b,o] = b[o] + sum_{i,j,c} x[n,pa+i,pb+j,c] * k[i,j,c,o]
//   faer_patch_input_grad   dx[n,pa+i,pb+j,c] = sum_o dy[n,a,b,o] * k[i,j,c,o]
//   faer_patch_kernel_grad  dk[i,j,c,o] = sum_{n,a,b} x[n,pa+i,pb+j,c] * dy[n,a,b,o]
//                           (over this call's batch; the caller sums over devices)
//
// A patch (i, j, c) is p rows of p*C contiguous floats of x, and k (p, p, C, O)
// as flax stores it is already the (p*p*C) x O matrix of the product. XLA runs
// the forward well (YNNPACK), but the kernel gradient as a convolution at
// 30-40 % of the CPU's peak and the input gradient through transposed copies.
// Here tiles of patch rows are copied to scratch and run through the MLP
// kernel's register tile (gemm.h). H and W must be multiples of p; O and,
// for the input gradient, p*C multiples of 16. Sums run in an order fixed by
// the shapes, not by the thread count.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"
#include "gemm.h"

namespace faer {
namespace {

struct PatchShapes {
  int64_t N, H, W, C, p, O;
  int64_t Ho() const { return H / p; }
  int64_t Wo() const { return W / p; }
  int64_t M() const { return N * Ho() * Wo(); }  // patches
  int64_t Kp() const { return p * p * C; }       // floats per patch
  int64_t row() const { return p * C; }          // contiguous floats of one patch row
  // Offset in x of patch m's first float.
  int64_t at(int64_t m) const {
    const int64_t b = m % Wo(), a = m / Wo() % Ho(), n = m / (Wo() * Ho());
    return ((n * H + a * p) * W + b * p) * C;
  }
};

bool GetShapes(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> kd, PatchShapes* s) {
  if (xd.size() != 4 || kd.size() != 4 || kd[0] != kd[1] || kd[0] < 1 || kd[2] != xd[3]) return false;
  *s = {xd[0], xd[1], xd[2], xd[3], kd[0], kd[3]};
  return s->H % s->p == 0 && s->W % s->p == 0 && s->O % V == 0;
}

// Patches [m0, m0 + rows) of x into buf (row stride ld).
void CopyPatches(const float* x, const PatchShapes& s, int64_t m0, int64_t rows, float* buf, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = x + s.at(m0 + r);
    for (int64_t i = 0; i < s.p; ++i) std::copy_n(src + i * s.W * s.C, s.row(), buf + r * ld + i * s.row());
  }
}

// Tasks: blocks of kRows patches x kColumns output columns (whole 32-column
// panels), so that a few hundred patches still make enough tasks to balance.
constexpr int64_t kRows = 96;
constexpr int64_t kColumns = 256;

// The packed kernel of the call in progress on this thread (kept between calls).
thread_local std::vector<float> packed_kernel;

template <class Fn>
void ForBlocks(ffi::ThreadPool& pool, int64_t M, int64_t N, Fn&& fn) {
  const int64_t row_blocks = (M + kRows - 1) / kRows, column_blocks = (N + kColumns - 1) / kColumns;
  ParallelFor(pool, row_blocks * column_blocks, [&](int64_t t) {
    const int64_t m0 = t / column_blocks * kRows, c0 = t % column_blocks * kColumns;
    fn(m0, std::min(kRows, M - m0), c0, std::min(kColumns, N - c0));
  });
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y) {
  PatchShapes s;
  if (!GetShapes(x.dimensions(), k.dimensions(), &s))
    return ffi::Error::InvalidArgument("faer_patch: expected x (N,H,W,C), kernel (p,p,C,O), H, W % p == 0, "
                                       "O % 16 == 0");
  const float *xp = x.typed_data(), *bp = bias.typed_data();
  float* yp = y->typed_data();
  const int64_t M = s.M(), Kp = s.Kp(), O = s.O, ld = Kp + V;
  const Operand Wk = Pack<1>(pool, {PackJob{k.typed_data(), Kp, O, O, 1, &packed_kernel}})[0];
  ForBlocks(pool, M, O, [&](int64_t m0, int64_t rows, int64_t c0, int64_t cn) {
    float* buf = Scratch(rows * ld + rows * cn);
    CopyPatches(xp, s, m0, rows, buf, ld);
    Gemm(rows, cn, Kp, Rows(buf, ld), Wk.from(0, c0), nullptr, 0, buf + rows * ld,
         [&](int64_t r, int64_t c, vec v) { store(yp + (m0 + r) * O + c0 + c, v + load(bp + c0 + c)); });
  });
  return ffi::Error::Success();
}

ffi::Error InputGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> k,
                     ffi::ResultBuffer<ffi::F32> dx) {
  PatchShapes s;
  auto dxd = dx->dimensions();
  if (!GetShapes(dxd, k.dimensions(), &s) || s.row() % V != 0 || dy.element_count() != s.M() * s.O)
    return ffi::Error::InvalidArgument("faer_patch_input_grad: expected dy (N,H/p,W/p,O), kernel (p,p,C,O), "
                                       "p*C and O % 16 == 0");
  const float* gp = dy.typed_data();
  float* xp = dx->typed_data();
  const int64_t M = s.M(), Kp = s.Kp(), O = s.O;
  const Operand KT = Pack<1>(pool, {PackJob{k.typed_data(), O, Kp, 1, O, &packed_kernel}})[0];  // k^T: K = O, N = p*p*C
  // Where each vector of a patch's columns goes in x: column c is in row
  // c / (p*C) of the patch, at offset c % (p*C) in it.
  std::vector<int64_t> column(Kp / V);
  for (int64_t c = 0; c < Kp; c += V) column[c / V] = c / s.row() * s.W * s.C + c % s.row();
  ForBlocks(pool, M, Kp, [&](int64_t m0, int64_t rows, int64_t c0, int64_t cn) {
    int64_t patch[kRows];
    for (int64_t r = 0; r < rows; ++r) patch[r] = s.at(m0 + r);
    Gemm(rows, cn, O, Rows(gp + m0 * O, O), KT.from(0, c0), nullptr, 0, Scratch(rows * cn),
         [&](int64_t r, int64_t c, vec v) { store(xp + patch[r] + column[(c0 + c) / V], v); });
  });
  return ffi::Error::Success();
}

// dk (p*p*C x O) = patches^T dy, over chunks of kChunk patches in order: each
// chunk is copied (split by rows over the threads), then every task adds the
// chunk to its own block of dk's rows.
constexpr int64_t kChunk = 240;

ffi::Error KernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dk) {
  PatchShapes s;
  if (!GetShapes(x.dimensions(), dk->dimensions(), &s) || dy.element_count() != s.M() * s.O)
    return ffi::Error::InvalidArgument("faer_patch_kernel_grad: expected x (N,H,W,C), dy (N,H/p,W/p,O), "
                                       "kernel (p,p,C,O), O % 16 == 0");
  const float *xp = x.typed_data(), *gp = dy.typed_data();
  float* kp = dk->typed_data();
  const int64_t M = s.M(), Kp = s.Kp(), O = s.O, ld = Kp + V;
  std::fill_n(kp, Kp * O, 0.f);
  std::vector<float> buf(kChunk * ld);
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // Blocks of dk's rows: whole register tiles, about two per thread.
  const int64_t block = std::max<int64_t>(MR, (Kp / (2 * threads) + MR - 1) / MR * MR);
  const int64_t blocks = (Kp + block - 1) / block;
  const int64_t copy_rows = (kChunk + threads - 1) / threads;
  for (int64_t m0 = 0; m0 < M; m0 += kChunk) {
    const int64_t rows = std::min(kChunk, M - m0);
    ParallelFor(pool, (rows + copy_rows - 1) / copy_rows, [&](int64_t t) {
      const int64_t a = t * copy_rows;
      CopyPatches(xp, s, m0 + a, std::min(copy_rows, rows - a), buf.data() + a * ld, ld);
    });
    ParallelFor(pool, blocks, [&](int64_t t) {
      const int64_t r0 = t * block, n = std::min(block, Kp - r0);
      Gemm(n, O, rows, Lhs{buf.data() + r0, 1, ld}, Plain(gp + m0 * O, O), kp + r0 * O, O, nullptr,
           [&](int64_t r, int64_t c, vec v) { store(kp + (r0 + r) * O + c, v); });
    });
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace faer

XLA_FFI_DEFINE_HANDLER_SYMBOL(FaerPatchForward, faer::Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x (N, H, W, C)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // kernel (p, p, C, O)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias (O)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y (N, H/p, W/p, O)

XLA_FFI_DEFINE_HANDLER_SYMBOL(FaerPatchInputGrad, faer::InputGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy (N, H/p, W/p, O)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // kernel (p, p, C, O)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dx (N, H, W, C)

XLA_FFI_DEFINE_HANDLER_SYMBOL(FaerPatchKernelGrad, faer::KernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x (N, H, W, C)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy (N, H/p, W/p, O)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dk (p, p, C, O)
