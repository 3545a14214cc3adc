"""Losses against hand computations and against the PyTorch reference formulas."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faer_jax import losses


def _jit(fn, **options):
  """Jits a loss with its options fixed: one compile instead of one per eager op."""
  return jax.jit(functools.partial(fn, **options))


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def test_focal_loss_eq7_by_hand():
  # Element 1: p = 0.5, y = 1:  0.8 · 0.5² · -log 0.5
  # Element 2: p = σ(2), y = 0: 0.2 · σ(2)² · -log(1 - σ(2))
  logits = jnp.array([[0.0, 2.0]])
  labels = jnp.array([[1, 0]])
  expected = (0.13862943611198905 + 0.3300156358842815) / 2
  got = _jit(losses.sigmoid_focal_loss, gamma=2.0, alpha=0.8)(logits, labels)
  np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize("alpha", [None, 0.8, 0.25])
@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0])
def test_focal_loss_matches_formula(alpha, gamma):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 40)) * 3
  labels = rng.integers(0, 2, size=(4, 40))
  p = _sigmoid(logits)
  p_t = np.where(labels == 1, p, 1 - p)
  alpha_t = 1.0 if alpha is None else np.where(labels == 1, alpha, 1 - alpha)
  expected = np.mean(-alpha_t * (1 - p_t) ** gamma * np.log(p_t))
  got = _jit(losses.sigmoid_focal_loss, gamma=gamma, alpha=alpha)(jnp.asarray(logits, jnp.float32), labels)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_focal_loss_gamma0_no_alpha_is_bce():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
  labels = rng.integers(0, 2, size=(3, 5))
  np.testing.assert_allclose(_jit(losses.sigmoid_focal_loss, gamma=0.0)(logits, labels),
                             _jit(losses.binary_cross_entropy)(logits, labels), rtol=1e-6)


def test_mask_ignores_padded_examples():
  rng = np.random.default_rng(2)
  logits = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
  labels = rng.integers(0, 2, size=(4, 6))
  mask = jnp.array([1, 1, 0, 0])
  for name in ("focal", "bce", "asymmetric"):
    fn = _jit(losses.LOSSES[name])
    np.testing.assert_allclose(fn(logits, labels, mask=mask), fn(logits[:2], labels[:2]), rtol=1e-6)
  ce_labels = jnp.array([0, 5, 1, 2])
  ce = _jit(losses.LOSSES["cross_entropy"])
  np.testing.assert_allclose(ce(logits, ce_labels, mask=mask), ce(logits[:2], ce_labels[:2]), rtol=1e-6)


def test_all_masked_is_zero_not_nan():
  logits = jnp.ones((2, 3))
  labels = jnp.zeros((2, 3))
  assert _jit(losses.binary_cross_entropy)(logits, labels, mask=jnp.zeros(2)) == 0.0


def _torch_asl_reference(x, y, gamma_neg=4, gamma_pos=1, clip=0.05, eps=1e-8):
  """Ridnik et al.'s `AsymmetricLoss.forward`, transcribed line by line."""
  torch = pytest.importorskip("torch")
  x = torch.tensor(x, dtype=torch.float64, requires_grad=True)
  y = torch.tensor(y, dtype=torch.float64)
  xs_pos = torch.sigmoid(x)
  xs_neg = 1 - xs_pos
  if clip is not None and clip > 0:
    xs_neg = (xs_neg + clip).clamp(max=1)
  loss = y * torch.log(xs_pos.clamp(min=eps)) + (1 - y) * torch.log(xs_neg.clamp(min=eps))
  if gamma_neg > 0 or gamma_pos > 0:
    pt = xs_pos * y + xs_neg * (1 - y)
    loss = loss * torch.pow(1 - pt, gamma_pos * y + gamma_neg * (1 - y))
  total = -loss.sum()
  total.backward()
  return total.item(), x.grad.numpy()


@pytest.mark.parametrize("gamma_neg,gamma_pos,clip", [(4, 1, 0.05), (4, 0, 0.05), (2, 2, 0.0)])
def test_asymmetric_loss_matches_reference(gamma_neg, gamma_pos, clip):
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(5, 40)) * 4
  labels = rng.integers(0, 2, size=(5, 40)).astype(np.float64)
  ref_sum, ref_grad = _torch_asl_reference(logits, labels, gamma_neg, gamma_pos, clip)

  def fn(x):
    return losses.asymmetric_loss(x, labels, gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip)

  value, grad = jax.jit(jax.value_and_grad(fn))(jnp.asarray(logits, jnp.float32))
  # The reference sums; ours is the mean over the 5 × 40 elements.
  np.testing.assert_allclose(value * logits.size, ref_sum, rtol=1e-5)
  np.testing.assert_allclose(grad * logits.size, ref_grad, rtol=1e-4, atol=1e-6)


