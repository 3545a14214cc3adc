r"""FAER on CelebA: 40 binary attributes with the sigmoid focal loss (gamma 2).

  python -m faer_jax.train --config configs/celeba.py --workdir runs/celeba \
      --config.data.root=/data/CelebA --config.model.pretrained=/ckpt/convnext_base.pth

The paper's Table 3 ablation: --config.loss.name=bce | asymmetric.
Images are 178x218; --config.data.aspect=squash (default, as the original's
Resize((S, S))), center_crop or pad. Variants: `configs/celeba.py:tiny`.
"""

from faer_jax import config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.task = "fae"
  config.num_classes = 40
  config.num_epochs = 60
  config.data.dataset = "celeba"
  config.data.train_split = "train"
  config.data.eval_split = "test"
  config.loss.name = "focal"
  config.loss.focal_gamma = 2.0
  config.loss.center_loss_weight = 0.0
  config.optimizer.lr = 1e-3
  config.model.variant = arg or "base"
  return config
