"""Building blocks shared by the ConvNeXt backbone and CC Attention.

Every choice here that changes numbers follows the PyTorch original and says so:
the initialiser, the LayerNorm variance, the exact GELU, the drop-path scaling.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from faer_jax import kernels
from faer_jax.kernels import depthwise as kernel_depthwise
from faer_jax.kernels import grouped as kernel_grouped
from faer_jax.kernels import mlp as kernel_mlp
from faer_jax.kernels import patch as kernel_patch

Dtype = Any

# timm's `trunc_normal_(w, std=.02)`, which ConvNeXt and FAER call on every conv
# and linear weight, truncates at the *absolute* bounds [-2, 2], i.e. at ±100
# standard deviations: in effect a plain normal. JAX's truncated_normal takes
# its bounds in standard deviations, so the same distribution needs ±100 here
# (its default ±2σ would give a visibly narrower init).
kernel_init = nn.initializers.truncated_normal(stddev=0.02, lower=-100.0, upper=100.0)
bias_init = nn.initializers.zeros


def gelu(x: jax.Array) -> jax.Array:
  """torch.nn.GELU(): the exact erf form 0.5 x (1 + erf(x / sqrt 2)), not the tanh approximation.

  Written out rather than `nn.gelu(approximate=False)`, which JAX computes
  through erfc: XLA expands erfc with an exp and a select on every element, erf
  as a plain rational polynomial (the activation is 4C wide, so on CPU this is
  a few percent of a training step). The erf form is also the one torch uses.
  """
  return 0.5 * x * (1.0 + lax.erf(x * jnp.asarray(2 ** -0.5, x.dtype)))


def precision(dtype: Dtype) -> lax.Precision | None:
  """The precision of the model's matrix products and convolutions in compute dtype `dtype`.

  float32 ones run at float32 precision on every backend, as the PyTorch
  original's do on the CPU and in its Linear layers on GPU: left to their
  defaults, XLA computes float32 products in TensorFloat-32 on recent NVIDIA
  GPUs (10-bit mantissas) and in one bfloat16 pass on TPUs. (The CPU computes
  float32 either way; the setting changes nothing there.) In bfloat16 the
  backend's default: its inputs have no more digits to keep.
  """
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def layer_norm(eps: float, dtype: Dtype, name: str | None) -> "LayerNorm":
  """A LayerNorm over the channel (last) axis, computed as torch computes it (see LayerNorm)."""
  return LayerNorm(epsilon=eps, dtype=dtype, name=name)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis; the parameters of nn.LayerNorm ('scale', 'bias').

  The variance is mean((x - mean)^2), as torch computes it, not mean(x^2) -
  mean^2, which loses digits when the mean is large against the spread.
  Statistics are computed in float32 (at least), as flax does.

  On CPU the two row sums are matrix-vector products with a ones vector
  instead of reductions: the same sums in another order, which keeps XLA:CPU's
  library fusion of reductions (YNNPACK) from pulling the norm, the 49-tap
  depthwise conv before it and the matmul after it into one call whose inputs
  XLA then materialises (about 1.5x on the forward of a first-stage ConvNeXt
  block, 16x56x56x96, on one core). A TPU
  would run an f32 matrix-vector product at bf16 precision by default, so
  elsewhere they stay reductions. (A hand-written gradient measured no faster
  than autodiff's.)
  """

  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, params_only: bool = False):
    """The normalised x; with `params_only`, just (scale, bias) for x's channels (see DepthwiseConv7x7)."""
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    if params_only:
      return scale, bias
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if jax.default_backend() == "cpu":
      ones = jnp.ones((c,), x.dtype)
      row_mean = lambda v: jnp.matmul(v, ones, precision=precision(v.dtype)) / c
    else:
      row_mean = lambda v: jnp.mean(v, axis=-1)
    mean = row_mean(x)
    centered = x - mean[..., None]
    mul = lax.rsqrt(row_mean(centered * centered) + self.epsilon)[..., None] * scale
    return (centered * mul + bias).astype(self.dtype)


def dense(features: int, dtype: Dtype, name: str) -> nn.Dense:
  # A hand-written gradient taking the weight gradient on 2-D (N*H*W, C) views
  # halved that matmul's time in a single ConvNeXt block's backward on CPU, but
  # measured no faster on the whole training step, so autodiff's it is.
  return nn.Dense(features, dtype=dtype, precision=precision(dtype), kernel_init=kernel_init, bias_init=bias_init,
                  name=name)


