"""The Flax FAER on its own: shapes, parameter counts, initialisation, drop path, dtypes."""

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from faer_jax.interop import init_variables
from faer_jax.models import VARIANTS, create_backbone, create_model
from faer_jax.models.layers import DropPath


def _count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def _abstract_params(module):
  return jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]


@pytest.mark.parametrize("variant,expected", [
    # timm's published totals (28,589,128 and 88,591,464 parameters) minus the
    # final norm and the 1000-class head, which the backbone does not own.
    ("tiny", 28_589_128 - 2 * 768 - (768 * 1000 + 1000)),
    ("base", 88_591_464 - 2 * 1024 - (1024 * 1000 + 1000)),
])
def test_backbone_parameter_count_matches_convnext(variant, expected):
  assert _count(_abstract_params(create_backbone(variant))) == expected


def test_cc_attention_and_head_shapes():
  params = _abstract_params(create_model("tiny", 7))
  att = params["cc_attention"]
  assert att["mlp_0"]["kernel"].shape == (768, 96)
  assert att["mlp_2"]["kernel"].shape == (96, 768)
  assert att["value"]["kernel"].shape == (768, 768)
  assert att["depthwise"]["kernel"].shape == (7, 7, 192, 768)  # groups = 4, not depthwise
  assert params["head"]["kernel"].shape == (768, 7)


@pytest.mark.parametrize("variant", ["test", "atto"])
def test_forward_shapes(variant):
  model = create_model(variant, 7)
  images = jnp.ones((2, 64, 64, 3))
  # Compiled, not op by op (atto: 16 s against 27 s here): init_variables's program is shared with
  # every other test that initialises the same model.
  variables = init_variables(model)
  features, logits = jax.jit(model.apply)(variables, images)
  dim = VARIANTS[variant].dims[-1]
  assert features.shape == (2, dim) and logits.shape == (2, 7)
  fmap = jax.jit(create_backbone(variant).apply)({"params": variables["params"]["backbone"]}, images)
  assert fmap.shape == (2, 2, 2, dim)


def test_initialisation_matches_original():
  params = init_variables(create_model("atto", 7))["params"]
  w = np.asarray(params["backbone"]["stages_3"]["blocks_0"]["pwconv1"]["kernel"]).ravel()  # 409,600 values
  assert abs(w.std() - 0.02) < 0.0005
  # timm's trunc_normal_(std=.02) truncates at +-2 absolute (+-100 sigma), so
  # about 4.55 % of the weights lie beyond 2 sigma; a 2-sigma truncation has none.
  assert 0.04 < np.mean(np.abs(w) > 0.04) < 0.051
  block = params["backbone"]["stages_0"]["blocks_0"]
  np.testing.assert_array_equal(block["gamma"], np.full(40, 1e-6, np.float32))
  np.testing.assert_array_equal(block["pwconv1"]["bias"], 0)
  np.testing.assert_array_equal(block["norm"]["scale"], 1)
  w = np.asarray(params["cc_attention"]["depthwise"]["kernel"])
  assert abs(w.std() - 0.02) < 0.001


def test_head_init_scale():
  kw = dict(variant="test", num_classes=7)
  init = lambda m: init_variables(m)["params"]["head"]["kernel"]
  np.testing.assert_allclose(init(create_model(**kw, head_init_scale=0.5)), 0.5 * init(create_model(**kw)),
                             rtol=1e-6)


def test_every_implementation_has_the_same_parameters_and_function():
  """conv_impl changes how the layers compute, not what they store or their initial values (checkpoints do not
  depend on it); outputs agree up to float summation order."""
  images = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
  plain = create_model("test", 7, conv_impl="xla")
  variables = init_variables(plain, seed=2)
  rng = np.random.default_rng(3)
  moved = jax.tree.map(lambda p: p + np.float32(0.05) * rng.standard_normal(p.shape, np.float32), variables)
  want = jax.jit(plain.apply)(moved, images)[1]
  for conv_impl in ("auto", "shift"):
    model = create_model("test", 7, conv_impl=conv_impl)
    jax.tree.map(np.testing.assert_array_equal, init_variables(model, seed=2), variables)
    np.testing.assert_allclose(jax.jit(model.apply)(moved, images)[1], want, rtol=1e-5, atol=1e-5)


def test_drop_path_only_in_training():
  model = create_model("test", 7, drop_path_rate=0.5)
  images = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  variables = init_variables(model, seed=1)
  # Make the residual branches matter, so dropping them changes the output.
  variables = jax.tree_util.tree_map(lambda p: p + 0.1, variables)
  apply = jax.jit(model.apply, static_argnames="train")
  eval_a, eval_b = apply(variables, images)[1], apply(variables, images)[1]
  np.testing.assert_array_equal(eval_a, eval_b)
  train = lambda seed: apply(variables, images, train=True, rngs={"dropout": jax.random.key(seed)})[1]
  np.testing.assert_array_equal(train(5), train(5))
  assert not np.allclose(train(5), train(6))
  assert not np.allclose(train(5), eval_a)
  with pytest.raises(Exception, match="dropout"):
    jax.eval_shape(lambda: model.apply(variables, images, train=True))


