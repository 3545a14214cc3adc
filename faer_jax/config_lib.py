"""The experiment config: defaults shared by configs/*.py, and the checks run before anything compiles.

A config file's `get_config(arg=None)` starts from `base_config()` and changes
what its experiment needs. Every knob has a default here, so a typo on the
command line (`--config.batch_szie=64`) fails at once: configs are locked.
"""

import ast
import importlib.util
import json
import os

import ml_collections
from ml_collections import config_dict

from faer_jax import optim
from faer_jax.models import CONV_IMPLS, VARIANTS

TASKS = ("fer", "fae")  # expression recognition (one of K) / attribute estimation (K binary)
LOSSES = ("cross_entropy", "focal", "bce", "asymmetric")
DTYPES = ("float32", "bfloat16")


def base_config() -> ml_collections.ConfigDict:
  """Every knob, with the paper's values where the paper sets one."""
  c = ml_collections.ConfigDict()
  c.task = "fer"
  c.num_classes = 7
  c.image_size = 224
  c.batch_size = 256          # global, over all devices of all processes
  c.eval_batch_size = 256     # global
  c.num_epochs = 120
  c.num_train_steps = -1      # > 0 replaces num_epochs
  c.eval_every_steps = 0      # 0: once per epoch
  c.checkpoint_every_steps = 0  # 0: once per epoch; also at the end and on SIGTERM
  c.log_every_steps = 50
  c.max_checkpoints_to_keep = 3
  c.seed = 0
  c.fsdp = 1                  # > 1 shards parameters and optimizer state over this many devices

  c.data = ml_collections.ConfigDict()
  c.data.dataset = "rafdb"    # rafdb | affectnet | celeba | tfds
  c.data.root = ""
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.tfds_name = ""       # dataset == 'tfds': the builder name, e.g. 'celeb_a'
  c.data.affectnet_num_classes = 7
  c.data.affectnet_crop_face = False
  c.data.balanced = False     # class-balanced sampling (a common AffectNet protocol)
  c.data.random_flip = True
  c.data.aspect = "squash"    # squash | center_crop | pad (CelebA's 178x218)
  c.data.skip_bad_images = False
  c.data.num_workers = 0      # grain worker processes per host
  c.data.synthetic = False    # generate the synthetic face set into `root` first
  c.data.synthetic_num_train = 3500
  c.data.synthetic_num_test = 700

  c.model = ml_collections.ConfigDict()
  c.model.variant = "base"
  c.model.cc_attention = True  # False: the paper's Baseline (ConvNeXt -> pool -> LayerNorm -> head)
  c.model.pretrained = ""     # a PyTorch checkpoint (FAER, ConvNeXt or timm); see faer_jax.interop
  c.model.drop_path_rate = 0.25
  c.model.layer_scale_init_value = 1e-6
  c.model.head_init_scale = 1.0
  c.model.dtype = "float32"   # computation dtype; parameters stay float32
  c.model.conv_impl = "auto"   # the layers' implementation (faer_jax.models.implementations)

  c.loss = ml_collections.ConfigDict()
  c.loss.name = "cross_entropy"
  c.loss.label_smoothing = 0.0
  c.loss.center_loss_weight = 0.01  # λ of the paper (Fig. 3); 0 turns the center loss off
  c.loss.center_alpha = 0.5         # Wen et al.'s center update rate
  c.loss.focal_gamma = 2.0
  c.loss.focal_alpha = config_dict.placeholder(float)  # the original code: 0.8

  c.optimizer = optim.default_config()
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad value; called before anything is built."""
  def check(ok, message):
    if not ok:
      raise ValueError(f"Bad config: {message}")
  check(config.task in TASKS, f"task={config.task!r}; expected one of {TASKS}")
  check(config.model.variant in VARIANTS, f"model.variant={config.model.variant!r}; expected one of {sorted(VARIANTS)}")
  check(config.model.dtype in DTYPES, f"model.dtype={config.model.dtype!r}; expected one of {DTYPES}")
  check(config.model.conv_impl in CONV_IMPLS,
        f"model.conv_impl={config.model.conv_impl!r}; expected one of {CONV_IMPLS}")
  check(config.loss.name in LOSSES, f"loss.name={config.loss.name!r}; expected one of {LOSSES}")
  check((config.task == "fer") == (config.loss.name == "cross_entropy"),
        f"loss.name={config.loss.name!r} does not fit task={config.task!r} (fer: cross_entropy; "
        "fae: focal, bce or asymmetric)")
  check(config.num_classes > 1, f"num_classes={config.num_classes}")
  check(config.image_size >= 32 and config.image_size % 32 == 0,
        f"image_size={config.image_size}; must be a multiple of 32 (ConvNeXt downsamples 32x)")
  for key in ("batch_size", "eval_batch_size", "log_every_steps"):
    check(config[key] > 0, f"{key}={config[key]} must be positive")
  check(config.num_train_steps > 0 or config.num_epochs > 0, "set num_epochs or num_train_steps > 0")
  check(config.data.dataset in ("rafdb", "affectnet", "celeba", "tfds"), f"data.dataset={config.data.dataset!r}")
  check(bool(config.data.root), "data.root is empty: pass --config.data.root=/path/to/dataset")
  check(config.model.pretrained == "" or os.path.isfile(config.model.pretrained),
        f"model.pretrained={config.model.pretrained!r} is not a file")
  check(config.fsdp >= 1, f"fsdp={config.fsdp}")


def save(config: ml_collections.ConfigDict, path: str) -> None:
  with open(path, "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


def load(path: str) -> ml_collections.ConfigDict:
  """A config saved by `save` (the resolved config of a training run), locked."""
  with open(path) as f:
    values = json.load(f)
  config = base_config()
  config.unlock()
  config.update_from_flattened_dict(flatten(values))
  config.lock()
  return config


def flatten(tree: dict, prefix: str = "") -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, prefix + k + "."))
    else:
      out[prefix + k] = v
  return out


def load_file(spec: str) -> ml_collections.ConfigDict:
  """The config of `FILE.py` or `FILE.py:ARG` (its `get_config(ARG)`), as `--config` reads it; unlocked."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ValueError(f"config {spec!r}: {path} is not a file (e.g. configs/rafdb.py or configs/rafdb.py:tiny)")
  module_spec = importlib.util.spec_from_file_location(
      "faer_jax_config_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config {spec!r}: {path} has no get_config()")
  return module.get_config(arg or None)


def _parse_value(text: str, field_type):
  if text.lower() == "none":
    return None
  if field_type is bool:
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"{text!r} is not a bool")
    return text.lower() in ("true", "1")
  if field_type in (int, float, str):
    return field_type(text)
  return ast.literal_eval(text)  # tuples and lists


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
  """Sets `KEY=VALUE` pairs (dotted keys, values parsed as the field's type), as `--config.KEY=VALUE` does."""
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"--config.{item}: expected --config.KEY=VALUE")
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise ValueError(f"--config.{key}: no such config key")
    try:
      value = _parse_value(text, node.get_ref(leaf).get_type())
    except (ValueError, SyntaxError) as e:
      raise ValueError(f"--config.{key}={text}: {e}") from None
    with node.ignore_type():
      node[leaf] = value
