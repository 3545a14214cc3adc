r"""FAER on RAF-DB (basic, 7 expressions), as in the paper.

  python -m faer_jax.train --config configs/rafdb.py --workdir runs/rafdb \
      --config.data.root=/data/RAF-DB --config.model.pretrained=/ckpt/convnext_base.pth

Variants: `configs/rafdb.py:tiny` (any ConvNeXt variant name) changes the backbone.
"""

from faer_jax import config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.task = "fer"
  config.num_classes = 7
  config.num_epochs = 120
  config.data.dataset = "rafdb"
  config.data.train_split = "train"
  config.data.eval_split = "test"
  config.loss.name = "cross_entropy"
  config.loss.center_loss_weight = 0.01
  config.optimizer.lr = 2.5e-4
  config.model.variant = arg or "base"
  return config