def test_drop_path_rates_rise_linearly():
  model = create_model("test", 7, drop_path_rate=0.4)
  images = jnp.zeros((1, 32, 32, 3))
  variables = jax.eval_shape(lambda: init_variables(model))  # shapes are all the trace below needs
  rates = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, DropPath):  # __call__, or its mask when the block's MLP is one kernel
      rates.setdefault(context.module.scope.path, context.module.rate)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):  # recorded while tracing: nothing needs to run
    jax.eval_shape(lambda v: model.apply(v, images, train=True, rngs={"dropout": jax.random.key(1)}), variables)
  # torch.linspace(0, 0.4, 5) over the 5 blocks of depths (1, 1, 2, 1), in order.
  np.testing.assert_allclose(list(rates.values()), [0.0, 0.1, 0.2, 0.3, 0.4], rtol=1e-6)


@pytest.mark.parametrize("conv_impl", ["auto", "xla"])
def test_bfloat16_compute_keeps_float32_params_and_tracks_float32(conv_impl):
  """bfloat16 against float32 on weights moved away from initialisation (at init every block is near the identity
  and any two models agree): forward within 3 % of the largest output (measured 0.7-1.0 %), parameter gradients
  within 3 % in L2 (measured 0.8 %)."""
  model = create_model("test", 7, dtype=jnp.bfloat16, conv_impl=conv_impl)
  reference = create_model("test", 7, conv_impl="xla")
  rng = np.random.default_rng(4)
  variables = jax.tree.map(lambda p: p + np.float32(0.05) * rng.standard_normal(p.shape, np.float32),
                           init_variables(reference, seed=1))
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables))
  images = np.random.default_rng(0).standard_normal((4, 64, 64, 3)).astype(np.float32)
  labels = np.arange(4) % 7
  features, logits = jax.jit(model.apply)(variables, images)
  assert logits.dtype == jnp.bfloat16
  ref_features, ref_logits = jax.jit(reference.apply)(variables, images)
  for got, want in ((features, ref_features), (logits, ref_logits)):
    assert np.max(np.abs(np.asarray(got, np.float32) - want)) < 0.03 * np.max(np.abs(want))

  def gradient(m):
    loss = lambda p: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        m.apply({"params": p}, images)[1].astype(jnp.float32), labels))
    return np.concatenate([np.ravel(g) for g in jax.tree.leaves(jax.jit(jax.grad(loss))(variables["params"]))])

  got, want = gradient(model), gradient(reference)
  assert got.dtype == np.float32 and np.linalg.norm(got - want) < 0.03 * np.linalg.norm(want)


@pytest.mark.parametrize("conv_impl", ["xla", "auto"])
def test_float32_products_ask_for_float32_precision(conv_impl):
  """Every matrix product and convolution of a training step on float32 operands asks for HIGHEST precision
  (GPUs would otherwise run TF32, TPUs one bfloat16 pass); on bfloat16 operands the backend's default."""
  images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  for dtype in (jnp.float32, jnp.bfloat16):
    model = create_model("test", 7, conv_impl=conv_impl, dtype=dtype)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    loss = lambda v, x: jnp.sum(model.apply(v, x)[1].astype(jnp.float32) ** 2)
    program = jax.jit(jax.grad(loss)).lower(variables, images).as_text()
    products = [line for line in program.splitlines()
                if "stablehlo.dot_general" in line or "stablehlo.convolution" in line]
    assert len(products) >= 10, len(products)  # 'auto' on CPU: the C++ kernels take the rest
    for line in products:
      operand_types = re.search(r": \((tensor<[^>]*>), (tensor<[^>]*>)\) ->", line).groups()
      highest = "HIGHEST" in line
      assert highest == all(t.endswith("xf32>") for t in operand_types), line


def test_forward_mode_autodiff_with_xla_convs():
  """conv_impl='xla' supports jax.jvp (the CPU kernels have reverse-mode rules only, as documented): its
  directional derivative equals the inner product of the default model's gradient with the direction."""
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  direction = jax.random.normal(jax.random.key(1), images.shape)
  weights = jax.random.normal(jax.random.key(2), (2, 7))
  variables = init_variables(create_model("test", 7), seed=3)
  score = lambda model: lambda x: jnp.sum(model.apply(variables, x, train=False)[1] * weights)
  tangent = jax.jit(lambda x, v: jax.jvp(score(create_model("test", 7, conv_impl="xla")), (x,), (v,))[1])(
      images, direction)
  gradient = jax.jit(jax.grad(score(create_model("test", 7))))(images)
  np.testing.assert_allclose(tangent, jnp.vdot(gradient, direction), rtol=1e-4)


def test_unknown_variant_is_a_clear_error():
  with pytest.raises(ValueError, match="Unknown ConvNeXt variant 'huge'.*base"):
    create_model("huge", 7)
