"""ONNX export through the PyTorch reference, checked with onnxruntime against the Flax model.

  python -m faer_jax.interop export --checkpoint W --format onnx --out model.onnx [--image-size S] [--dynamic-batch]

The Flax parameters become the original's state dict (`to_torch_state_dict`),
which `faer_jax.interop.torch_reference` loads strictly; `torch.onnx.export`
(the dynamo exporter, opset 18) writes the graph: input `images`, float32
(N, 3, S, S), RGB normalised with the ImageNet mean and std as in training;
output `logits` (N, classes). The file's metadata holds the task, the class
names, the image size and the normalisation. Before it returns, onnxruntime
runs the file on a batch of images and its logits are compared with the Flax
model's: above `tolerance` (max |difference| / max |Flax logit|) the file is
removed and ExportError names the difference.
"""

import json
import logging
import os
import warnings

import jax
import numpy as np

from faer_jax.data import transforms
from faer_jax.interop.convert import to_torch_state_dict

TOLERANCE = 1e-5
OPSET = 18


class ExportError(ValueError):
  """An export that could not be written, or whose check failed; the message says which."""


def _torch_model(flax_model, variables):
  import torch
  from faer_jax.interop.torch_reference import FAER

  model = FAER(flax_model.depths, flax_model.dims, flax_model.num_classes,
               cc_attention=flax_model.use_cc_attention).eval()
  state = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in to_torch_state_dict(variables).items()}
  model.load_state_dict(state, strict=True)

  class Logits(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.model = model

    def forward(self, images):
      return self.model(images)[1]

  return Logits().eval()


def export_onnx(flax_model, variables, out: str, *, image_size: int, dynamic_batch: bool = False,
                metadata: dict | None = None, check_batch: int = 3, seed: int = 0,
                tolerance: float = TOLERANCE) -> dict:
  """Writes `out` and checks it; returns {'path', 'max_rel_diff', 'batch', 'image_size', 'dynamic_batch'}.

  Args:
    flax_model: the FAER (or Baseline) module; variables: {'params': ...}.
    out: the .onnx file to write (its folder is created).
    image_size: S of the (N, 3, S, S) input.
    dynamic_batch: a free batch dimension; without it the file takes one image at a time.
    metadata: extra string properties for the file (task, class names, ...).
    check_batch: images onnxruntime and Flax are compared on (one at a time without `dynamic_batch`).
    seed: of the check's images.
    tolerance: the largest relative difference of the logits allowed.
  """
  import onnx
  import onnxruntime
  import torch

  wrapper = _torch_model(flax_model, variables)
  example = torch.zeros(1, 3, image_size, image_size)
  dynamic = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  quiet = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript")]
  levels = [logger.level for logger in quiet]
  for logger in quiet:
    logger.setLevel(logging.ERROR)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", FutureWarning)  # the exporter's own deprecations
      torch.onnx.export(wrapper, (example,), out, input_names=["images"], output_names=["logits"], dynamo=True,
                        dynamic_shapes=dynamic, opset_version=OPSET, verbose=False, external_data=False)
  except Exception as e:  # noqa: BLE001  (the exporter raises many kinds; the message says what)
    raise ExportError(f"torch.onnx.export failed for {out}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
  finally:
    for logger, level in zip(quiet, levels):
      logger.setLevel(level)
  model = onnx.load(out)
  props = {"image_size": str(image_size), "normalization": json.dumps(
      {"mean": transforms.IMAGENET_MEAN, "std": transforms.IMAGENET_STD, "scale": 255, "layout": "NCHW RGB"}),
      **{k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}}
  onnx.helper.set_model_props(model, props)
  onnx.save(model, out)

  # The check: random images in the normalised input range, through onnxruntime and the Flax model.
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 256, (check_batch, image_size, image_size, 3), dtype=np.uint8)
  nhwc = transforms.normalize(pixels)
  session = onnxruntime.InferenceSession(out, providers=["CPUExecutionProvider"])
  nchw = np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2))
  if dynamic_batch:
    ours = session.run(["logits"], {"images": nchw})[0]
  else:
    ours = np.concatenate([session.run(["logits"], {"images": nchw[i:i + 1]})[0] for i in range(check_batch)])
  _, reference = jax.jit(lambda v, x: flax_model.apply(v, x, train=False))(variables, nhwc)
  reference = np.asarray(reference)
  rel = float(np.max(np.abs(ours - reference)) / max(float(np.max(np.abs(reference))), 1e-30))
  if not rel <= tolerance:
    os.remove(out)
    raise ExportError(f"{out}: onnxruntime's logits differ from the Flax model's by {rel:.2e} (relative), above "
                      f"{tolerance:g}; the file was removed")
  return {"path": out, "max_rel_diff": rel, "batch": check_batch, "image_size": image_size,
          "dynamic_batch": dynamic_batch}
