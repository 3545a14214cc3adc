"""Objectives of the paper: focal / BCE / asymmetric for attributes, CE + center loss for expressions.

Every loss returns a scalar: the mean over the valid entries of the batch. Each
takes an optional `mask` of per-example weights (shape [batch], or any shape
that broadcasts from the leading dimensions of the per-element loss) so that
the padded examples of the last evaluation batch count for nothing; a mask of
all zeros gives 0, not NaN.

Multi-label losses (focal, BCE, asymmetric) average over examples *and*
attributes, as `torch.nn.BCEWithLogitsLoss()` does by default. The original
code's sums (ASL) are this mean times batch × attributes; under AdamW the two
give the same updates up to Adam's eps, and a mean keeps the values of the
paper's Table 3 ablation comparable across losses and batch sizes.

Losses compute in float32 whatever the logits' dtype: bfloat16 log-probabilities
lose the small differences the gradients are made of.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import optax

LossFn = Callable[..., jax.Array]


def _masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Mean of `values` weighted by `mask`, broadcast from the leading dims."""
  if mask is None:
    return jnp.mean(values)
  mask = jnp.asarray(mask, jnp.float32)
  mask = mask.reshape(mask.shape + (1,) * (values.ndim - mask.ndim))
  weights = jnp.broadcast_to(mask, values.shape)
  total = jnp.sum(weights)
  return jnp.sum(weights * values) / jnp.where(total > 0, total, 1.0)


def _float32(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  return jnp.asarray(logits, jnp.float32), jnp.asarray(labels, jnp.float32)


def sigmoid_focal_loss(logits: jax.Array, labels: jax.Array, *, gamma: float = 2.0,
                       alpha: float | None = None, mask: jax.Array | None = None) -> jax.Array:
  """Sigmoid focal loss, Eq. 7 of the paper: FL = -α_t (1 - p_t)^γ log(p_t).

  `optax.sigmoid_focal_loss` uses the same α convention as the original code
  (α_t = α for positives, 1 - α for negatives; the original hard-codes
  α = 0.8). The original `FocalLoss` departs from Eq. 7 (it builds the weights
  from its inputs as if they were probabilities, multiplies them by the
  batch-mean BCE and sums); this is Eq. 7 per element, as the paper states it.

  Args:
    logits: [batch, attributes] logits.
    labels: [batch, attributes] targets in {0, 1} (soft targets in [0, 1] work).
    gamma: focusing exponent γ (the paper: 2).
    alpha: weight of the positives, or None for no class weighting.
    mask: optional per-example (or per-element) weights.

  Returns:
    The mean over the valid elements.
  """
  logits, labels = _float32(logits, labels)
  loss = optax.sigmoid_focal_loss(logits, labels, alpha=alpha, gamma=gamma)
  return _masked_mean(loss, mask)


def binary_cross_entropy(logits: jax.Array, labels: jax.Array, *,
                         mask: jax.Array | None = None) -> jax.Array:
  """Sigmoid binary cross-entropy (the paper's BCE baseline), mean over elements.

  Args:
    logits: [batch, attributes] logits.
    labels: [batch, attributes] targets in {0, 1}.
    mask: optional per-example (or per-element) weights.

  Returns:
    The mean over the valid elements.
  """
  logits, labels = _float32(logits, labels)
  return _masked_mean(optax.sigmoid_binary_cross_entropy(logits, labels), mask)


def asymmetric_loss(logits: jax.Array, labels: jax.Array, *, gamma_neg: float = 4.0,
                    gamma_pos: float = 1.0, clip: float = 0.05, eps: float = 1e-8,
                    mask: jax.Array | None = None) -> jax.Array:
  """Asymmetric loss (Ridnik et al., 2021), element-wise as their `AsymmetricLoss`.

  With p = sigmoid(x) and the shifted negative probability
  p_m = max(p - clip, 0) (the reference's xs_neg = min(1 - p + clip, 1)):

    L = -[ y (1 - p)^γ+ log(max(p, eps)) + (1 - y) p_m^γ- log(max(1 - p_m, eps)) ]

  As in the reference `AsymmetricLoss`, the focusing weight is differentiated
  (its `disable_torch_grad_focal_loss` switch is commented out there). The
  reference returns the sum over batch and labels; this returns the mean (see
  the module docstring).

  Args:
    logits: [batch, attributes] logits.
    labels: [batch, attributes] targets in {0, 1}.
    gamma_neg: focusing exponent of the negatives γ-.
    gamma_pos: focusing exponent of the positives γ+.
    clip: probability margin m of the negatives; 0 turns shifting off.
    eps: floor of the probabilities inside the logs.
    mask: optional per-example (or per-element) weights.

  Returns:
    The mean over the valid elements.
  """
  logits, labels = _float32(logits, labels)
  xs_pos = jax.nn.sigmoid(logits)
  # The reference's 1 - sigmoid(x), computed without cancellation for large x.
  xs_neg = jax.nn.sigmoid(-logits)
  if clip > 0:
    xs_neg = jnp.minimum(xs_neg + clip, 1.0)
  loss = labels * jnp.log(jnp.maximum(xs_pos, eps)) + (1 - labels) * jnp.log(jnp.maximum(xs_neg, eps))
  if gamma_neg > 0 or gamma_pos > 0:
    base = 1.0 - (xs_pos * labels + xs_neg * (1 - labels))
    gamma = gamma_pos * labels + gamma_neg * (1 - labels)
    # x**0 has a NaN derivative at x = 0 in JAX (torch masks it to 0), which a
    # saturated sigmoid reaches with gamma_pos = 0; 1**0 = 1 with derivative 0.
    base = jnp.where(gamma == 0, 1.0, base)
    loss = loss * base**gamma
  return _masked_mean(-loss, mask)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0,
                          mask: jax.Array | None = None) -> jax.Array:
  """Softmax cross-entropy with integer labels and optional label smoothing.

  Smoothing mixes the one-hot target with the uniform one,
  (1 - ε) one_hot + ε / K, as `torch.nn.CrossEntropyLoss(label_smoothing=ε)`.

  Args:
    logits: [batch, classes] logits.
    labels: [batch] integer class ids.
    label_smoothing: ε in [0, 1).
    mask: optional per-example weights.

  Returns:
    The mean over the valid examples.
  """
  logits = jnp.asarray(logits, jnp.float32)
  if label_smoothing > 0:
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    loss = optax.softmax_cross_entropy(logits, targets)
  else:
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return _masked_mean(loss, mask)


