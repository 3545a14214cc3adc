r"""FAER on AffectNet (manually annotated), 7 or 8 expressions; evaluated on the validation set.

  python -m faer_jax.train --config configs/affectnet.py --workdir runs/affectnet7 \
      --config.data.root=/data/AffectNet --config.model.pretrained=/ckpt/convnext_base.pth
  python -m faer_jax.train --config configs/affectnet.py:8 --workdir runs/affectnet8 ...

Argument: '7' (default) or '8' classes, optionally with a variant: 'base,8'.
Class-balanced sampling, a common AffectNet protocol: --config.data.balanced=True.
"""

from faer_jax import config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  num_classes, variant = 7, "base"
  for part in (arg or "").split(","):
    if part in ("7", "8"):
      num_classes = int(part)
    elif part:
      variant = part
  config.task = "fer"
  config.num_classes = num_classes
  config.num_epochs = 60
  config.data.dataset = "affectnet"
  config.data.affectnet_num_classes = num_classes
  config.data.train_split = "train"
  config.data.eval_split = "validation"
  config.data.balanced = False
  config.loss.name = "cross_entropy"
  config.loss.center_loss_weight = 0.01
  config.optimizer.lr = 2.5e-4
  config.model.variant = variant
  return config
