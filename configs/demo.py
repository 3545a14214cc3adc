r"""The embedded default: FAER on synthetic faces in RAF-DB's layout, a few minutes on two CPU cores.

  python -m faer_jax.train --config configs/demo.py --workdir runs/demo
  python -m faer_jax.evaluate --config configs/demo.py --workdir runs/demo --json

The synthetic set is generated on first use into data.root (a cache folder) in
the owners' RAF-DB layout, so the demo goes through the real loader.
"""

import os

from faer_jax import config_lib


def get_config(arg=None):
  del arg
  config = config_lib.base_config()
  config.task = "fer"
  config.num_classes = 7
  config.image_size = 64
  config.batch_size = 32
  config.eval_batch_size = 128
  config.num_epochs = 9
  config.log_every_steps = 20
  config.data.dataset = "rafdb"
  config.data.root = os.path.join(os.path.expanduser("~"), ".cache", "faer_jax", "synthetic")
  config.data.synthetic = True
  config.data.synthetic_num_train = 7000
  config.data.synthetic_num_test = 700
  config.model.variant = "test"
  config.model.drop_path_rate = 0.0
  config.loss.center_loss_weight = 0.01
  # Tuned for a short run on two CPU cores: 9 epochs reach 93-96 % test
  # accuracy on the synthetic expressions, in one to four minutes.
  config.optimizer.lr = 4e-3
  config.optimizer.decay_rate = 0.8
  config.optimizer.warmup_steps = 100
  config.optimizer.backbone_lr_multiplier = 1.0  # nothing is pretrained
  return config