def _resolve(impl: str, cpu: str, other: str, choices: tuple[str, ...]) -> str:
  """'auto' -> `cpu` on the CPU backend, `other` elsewhere; anything else must be in `choices`."""
  if impl == "auto":
    return cpu if jax.default_backend() == "cpu" else other
  if impl not in choices:
    raise ValueError(f"Unknown conv impl {impl!r}; expected 'auto' or one of {choices}.")
  return impl


class DepthwiseConv7x7(nn.Module):
  """7x7 depthwise convolution, stride 1, padding 3, with bias (NHWC).

  The kernel is stored as (7, 7, 1, C), the layout `nn.Conv(C, (7, 7),
  feature_group_count=C)` uses, so checkpoints do not depend on `impl`:

  * 'xla': lax.conv_general_dilated with feature_group_count=C.
  * 'shift': `depthwise_conv_shifts`, 49 shifted multiply-adds with a
    hand-written gradient, in pure XLA.
  * 'kernel': the C++ kernels of faer_jax.kernels (XLA:CPU, float32 only),
    built at first use; forward and both gradients read each input once and
    skip the zero padding, and the LayerNorm that follows in a ConvNeXt block
    is fused in (see __call__).
  * 'auto': 'kernel' on CPU in float32 where the kernels build, else 'shift'
    on CPU; 'xla' on GPU and TPU, which have fast native depthwise kernels.

  XLA:CPU's grouped convolution runs a depthwise conv as a dense one, one to
  two orders of magnitude slower than 'shift', which is itself 2-6x slower
  than 'kernel' (issue 5, benchmarks/README.md). All compute the same sums;
  they differ only in float summation order.
  """

  features: int
  impl: str = "auto"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, norm: "LayerNorm | None" = None) -> jax.Array:
    """The convolution of x; with `norm` (a LayerNorm of the caller's), norm(conv(x)).

    With 'kernel', conv and norm run as one fused kernel (the norm's parameters
    stay the norm module's); otherwise norm is applied to the conv's output.
    """
    kernel = self.param("kernel", kernel_init, (7, 7, 1, self.features), jnp.float32)
    bias = self.param("bias", bias_init, (self.features,), jnp.float32)
    x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
    impl = _resolve(self.impl, "kernel", "xla", ("xla", "shift", "kernel"))
    if impl == "kernel" and (x.dtype != jnp.float32 or not kernels.available()):
      if self.impl != "auto":
        raise ValueError(f"conv impl 'kernel' needs float32 and the CPU kernels (got {x.dtype}; "
                         f"available: {kernels.available()}).")
      impl = "shift"
    if norm is not None and impl == "kernel" and norm.dtype == jnp.float32:
      scale, shift = norm(x, params_only=True)
      return kernel_depthwise.depthwise_conv7x7_norm(x, kernel[:, :, 0, :], bias, scale, shift, norm.epsilon)
    if impl == "xla":
      y = lax.conv_general_dilated(
          x, kernel, window_strides=(1, 1), padding=((3, 3), (3, 3)),
          dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.features,
          precision=precision(x.dtype))
    elif impl == "kernel":
      y = kernel_depthwise.depthwise_conv7x7(x, kernel[:, :, 0, :])
    else:
      y = depthwise_conv_shifts(x, kernel[:, :, 0, :])
    return y + bias if norm is None else norm(y + bias)


