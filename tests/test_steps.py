"""The pure steps against computations written here in numpy: objectives, center updates, eval sums, metrics."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faer_jax import config_lib, optim, paper_metrics, steps
from faer_jax.models import create_model


def _config(task="fer", num_classes=7, **loss):
  config = config_lib.base_config()
  config.task, config.num_classes = task, num_classes
  config.loss.name = "cross_entropy" if task == "fer" else "focal"
  for key, value in loss.items():
    config.loss[key] = value
  return config


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


RNG = np.random.default_rng(0)
LOGITS = RNG.normal(size=(6, 7)) * 2
FEATURES = RNG.normal(size=(6, 16))
CENTERS = RNG.normal(size=(7, 16))
LABELS = np.array([0, 3, 3, 6, 1, 3])
ATTR_LOGITS = RNG.normal(size=(6, 40)) * 3
ATTR_LABELS = (RNG.random((6, 40)) < 0.3).astype(np.int32)


@pytest.mark.parametrize("weight", [0.0, 0.01, 0.5])
def test_expression_objective_is_cross_entropy_plus_lambda_center_loss(weight):
  config = _config(center_loss_weight=weight)
  centers = CENTERS if steps.uses_center_loss(config) else None
  loss, parts = jax.jit(lambda *args: steps._objective(config, *args))(FEATURES, LOGITS, LABELS, centers)
  cross_entropy = -np.mean(_log_softmax(LOGITS)[np.arange(6), LABELS])
  center = 0.5 * np.mean(np.sum((FEATURES - CENTERS[LABELS]) ** 2, axis=1))  # Wen et al., / batch as the original
  np.testing.assert_allclose(loss, cross_entropy + weight * center, rtol=1e-5)
  np.testing.assert_allclose(parts["cross_entropy"], cross_entropy, rtol=1e-5)
  if weight:
    np.testing.assert_allclose(parts["center_loss"], center, rtol=1e-5)
  else:
    assert "center_loss" not in parts


def _focal(x, y, gamma, alpha):
  p = _sigmoid(x)
  p_t = np.where(y == 1, p, 1 - p)
  alpha_t = 1.0 if alpha is None else np.where(y == 1, alpha, 1 - alpha)
  return np.mean(-alpha_t * (1 - p_t) ** gamma * np.log(p_t))


def _asymmetric(x, y, gamma_neg=4.0, gamma_pos=1.0, clip=0.05):
  p = _sigmoid(x)
  p_m = np.maximum(p - clip, 0)
  return np.mean(-(y * (1 - p) ** gamma_pos * np.log(p) + (1 - y) * p_m ** gamma_neg * np.log(1 - p_m)))


@pytest.mark.parametrize("name,options,expected", [
    ("focal", {"focal_gamma": 2.0}, _focal(ATTR_LOGITS, ATTR_LABELS, 2.0, None)),
    ("focal", {"focal_gamma": 1.0, "focal_alpha": 0.8}, _focal(ATTR_LOGITS, ATTR_LABELS, 1.0, 0.8)),
    ("bce", {}, np.mean(-(ATTR_LABELS * np.log(_sigmoid(ATTR_LOGITS))
                          + (1 - ATTR_LABELS) * np.log(1 - _sigmoid(ATTR_LOGITS))))),
    ("asymmetric", {}, _asymmetric(ATTR_LOGITS, ATTR_LABELS)),
], ids=["focal", "focal_alpha", "bce", "asymmetric"])
def test_attribute_objective_is_the_configured_loss(name, options, expected):
  """Eq. 7 of the paper (focal), BCE and ASL, as the config names them, mean over examples and attributes."""
  config = _config("fae", 40, name=name, **options)
  loss, parts = jax.jit(lambda *args: steps._objective(config, *args))(FEATURES, ATTR_LOGITS, ATTR_LABELS)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert parts == {}


class _Carried(nn.Module):
  """A stand-in model whose outputs the batch carries: logits in image[:, 0, :K, 0], features in image[:, 1, :16, 0]."""

  num_classes: int

  def __call__(self, images, train=False):
    return images[:, 1, :16, 0], images[:, 0, :self.num_classes, 0]


def _carrying(logits, features):
  images = np.zeros((len(logits), 40, 40, 3), np.float32)
  images[:, 0, :logits.shape[1], 0] = logits
  images[:, 1, :16, 0] = features
  return images


def test_eval_sums_and_expression_metrics_match_numpy():
  """Masked examples count for nothing; confusion[true, predicted]; per-class accuracy is recall (Table 5);
  mean class accuracy its mean."""
  config = _config(center_loss_weight=0.01)
  labels = np.array([0, 0, 0, 0, 1, 1, 2, 3, 4, 5, 6, 1, 2])
  chosen = np.array([2, 2, 0, 0, 1, 0, 2, 3, 4, 6, 6, 1, 1])  # the last two examples are padding
  logits = RNG.normal(size=(13, 7)) + 5 * np.eye(7)[chosen]
  features = RNG.normal(size=(13, 16))
  mask = np.arange(13) < 11
  batch = {"image": _carrying(logits, features), "label": labels, "mask": mask}
  sums = jax.jit(lambda v, b: steps.eval_step(v, b, model=_Carried(7), config=config))(
      {"params": {}, "centers": CENTERS}, batch)
  predicted = logits.argmax(1)
  confusion = np.zeros((7, 7))
  for t, p in zip(labels[mask], predicted[mask]):
    confusion[t, p] += 1
  # Class 0: 2 of its 4 examples found (recall 1/2); 3 predictions of 0, 2 right (precision 2/3).
  assert confusion[0, 2] == 2 and confusion[1, 0] == 1
  np.testing.assert_array_equal(sums["confusion"], confusion)
  assert float(sums["count"]) == 11 and float(sums["correct"]) == np.sum(predicted[mask] == labels[mask])
  per_example = (-_log_softmax(logits)[np.arange(13), labels]
                 + 0.01 * 0.5 * np.sum((features - CENTERS[labels]) ** 2, axis=1))
  np.testing.assert_allclose(sums["loss_sum"], per_example[mask].sum(), rtol=1e-5)

  metrics = paper_metrics.summarize(jax.device_get(sums), config, [f"c{i}" for i in range(7)])
  recall = [np.mean(predicted[mask][labels[mask] == k] == k) for k in range(7)]
  np.testing.assert_allclose(metrics["per_class_accuracy"], recall)
  assert metrics["per_class_accuracy"][0] == 0.5 and metrics["per_class_accuracy"][5] == 0.0
  np.testing.assert_allclose(metrics["mean_class_accuracy"], np.mean(recall))
  np.testing.assert_allclose(metrics["accuracy"], np.mean(predicted[mask] == labels[mask]))
  assert metrics["confusion_matrix"][0][2] == 2 and metrics["num_examples"] == 11


def test_eval_sums_and_attribute_metrics_match_numpy():
  config = _config("fae", 40)
  mask = np.array([True, True, True, True, False, True])
  batch = {"image": _carrying(ATTR_LOGITS, FEATURES), "label": ATTR_LABELS, "mask": mask}
  sums = jax.jit(lambda v, b: steps.eval_step(v, b, model=_Carried(40), config=config))({"params": {}}, batch)
  correct = ((ATTR_LOGITS > 0) == (ATTR_LABELS == 1))[mask]
  np.testing.assert_array_equal(sums["attribute_correct"], correct.sum(0))
  metrics = paper_metrics.summarize(jax.device_get(sums), config, [f"a{i}" for i in range(40)])
  np.testing.assert_allclose(metrics["per_attribute_accuracy"], correct.mean(0))
  np.testing.assert_allclose(metrics["accuracy"], correct.mean())  # the paper's CelebA figure: the mean
  np.testing.assert_allclose(sums["loss_sum"], 5 * _focal(ATTR_LOGITS[mask], ATTR_LABELS[mask], 2.0, None),
                             rtol=1e-5)


def test_train_step_moves_params_by_the_objectives_gradient_and_centers_by_wens_rule():
  """One real step of the `test` FAER: its gradient is that of cross-entropy + λ · center loss written here,
  AdamW moves every parameter, and the centers follow Wen et al.'s update computed in numpy."""
  config = _config(center_loss_weight=0.5, center_alpha=0.5)
  config.model.drop_path_rate = 0.0
  model = create_model("test", 7)
  tx, schedule = optim.create_optimizer(config.optimizer, steps_per_epoch=10)
  state = jax.jit(lambda key: steps.create_train_state(key, model, tx, config))(jax.random.key(0))
  state["centers"] = jnp.asarray(RNG.normal(size=(7, 64)), jnp.float32)
  images = RNG.normal(size=(6, 64, 64, 3)).astype(np.float32)
  batch = {"image": images, "label": LABELS}
  new_state, metrics = jax.jit(lambda s, b: steps.train_step(s, b, model=model, tx=tx, config=config,
                                                             schedule=schedule))(state, batch)
  centers = np.asarray(state["centers"], np.float64)

  def loss(params):  # this test's own objective: the paper's Eq. for FER
    features, logits = model.apply({"params": params}, images, train=False)
    cross_entropy = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(6), LABELS])
    return cross_entropy + 0.5 * 0.5 * jnp.mean(jnp.sum((features - centers[LABELS]) ** 2, axis=1)), features

  (value, features), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state["params"])
  np.testing.assert_allclose(metrics["loss"], value, rtol=1e-5)
  norm = np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in jax.tree.leaves(grads)))
  np.testing.assert_allclose(metrics["grad_norm"], norm, rtol=1e-4)
  assert int(new_state["step"]) == 1
  still = [jax.tree_util.keystr(path) for path, a in jax.tree_util.tree_leaves_with_path(state["params"])
           if np.array_equal(a, _at(new_state["params"], path))]
  # Biases adding a constant over the positions CC Attention's softmax normalises have a gradient of zero (or
  # rounding noise, which Adam scales up to a full step): they may stay.
  assert set(still) <= {"['cc_attention']['mlp_2']['bias']", "['cc_attention']['norm']['bias']"}, still

  features = np.asarray(features, np.float64)
  expected = centers.copy()
  for j in range(7):
    members = LABELS == j
    expected[j] -= 0.5 * np.sum(centers[j] - features[members], axis=0) / (1 + members.sum())
  np.testing.assert_allclose(new_state["centers"], expected, rtol=1e-5, atol=1e-6)
  assert not np.allclose(expected[3], centers[3]) and np.array_equal(expected[2], centers[2])  # class 2: absent


def _at(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def test_expression_checkpoints_keep_their_layout():
  """An expression run with a center loss saves {step, params, opt_state, centers [K, dim], rng}: the layout its
  existing checkpoints have, so they restore. Without a center loss there are no centers."""
  model, tx = create_model("test", 7), optim.create_optimizer(optim.default_config(), 10)[0]
  shapes = jax.eval_shape(lambda key: steps.create_train_state(key, model, tx, _config(center_loss_weight=0.01)),
                          jax.random.key(0))
  assert sorted(shapes) == ["centers", "opt_state", "params", "rng", "step"]
  assert shapes["centers"].shape == (7, 64) and shapes["centers"].dtype == jnp.float32
  for config in (_config(center_loss_weight=0.0), _config("fae", 40)):
    shapes = jax.eval_shape(lambda key, c=config: steps.create_train_state(key, create_model("test", c.num_classes),
                                                                           tx, c), jax.random.key(0))
    assert sorted(shapes) == ["opt_state", "params", "rng", "step"]