def test_asymmetric_loss_finite_gradient_when_saturated():
  grad_fn = jax.jit(jax.grad(lambda x: losses.asymmetric_loss(x, jnp.ones((1, 2)), gamma_pos=0.0)))
  grad = grad_fn(jnp.array([[40.0, 0.0]]))
  assert np.all(np.isfinite(grad))


def test_softmax_cross_entropy_with_label_smoothing_matches_torch_definition():
  logits = jnp.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
  labels = jnp.array([0, 1])
  eps, k = 0.1, 3
  log_p = np.asarray(jax.nn.log_softmax(logits))
  target = np.full((2, k), eps / k)
  target[np.arange(2), np.asarray(labels)] += 1 - eps
  expected = np.mean(-np.sum(target * log_p, axis=-1))
  got = _jit(losses.softmax_cross_entropy, label_smoothing=eps)(logits, labels)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  np.testing.assert_allclose(_jit(losses.softmax_cross_entropy)(logits, labels),
                             np.mean(-log_p[np.arange(2), np.asarray(labels)]), rtol=1e-6)


# Centers c0 = (0, 0), c1 = (1, 1), c2 = (5, 5) (class 2 absent from the batch);
# features (1, 0) and (3, 0) of class 0, (1, 3) of class 1.
CENTERS = jnp.array([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]])
FEATURES = jnp.array([[1.0, 0.0], [3.0, 0.0], [1.0, 3.0]])
LABELS = jnp.array([0, 0, 1])


def test_center_loss_by_hand():
  # Squared distances 1, 9, 4: 1/2 · (14 / 3).
  loss = jax.jit(losses.center_loss)
  np.testing.assert_allclose(loss(FEATURES, LABELS, CENTERS), 7 / 3, rtol=1e-6)
  # Masking the second example: 1/2 · (1 + 4) / 2.
  np.testing.assert_allclose(loss(FEATURES, LABELS, CENTERS, mask=jnp.array([1, 0, 1])), 1.25, rtol=1e-6)


def test_center_loss_gradient_reaches_features_only():
  grad_x, grad_c = jax.jit(jax.grad(losses.center_loss, argnums=(0, 2)))(FEATURES, LABELS, CENTERS)
  # d/dx_i of (1/2B) Σ ||x_i - c_{y_i}||² is (x_i - c_{y_i}) / B, as in the original backward.
  np.testing.assert_allclose(grad_x, (FEATURES - CENTERS[LABELS]) / 3, rtol=1e-6)
  np.testing.assert_array_equal(grad_c, 0.0)


def test_update_centers_by_hand():
  # Class 0: n = 2, Σ(c - x) = (-4, 0), Δ = (-4/3, 0), c0 = (0, 0) - 0.5 Δ = (2/3, 0).
  # Class 1: n = 1, Σ(c - x) = (0, -2), Δ = (0, -1),   c1 = (1, 1.5).
  # Class 2: absent, unchanged.
  new = _jit(losses.update_centers, alpha=0.5)(CENTERS, FEATURES, LABELS)
  np.testing.assert_allclose(new, [[2 / 3, 0.0], [1.0, 1.5], [5.0, 5.0]], rtol=1e-6)


def test_update_centers_mask_and_alpha():
  # Only the first class-0 example votes: n = 1, Δ = (-1/2, 0), α = 1: c0 = (0.5, 0).
  new = _jit(losses.update_centers, alpha=1.0)(CENTERS, FEATURES, LABELS, mask=jnp.array([1, 0, 1]))
  np.testing.assert_allclose(new, [[0.5, 0.0], [1.0, 2.0], [5.0, 5.0]], rtol=1e-6)


def test_losses_accept_bfloat16_logits():
  logits = jnp.array([[0.0, 2.0]], jnp.bfloat16)
  out = _jit(losses.sigmoid_focal_loss, alpha=0.8)(logits, jnp.array([[1, 0]]))
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, (0.13862943611198905 + 0.3300156358842815) / 2, rtol=1e-6)