def _shifted_sum(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """sum_{i,j} pad(x)[:, i:i+H, j:j+W, :] * kernel[i, j, :]: 'same' cross-correlation, NHWC."""
  kh, kw, _ = kernel.shape
  h, w = x.shape[1], x.shape[2]
  xp = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  y = None
  for i in range(kh):
    for j in range(kw):
      term = xp[:, i:i + h, j:j + w, :] * kernel[i, j]
      y = term if y is None else y + term
  return y


def _depthwise_kernel_grad(x: jax.Array, g: jax.Array, kh: int, kw: int) -> jax.Array:
  """d(loss)/d(kernel)[i, j, c] = sum_{n,h,w} pad(x)[n, h+i, w+j, c] * g[n, h, w, c].

  Autodiff of the shifted sum gives 49 separate reductions, each streaming a
  shifted copy of x and g from memory (or, for lax.conv, a batch-grouped
  convolution that XLA:CPU expands to a dense one). Here the 49 products feed
  ONE variadic reduce, so x and g are read once, and with channels major (C, N,
  H, W) each of its reductions runs over contiguous memory. At 16x56x56x96 on
  one core: 7-10x faster than autodiff's 49 reductions, 2.5-3x faster than the
  same variadic reduce with channels minor (the two transposes cost ~10 % of
  it). Accumulates in float32 whatever the input dtype.
  """
  acc = jnp.promote_types(x.dtype, jnp.float32)
  h, w = g.shape[1], g.shape[2]
  xt = jnp.pad(x.transpose(3, 0, 1, 2).astype(acc), ((0, 0), (0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)))
  gt = g.transpose(3, 0, 1, 2).astype(acc)
  products = tuple(xt[:, :, i:i + h, j:j + w] * gt for i in range(kh) for j in range(kw))
  zero = jnp.zeros((), acc)
  sums = lax.reduce(products, (zero,) * len(products),
                    lambda a, b: tuple(u + v for u, v in zip(a, b)), dimensions=(1, 2, 3))
  return jnp.stack(sums).reshape(kh, kw, -1)


@jax.custom_vjp
def depthwise_conv_shifts(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """'Same' depthwise cross-correlation of x (N, H, W, C) with kernel (kh, kw, C), odd sizes.

  Equals lax.conv_general_dilated(x, kernel[:, :, None], (1, 1), 'SAME',
  feature_group_count=C) up to float summation order, forward and backward.
  """
  return _shifted_sum(x, kernel)


def _depthwise_fwd(x, kernel):
  return _shifted_sum(x, kernel), (x, kernel)


def _depthwise_bwd(residuals, g):
  x, kernel = residuals
  # The input gradient is the same correlation of g with the kernel flipped in
  # both spatial axes: again 49 fused multiply-adds.
  dx = _shifted_sum(g, kernel[::-1, ::-1])
  dkernel = _depthwise_kernel_grad(x, g, kernel.shape[0], kernel.shape[1]).astype(kernel.dtype)
  return dx, dkernel


depthwise_conv_shifts.defvjp(_depthwise_fwd, _depthwise_bwd)


class PatchConv(nn.Module):
  """A p x p convolution with stride p, no padding, and bias (NHWC): ConvNeXt's stem and downsampling.

  Parameters `kernel` (p, p, C, features) and `bias` (features,), as
  `nn.Conv(features, (p, p), strides=(p, p), padding='VALID')` stores them.

  * 'xla': lax.conv_general_dilated, what nn.Conv runs.
  * 'kernel': the C++ kernels of faer_jax.kernels (XLA:CPU, float32, features
    a multiple of 16, H and W multiples of p; otherwise 'xla'), a matrix
    product over patches. XLA:CPU runs the forward as fast, but the kernel
    gradient as a convolution at 30-40 % of the CPU's peak and the input
    gradient through transposed copies (base training: 180 ms of the
    downsampling layers' gradients, benchmarks/README.md).
  * 'auto': 'kernel' on CPU where it applies and the kernels build, else 'xla'.
  The model's conv_impl value 'shift' (the pure-XLA CPU path) means 'xla' here.
  """

  features: int
  patch: int
  impl: str = "auto"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.patch
    kernel = self.param("kernel", kernel_init, (p, p, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", bias_init, (self.features,), jnp.float32)
    x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
    impl = _resolve(self.impl, "kernel", "xla", ("xla", "shift", "kernel"))
    if (impl == "kernel" and x.dtype == jnp.float32 and kernel_patch.supported(x.shape, kernel.shape)
        and kernels.available()):
      return kernel_patch.patch_conv(x, kernel, bias)
    y = lax.conv_general_dilated(x, kernel, window_strides=(p, p), padding="VALID",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision(x.dtype))
    return y + bias


class GroupedConv(nn.Module):
  """A k x k 'same' convolution with `groups` groups and bias (NHWC), as nn.Conv stores it.

  Parameters: kernel (k, k, C_in / groups, features), bias (features,), the
  layout of `nn.Conv(features, (k, k), feature_group_count=groups)`.

  * 'xla': one lax.conv_general_dilated with feature_group_count=groups.
  * 'split': one dense convolution per group, concatenated. XLA:CPU runs a
    grouped convolution about 5x slower than the same work as dense ones, and
    its gradient 6-9x slower (CC Attention's conv at 16x7x7x768).
  * 'kernel': the C++ kernels of faer_jax.kernels (XLA:CPU, float32, 7x7,
    per-group widths multiples of 16; otherwise 'split'), which skip the taps
    that fall on the padding: at 16x7x7x768 about 2x faster than 'split' and
    on par with torch's oneDNN conv forward, ~1.6x faster with the gradients.
  * 'auto': 'kernel' on CPU where it applies and the kernels build, else
    'split'; 'xla' on GPU and TPU, which handle groups natively.
  The model's conv_impl value 'shift' (the pure-XLA CPU path) means 'split' here.
  """

  features: int
  kernel_size: int
  groups: int
  impl: str = "auto"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, g = self.kernel_size, self.groups
    cin = x.shape[-1]
    kernel = self.param("kernel", kernel_init, (k, k, cin // g, self.features), jnp.float32)
    bias = self.param("bias", bias_init, (self.features,), jnp.float32)
    x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
    conv = lambda x, kernel, groups: lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding=((k // 2, k // 2),) * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups, precision=precision(x.dtype))
    impl = _resolve(self.impl, "kernel", "xla", ("xla", "split", "shift", "kernel"))
    if impl == "kernel" and not (x.dtype == jnp.float32 and kernel_grouped.supported(kernel.shape, g)
                                 and kernels.available()):
      impl = "split"
    if impl == "xla":
      y = conv(x, kernel, g)
    elif impl == "kernel":
      y = kernel_grouped.grouped_conv7x7(x, kernel, g)
    else:
      xs = jnp.split(x, g, axis=-1)
      ks = jnp.split(kernel, g, axis=-1)
      y = jnp.concatenate([conv(xi, ki, 1) for xi, ki in zip(xs, ks)], axis=-1)
    return y + bias


class DropPath(nn.Module):
  """Stochastic depth per example, as timm's `drop_path` (scaled by 1/keep).

  Active only when `deterministic` is False; draws from the 'dropout' RNG
  stream, so `apply(..., train=True, rngs={'dropout': key})` drives it.
  """

  rate: float

  def active(self, deterministic: bool) -> bool:
    return not deterministic and self.rate != 0.0

  def mask(self, x: jax.Array) -> jax.Array:
    """The 0/1 mask __call__ multiplies x by, one per example (the leading axis), shaped to broadcast."""
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    return jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.rate, shape).astype(x.dtype)

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if not self.active(deterministic):
      return x
    keep = 1.0 - self.rate
    if keep == 0.0:  # timm leaves the mask unscaled here; every path is dropped.
      return jnp.zeros_like(x)
    return x * self.mask(x) / jnp.asarray(keep, x.dtype)


# The fused MLP kernel (faer_jax/kernels/mlp.cc) against XLA's two matmuls and
# elementwise passes, forward + backward of one block, batch 16, 2 cores,
# same process: 1.5-1.6x as fast at C = 96, 1.35x at 128, 1.1-1.15x at 192
# and 256, 1.05-1.08x at 384, 1.03-1.05x at 512, 0.85x at 768 and 1024
# (benchmarks/README.md). Wider blocks keep XLA's: with session 5's register
# tile the kernel draws level at 768 in the forward (38.97 vs 39.07 ms) but is
# still 0.96x forward + backward (128.8 vs 123.1 ms).
FUSED_MLP_MAX_WIDTH = 512


def fused_mlp_applies(impl: str, x: jax.Array, dtype: Dtype, rate: float) -> bool:
  """Whether a ConvNeXt block with conv impl `impl` runs its MLP as the fused CPU kernel."""
  width = x.shape[-1]
  return (_resolve(impl, "kernel", "xla", ("xla", "shift", "kernel")) == "kernel" and rate < 1.0
          and x.dtype == jnp.float32 and dtype == jnp.float32 and width <= FUSED_MLP_MAX_WIDTH
          and kernel_mlp.supported(width, 4 * width) and kernels.available())
