"""Every config in configs/ can train: its state is built, stepped, saved, restored and evaluated.

Each config runs as itself (its task, loss, center loss, optimizer) on the `test`
variant at 64 px, on random batches: what would stop a user's run before its
first epoch ends shows here, without the dataset.
"""

import jax
import numpy as np
import pytest

from faer_jax import checkpoint, config_lib, sharding, steps, train

from conftest import REPO, load_config

# Training runs end to end: `make test-fast` leaves them out.
pytestmark = pytest.mark.slow

# Every config file as it is; AffectNet's 8-class protocol; CelebA with the other losses of Table 3; the paper's
# Baseline (no CC Attention).
CONFIGS = [(path.name, None, {}) for path in sorted((REPO / "configs").glob("*.py"))]
CONFIGS += [("affectnet.py", "8", {}), ("celeba.py", None, {"loss.name": "bce"}),
            ("celeba.py", None, {"loss.name": "asymmetric"}), ("rafdb.py", None, {"model.cc_attention": False})]
IDS = [":".join([name.removesuffix(".py"), *([arg] if arg else []), *map(str, over.values())])
       for name, arg, over in CONFIGS]


def random_batch(config, batch_size: int, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  shape = (batch_size,) if config.task == "fer" else (batch_size, config.num_classes)
  high = config.num_classes if config.task == "fer" else 2
  return {"image": rng.normal(size=(batch_size, config.image_size, config.image_size, 3)).astype(np.float32),
          "label": rng.integers(0, high, shape).astype(np.int32)}


def test_the_configs_are_all_here():
  assert {name for name, _, _ in CONFIGS} >= {"demo.py", "rafdb.py", "affectnet.py", "celeba.py"}


@pytest.mark.parametrize("name,arg,overrides", CONFIGS, ids=IDS)
def test_config_trains_saves_restores_and_evaluates(name, arg, overrides, tmp_path):
  # 64 px: a 2x2 map for CC Attention to attend over (at 32 px its softmax sees one position).
  config = load_config(name, arg, **overrides, **{"model.variant": "test", "image_size": 64, "batch_size": 8})
  config.data.root = config.data.root or str(tmp_path / "unused")
  config_lib.validate(config)
  mesh = sharding.create_mesh(config.fsdp)
  programs = train.build_programs(config, mesh, steps_per_epoch=2)
  state = programs.init(jax.random.key(config.seed))
  assert ("centers" in state) == steps.uses_center_loss(config)
  before = jax.device_get(state["params"])

  batch = random_batch(config, config.batch_size, seed=0)
  for _ in range(2):  # a warm-up's first learning rate is 0
    state, metrics = programs.train_step(state, sharding.make_global_batch(batch, mesh))
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
  moved = jax.tree_util.tree_map_with_path(lambda path, a, b: (jax.tree_util.keystr(path), bool(np.any(a != b))),
                                           before, jax.device_get(state["params"]))
  still = {name for name, changed in jax.tree.leaves(moved, is_leaf=lambda x: isinstance(x, tuple)) if not changed}
  # Both biases add a constant over the positions CC Attention's softmax normalises: their gradients are
  # zero (or rounding noise), and AdamW leaves a zero parameter with zero gradient where it is.
  assert still <= {"['cc_attention']['norm']['bias']", "['cc_attention']['mlp_2']['bias']"}, still

  manager = checkpoint.CheckpointManager(tmp_path / "checkpoints")
  manager.save(1, state, metrics={"accuracy": 0.5}, force=True)
  manager.wait_until_finished()
  restored = manager.restore("latest", programs.abstract_state)
  manager.close()
  assert jax.tree.structure(restored.state) == jax.tree.structure(state)
  np.testing.assert_array_equal(jax.random.key_data(restored.state["rng"]), jax.random.key_data(state["rng"]))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get({k: v for k, v in restored.state.items() if k != "rng"}),
               jax.device_get({k: v for k, v in state.items() if k != "rng"}))

  eval_batch = dict(batch, mask=np.arange(config.batch_size) < 5)
  sums = programs.eval_step(steps.eval_variables(restored.state), sharding.make_global_batch(eval_batch, mesh))
  assert float(sums["count"]) == 5 and np.isfinite(sums["loss_sum"])
