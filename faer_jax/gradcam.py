r"""Grad-CAM (Selvaraju et al., 2017) maps of a trained FAER, as in the paper's Figs. 5 and 6.

  python -m faer_jax.gradcam --workdir runs/demo face1.jpg face2.jpg --out cams/ \
      [--target predicted|CLASS] [--layer cc_attention|stage4] [--checkpoint best]

For the chosen layer's activations A (B, h, w, C) and the target logit y:
channel weights w_c = mean_{h,w} dy/dA; map = ReLU(sum_c w_c A_c), upsampled
bilinearly to the image and scaled to [0, 1]. Gradients come from jax.grad
through the model's tail (CC Attention and/or the head). Writes one overlay
PNG per image and a grid PNG with the class names as titles.
"""

import argparse
import os
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from faer_jax import compile_cache, predict
from faer_jax.models import layers
from faer_jax.models.faer import FAER

LAYERS = ("cc_attention", "stage4")


def gradcam(model, params, images: jax.Array, targets: jax.Array, layer: str = "cc_attention"):
  """Grad-CAM maps at the layer's resolution, unnormalised, and the logits.

  Args:
    model: a FAER module.
    params: its parameters.
    images: (B, S, S, 3) preprocessed images.
    targets: (B,) int, the logit to explain for each image.
    layer: 'cc_attention' (the CC Attention output) or 'stage4' (the last backbone stage).

  Returns:
    (cams (B, h, w) float32 >= 0, logits (B, K)).
  """
  if layer not in LAYERS:
    raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")
  variables = {"params": params}
  activations = model.apply(variables, images, method=FAER.extract)
  if layer == "cc_attention":
    activations = model.apply(variables, activations, method=FAER.attend)
    tail = lambda a: model.apply(variables, a, method=FAER.classify)[1]
  else:
    tail = lambda a: model.apply(variables, model.apply(variables, a, method=FAER.attend), method=FAER.classify)[1]

  def target_logit_sum(a):
    # Examples are independent, so the gradient of the sum is each one's own.
    logits = tail(a)
    return jnp.sum(jnp.take_along_axis(logits, targets[:, None], axis=1)), logits

  grads, logits = jax.grad(target_logit_sum, has_aux=True)(activations)
  weights = jnp.mean(grads, axis=(1, 2))                                   # (B, C)
  cams = jax.nn.relu(jnp.einsum("bhwc,bc->bhw", activations, weights, precision=layers.precision(activations.dtype)))
  return cams.astype(jnp.float32), logits


def upsample(cams: np.ndarray, size: int) -> np.ndarray:
  """Bilinear upsampling to (size, size) and per-image scaling to [0, 1] (an all-zero map stays 0)."""
  cams = np.asarray(jax.image.resize(jnp.asarray(cams), (cams.shape[0], size, size), "bilinear"))
  peak = cams.reshape(len(cams), -1).max(axis=1)
  return cams / np.where(peak > 0, peak, 1.0)[:, None, None]


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
  """The jet-coloured map blended over a uint8 image."""
  from matplotlib import colormaps
  heat = colormaps["jet"](cam)[..., :3] * 255
  return np.clip((1 - alpha) * image + alpha * heat, 0, 255).astype(np.uint8)


def save_grid(images: Sequence[np.ndarray], overlays: Sequence[np.ndarray], titles: Sequence[str], path: str) -> None:
  """Originals on the top row, maps below, a title over each column."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  n = len(images)
  fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 4.6), squeeze=False)
  for i in range(n):
    axes[0, i].imshow(images[i])
    axes[1, i].imshow(overlays[i])
    axes[0, i].set_title(titles[i], fontsize=9)
    for ax in axes[:, i]:
      ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m faer_jax.gradcam", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")
  p.add_argument("--workdir", required=True, help="A training run's workdir, or an imported model's directory.")
  p.add_argument("--out", required=True, help="Folder for the PNGs (created).")
  p.add_argument("--checkpoint", default="latest")
  p.add_argument("--target", default="predicted", help="'predicted', or a class name or index to explain.")
  p.add_argument("--layer", default="cc_attention", choices=LAYERS)
  p.add_argument("--class-names", help="Comma-separated names, for an imported model without them.")
  return p


def _target_index(target: str, class_names: Sequence[str]) -> int | None:
  if target == "predicted":
    return None
  if target in class_names:
    return list(class_names).index(target)
  if target.isdigit() and int(target) < len(class_names):
    return int(target)
  raise ValueError(f"--target {target!r} is neither 'predicted' nor one of {list(class_names)} (or an index).")


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  compile_cache.enable()
  try:
    loaded = predict.load_model(args.workdir, args.checkpoint,
                                  args.class_names.split(",") if args.class_names else None)
    fixed_target = _target_index(args.target, loaded.class_names)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  paths, shown, inputs, status = [], [], [], 0
  for path, resized, x in predict.read_images(predict.expand_inputs(args.images), loaded.image_size,
                                                loaded.aspect):
    if isinstance(x, Exception):
      print(f"error: cannot read {path}: {x.reason}", file=sys.stderr)
      status = 1
      continue
    paths.append(path)
    shown.append(resized)
    inputs.append(x)
  if not inputs:
    return status or 2
  batch = jnp.asarray(np.stack(inputs))
  logits = jax.jit(lambda p, x: loaded.model.apply({"params": p}, x)[1])(loaded.params, batch)
  targets = jnp.full((len(inputs),), fixed_target) if fixed_target is not None else jnp.argmax(logits, -1)
  cams, logits = jax.jit(gradcam, static_argnums=(0, 4))(loaded.model, loaded.params, batch, targets, args.layer)
  maps = upsample(np.asarray(cams), loaded.image_size)
  probs = predict.probabilities(loaded.task, np.asarray(logits))
  os.makedirs(args.out, exist_ok=True)
  from PIL import Image
  overlays, titles = [], []
  for path, image, cam, t, p in zip(paths, shown, maps, np.asarray(targets), probs):
    overlays.append(overlay(image, cam))
    titles.append(f"{loaded.class_names[t]} ({100 * p[t]:.0f}%)")
    name = os.path.splitext(os.path.basename(path))[0] + f"_gradcam_{args.layer}.png"
    Image.fromarray(overlays[-1]).save(os.path.join(args.out, name))
  grid = os.path.join(args.out, f"gradcam_grid_{args.layer}.png")
  save_grid(shown, overlays, titles, grid)
  print(f"wrote {len(overlays)} overlays and {grid}")
  return status


if __name__ == "__main__":
  sys.exit(main())