def center_loss(features: jax.Array, labels: jax.Array, centers: jax.Array, *,
                mask: jax.Array | None = None) -> jax.Array:
  """Center loss (Wen et al., 2016): (1 / 2B) Σ_i ||x_i - c_{y_i}||².

  Wen et al. write L_C = 1/2 Σ_i ||x_i - c_{y_i}||²; like the original FAER code
  (`size_average=True`) this divides by the batch size B (the number of valid
  examples under a mask), so λ = 0.01 does not depend on the batch size.

  The centers are not trained by the loss's gradient (they move by
  `update_centers`), so the gradient reaches only the features.

  Args:
    features: [batch, dim] features (the paper: pooled, before the final norm).
    labels: [batch] integer class ids.
    centers: [classes, dim] class centers.
    mask: optional per-example weights.

  Returns:
    The scalar loss.
  """
  features = jnp.asarray(features, jnp.float32)
  centers = jax.lax.stop_gradient(centers)
  sq_dist = jnp.sum(jnp.square(features - centers[labels]), axis=-1)
  return 0.5 * _masked_mean(sq_dist, mask)


def update_centers(centers: jax.Array, features: jax.Array, labels: jax.Array, *, alpha: float = 0.5,
                   mask: jax.Array | None = None) -> jax.Array:
  """One center update of Wen et al. (Eq. 4 and Algorithm 1).

    Δc_j = Σ_i δ(y_i = j) (c_j - x_i) / (1 + Σ_i δ(y_i = j))
    c_j  ← c_j - α Δc_j

  Classes absent from the batch keep their centers (Δc_j = 0). Called on the
  global batch inside the jitted step, every process computes the same centers.

  Args:
    centers: [classes, dim] current centers.
    features: [batch, dim] features of the batch (treated as constants).
    labels: [batch] integer class ids.
    alpha: the centers' own learning rate α (Wen et al. use 0.5).
    mask: optional per-example weights; padded examples (weight 0) do not vote.

  Returns:
    The updated [classes, dim] centers, in the centers' dtype.
  """
  features = jax.lax.stop_gradient(jnp.asarray(features, jnp.float32))
  one_hot = jax.nn.one_hot(labels, centers.shape[0], dtype=jnp.float32)  # [batch, classes]
  if mask is not None:
    one_hot = one_hot * jnp.asarray(mask, jnp.float32)[:, None]
  counts = jnp.sum(one_hot, axis=0)  # [classes]
  # Σ_i δ(y_i = j)(c_j - x_i) = n_j c_j - Σ_{i: y_i = j} x_i
  centers32 = centers.astype(jnp.float32)
  # At float32 precision on every backend (a TPU's default is one bfloat16 pass).
  diff_sum = counts[:, None] * centers32 - jnp.matmul(one_hot.T, features, precision=jax.lax.Precision.HIGHEST)
  delta = diff_sum / (1.0 + counts[:, None])
  return (centers32 - alpha * delta).astype(centers.dtype)


# Config names of the classification objectives; each takes
# (logits, labels, *, mask=None, **its own options) and returns a scalar.
LOSSES: dict[str, LossFn] = {
    "focal": sigmoid_focal_loss,
    "bce": binary_cross_entropy,
    "asymmetric": asymmetric_loss,
    "cross_entropy": softmax_cross_entropy,
}
