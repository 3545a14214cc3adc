"""python -m faer_jax.interop {import,export,check,check-train}: move weights between PyTorch and Flax.

  import  --torch-checkpoint X.pth --variant base --num-classes 7 --out DIR
          Writes DIR/variables (an Orbax checkpoint of the Flax variables) and
          DIR/model.json (variant, number of classes), and prints the load report.
  export  --checkpoint DIR --out X.pth [--variant base --num-classes 7]
          Writes a state dict that the original model loads with strict=True.
  check   --variant tiny --num-classes 7 [--torch-checkpoint X.pth]
          [--torch-model FILE.py:NAME [--torch-model-kwargs JSON]]
          [--conv-impl auto|xla] [--float64]
          Runs the PyTorch reference (or, with --torch-model, your copy of the
          original code) and the Flax model on one random batch and prints the
          largest differences of features, logits and (unless --no-gradients)
          every parameter's gradient of the training loss; exits 1 above
          --tolerance.
          Without a checkpoint, weights are drawn at random far from
          initialisation (with gamma = 1e-6 every block is near the identity,
          and agreement would prove little) and copied to the Flax model.
  check-train --config configs/rafdb.py[:VARIANT] [--baseline] [--steps 20] [--batch-size 8]
          [--image-size S] [--data-root P | --synthetic] [--torch-model FILE.py:NAME]
          [--config.KEY=VALUE ...] [--tolerance T] [--json]
          Runs the same N training steps of the config's recipe in PyTorch and
          in JAX, from the same weights on the same batches, and prints the
          losses and the parameters' distance after every step; exits 1 above
          --tolerance, naming the first step and tensor that broke it
          (faer_jax.interop.train_check).

Each takes --baseline for the paper's Baseline: the official ConvNeXt
classifier (no CC Attention), whose state dict is a ConvNeXt release's.
"""

import argparse
import json
import logging
import os
import sys

import numpy as np

from faer_jax.interop import external, train_check
from faer_jax.interop.convert import init_variables, load_state_dict, load_torch_checkpoint, to_torch_state_dict
from faer_jax.interop.torch_io import CheckpointError, read_state_dict
from faer_jax.models import create_model, get_variant


CONV_IMPLS = ("auto", "xla", "shift", "kernel")
# Defaults of check's tolerances, by the precision both sides compute in.
TOLERANCE = {"float32": 5e-6, "float64": 1e-10}
GRAD_TOLERANCE = {"float32": 1e-5, "float64": 1e-10}


def _model_args(p: argparse.ArgumentParser, required: bool) -> None:
  p.add_argument("--variant", required=required, help="ConvNeXt variant, e.g. tiny or base.")
  p.add_argument("--num-classes", type=int, required=required, help="7 (expressions) or 40 (CelebA).")
  p.add_argument("--baseline", action="store_true",
                 help="The paper's Baseline, without CC Attention: the official ConvNeXt classifier.")


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m faer_jax.interop", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("import", help="PyTorch checkpoint -> Orbax checkpoint of Flax variables.")
  p.add_argument("--torch-checkpoint", required=True)
  _model_args(p, required=True)
  p.add_argument("--out", required=True, help="Output directory (must not exist yet).")
  p.add_argument("--strict", action="store_true", help="Fail unless every tensor loads on both sides.")
  p = sub.add_parser("export", help="A trained or imported model -> PyTorch state dict, safetensors or ONNX.")
  p.add_argument("--checkpoint", required=True,
                 help="A training run's workdir, or a directory written by `import`.")
  p.add_argument("--step", default="latest", help="Of a training run: latest, best or a step number.")
  _model_args(p, required=False)
  p.add_argument("--out", required=True, help="Output .pth, .safetensors or .onnx file.")
  p.add_argument("--format", choices=("pth", "safetensors", "onnx"),
                 help="Default: from --out's extension (.onnx: onnx, .safetensors: safetensors, else pth).")
  p.add_argument("--image-size", type=int,
                 help="ONNX: the input's side (default: the training run's image size, 224 for an import).")
  p.add_argument("--dynamic-batch", action="store_true", help="ONNX: a free batch dimension (default: 1).")
  p = sub.add_parser("check", help="Compare the PyTorch reference and the Flax model on one batch.")
  _model_args(p, required=True)
  p.add_argument("--torch-checkpoint", help="Weights for both models (default: random, perturbed).")
  p.add_argument("--batch-size", type=int, default=2)
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--conv-impl", default="auto", choices=CONV_IMPLS,
                 help="The Flax model's implementation (models.create_model): 'auto' runs the CPU kernels on a CPU, "
                      "'xla' the plain XLA form every GPU and TPU runs.")
  p.add_argument("--float64", action="store_true",
                 help="Both frameworks in float64: a faithful model then agrees to ~1e-15 and any difference in "
                      "the computation stands out by orders of magnitude (the CPU kernels are float32 only: the "
                      "Flax side runs its XLA forms).")
  p.add_argument("--tolerance", type=float,
                 help="Largest relative difference allowed (max |difference| / max |PyTorch value|). Default "
                      f"{TOLERANCE['float32']:g} (a faithful float32 model differs by ~1e-6, an approximated GELU "
                      f"or a changed epsilon by 9e-6 to 8e-5); {TOLERANCE['float64']:g} with --float64.")
  p.add_argument("--torch-model", metavar="FILE.py:NAME",
                 help="Your copy of the original PyTorch code instead of this repository's reference: "
                      "FILE.py:NAME or package.module:NAME, NAME(**kwargs) returning the model "
                      "(faer_jax.interop.external).")
  p.add_argument("--torch-model-kwargs", metavar="JSON", help='Its arguments, e.g. \'{"num_classes": 7}\'.')
  p.add_argument("--grad-tolerance", type=float,
                 help="The same for the parameter gradients (max over every tensor, relative to the largest "
                      f"PyTorch gradient). Default {GRAD_TOLERANCE['float32']:g} (a faithful model: up to ~3.3e-6); "
                      f"{GRAD_TOLERANCE['float64']:g} with --float64.")
  p.add_argument("--no-gradients", action="store_true",
                 help="Compare the forward only (default: also every parameter's gradient of the training loss).")
  p.add_argument("--json", action="store_true", help="Print one JSON object.")
  p = sub.add_parser("check-train", help="The same training steps of a config's recipe in PyTorch and in JAX.",
                     description=train_check.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                     allow_abbrev=False)
  p.add_argument("--config", required=True, metavar="FILE.py[:ARG]",
                 help="An experiment config, e.g. configs/rafdb.py or configs/celeba.py:tiny; "
                      "--config.KEY=VALUE changes one of its values (as with faer_jax.train).")
  p.add_argument("--baseline", action="store_true",
                 help="The paper's Baseline, without CC Attention (the same as --config.model.cc_attention=false).")
  p.add_argument("--steps", type=int, default=20, help="Training steps on each side.")
  p.add_argument("--steps-per-epoch", type=int, default=5,
                 help="The schedule's epoch: ExponentialLR steps after this many updates.")
  p.add_argument("--batch-size", type=int, default=8, help="Replaces the config's batch size.")
  p.add_argument("--image-size", type=int, help="Replaces the config's image size.")
  data = p.add_mutually_exclusive_group()
  data.add_argument("--data-root", help="The config's dataset, in its owners' layout (default: --synthetic).")
  data.add_argument("--synthetic", action="store_true",
                    help="Synthetic faces in the config's dataset's layout (the default without --data-root).")
  p.add_argument("--torch-checkpoint", help="Weights both sides start from (default: random, perturbed).")
  p.add_argument("--torch-model", metavar="FILE.py:NAME",
                 help="Your copy of the original PyTorch code instead of this repository's reference (as for "
                      "check); build it without drop path or dropout.")
  p.add_argument("--torch-model-kwargs", metavar="JSON", help='Its arguments, e.g. \'{"num_classes": 7}\'.')
  p.add_argument("--seed", type=int, default=0, help="Initialisation and weight noise.")
  p.add_argument("--tolerance", type=float, default=train_check.TOLERANCE,
                 help="Largest relative distance ||θ_jax − θ_torch|| / ||θ_torch|| of any parameter tensor (and "
                      f"of the centers) after any step (default {train_check.TOLERANCE:g}); the losses may differ "
                      f"by --loss-tolerance ({train_check.LOSS_TOLERANCE:g}).")
  p.add_argument("--loss-tolerance", type=float, default=train_check.LOSS_TOLERANCE,
                 help="Largest relative difference of a step's two losses.")
  p.add_argument("--json", action="store_true",
                 help="Print one JSON object: the setting, `steps` (one record per step), `max_param_rel_diff`, "
                      "`first_failure` and `passed`.")
  return parser


def _save_variables(out: str, variables, variant: str, num_classes: int, cc_attention: bool) -> None:
  import orbax.checkpoint as ocp
  out = os.path.abspath(out)
  if os.path.exists(out):
    raise FileExistsError(f"{out!r} already exists; choose a new --out directory.")
  os.makedirs(out)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(out, "variables"), variables)
  checkpointer.wait_until_finished()
  with open(os.path.join(out, "model.json"), "w") as f:
    json.dump({"variant": variant, "num_classes": num_classes, "cc_attention": cc_attention}, f)


def load_imported(directory: str, variant: str | None = None, num_classes: int | None = None,
                  cc_attention: bool = True):
  """(variables, variant, num_classes, cc_attention) from a directory written by `import` (its model.json wins)."""
  import jax
  import orbax.checkpoint as ocp
  directory = os.path.abspath(directory)
  meta_path = os.path.join(directory, "model.json")
  meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
  variant = variant or meta.get("variant")
  num_classes = num_classes or meta.get("num_classes")
  cc_attention = meta.get("cc_attention", cc_attention)
  if not variant or not num_classes:
    raise ValueError(f"{meta_path!r} is missing: pass --variant and --num-classes.")
  abstract = jax.eval_shape(lambda: init_variables(create_model(variant, num_classes, cc_attention=cc_attention)))
  variables = ocp.StandardCheckpointer().restore(os.path.join(directory, "variables"), abstract)
  return variables, variant, num_classes, cc_attention


def _write_state_dict(state_dict: dict, out: str) -> None:
  if out.endswith(".safetensors"):
    from safetensors.numpy import save_file
    save_file(state_dict, out)
    return
  import torch
  torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, out)


def _relative_max_diff(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
  diff = float(np.max(np.abs(a - b)))
  return diff, diff / max(float(np.max(np.abs(b))), 1e-30)


def _gradient_diffs(flax_grads: dict, torch_model) -> dict:
  """The parameter gradients of both sides compared, under the original's names.

  One scale for all: the largest |difference| over every tensor, relative to
  the largest |PyTorch gradient| (some gradients are exactly zero in exact
  arithmetic, e.g. of biases that add a constant over the positions CC
  Attention's softmax normalises over, and are rounding noise in both).
  """
  from faer_jax.interop import mapping
  named = [(n, p.grad) for n, p in torch_model.named_parameters() if p.grad is not None]
  timm = mapping.is_timm_layout(mapping.strip_wrappers(n) for n, _ in named)
  pairs = []
  for name, grad in named:
    key = mapping.normalize_key(name, timm)
    if key in flax_grads and flax_grads[key].shape == tuple(grad.shape):
      pairs.append((key, flax_grads[key], grad.numpy()))
  if not pairs:
    return {"gradients_compared": f"0 of {len(flax_grads)} tensors (no names in common)",
            "gradients_max_abs_diff": None, "gradients_max_rel_diff": None, "gradients_worst_tensor": None}
  diffs = {key: float(np.max(np.abs(a - b))) for key, a, b in pairs}
  worst = max(diffs, key=diffs.get)
  scale = max(float(np.max(np.abs(b))) for _, _, b in pairs)
  return {"gradients_compared": f"{len(pairs)} of {len(flax_grads)} tensors",
          "gradients_max_abs_diff": diffs[worst], "gradients_max_rel_diff": diffs[worst] / max(scale, 1e-30),
          "gradients_worst_tensor": worst}


def check(variant: str, num_classes: int, torch_checkpoint: str | None = None, batch_size: int = 2,
          image_size: int = 224, seed: int = 0, torch_model: str | None = None,
          torch_model_kwargs: dict | None = None, gradients: bool = True, conv_impl: str = "auto",
          float64: bool = False, cc_attention: bool = True) -> dict:
  """Runs both frameworks on one batch; returns the differences (Flax vs PyTorch).

  Compared: the features and logits of the forward (eval mode), and with
  `gradients` the gradients of every parameter of the training loss
  (cross-entropy of the logits on random labels, averaged over the batch).
  The PyTorch side is `faer_jax.interop.torch_reference`, or with `torch_model`
  ('FILE.py:NAME' or 'package.module:NAME', see faer_jax.interop.external) your
  copy of the original code, built as NAME(**torch_model_kwargs). The Flax
  model is built with `conv_impl`; with `float64` both sides compute in
  float64 from the same (float32) weights. `cc_attention=False` compares the
  Baseline (the official ConvNeXt classifier).
  """
  import jax
  if float64:
    with jax.enable_x64(True):
      return _check(variant, num_classes, torch_checkpoint, batch_size, image_size, seed, torch_model,
                    torch_model_kwargs, gradients, conv_impl, np.float64, cc_attention)
  return _check(variant, num_classes, torch_checkpoint, batch_size, image_size, seed, torch_model,
                torch_model_kwargs, gradients, conv_impl, np.float32, cc_attention)


def _check(variant, num_classes, torch_checkpoint, batch_size, image_size, seed, torch_model, torch_model_kwargs,
           gradients, conv_impl, dtype, cc_attention) -> dict:
  import jax
  import optax
  import torch
  import torch.nn.functional as F
  from faer_jax.interop import external
  from faer_jax.interop.torch_reference import create_torch_model
  feature_dim = get_variant(variant).dims[-1]
  model = create_model(variant, num_classes, conv_impl=conv_impl, dtype=dtype, cc_attention=cc_attention)
  reference = create_model(variant, num_classes, cc_attention=cc_attention)  # float32, for the weights
  torch.manual_seed(seed)  # the model's own initialisation
  if torch_model:
    inner = external.load_torch_model(torch_model, torch_model_kwargs)
    external.check_sizes(inner, variant, num_classes, cc_attention)
  else:
    inner = create_torch_model(variant, num_classes, cc_attention=cc_attention)
  if torch_checkpoint:
    variables, report = load_torch_checkpoint(torch_checkpoint, reference, return_report=True)
    state_dict, _ = read_state_dict(torch_checkpoint)
    external.load_weights(inner, state_dict, torch_checkpoint, require_all=bool(torch_model))
    inner.eval()
    load_summary = report.summary()
  else:
    # Weights far from initialisation: with gamma = 1e-6 every block is near the
    # identity, and agreement would prove little.
    external.perturb(inner, seed)
    state_dict = {k: v.numpy() for k, v in inner.state_dict().items()}
    variables, _ = load_state_dict(state_dict, init_variables(reference), strict=True)
    load_summary = "random weights, perturbed from initialisation"
  # The same weights on both sides, in the precision compared.
  variables = jax.tree.map(lambda a: np.asarray(a, dtype), variables)
  inner_dtype = torch.float64 if dtype == np.float64 else torch.float32
  inner.to(inner_dtype)
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((batch_size, 3, image_size, image_size), np.float32).astype(dtype)
  labels = rng.integers(0, num_classes, batch_size)
  inner.zero_grad(set_to_none=True)
  with torch.set_grad_enabled(gradients):  # no autograd graph for a forward-only check
    torch_features, torch_logits = external.features_and_logits(
        inner(torch.from_numpy(images)), batch_size, num_classes, feature_dim)
    if gradients:
      torch_loss = F.cross_entropy(torch_logits.to(inner_dtype), torch.from_numpy(labels).long())
      torch_loss.backward()
  # As users run it: the float32 model asks for float32 products itself
  # (models.layers.precision), so no precision context here to hide a layer
  # that forgot to on a GPU or TPU.
  nhwc = images.transpose(0, 2, 3, 1)
  features, logits = jax.jit(model.apply)(variables, nhwc)
  fa, fr = (None, None) if torch_features is None else _relative_max_diff(np.asarray(features),
                                                                          torch_features.detach().numpy())
  la, lr = _relative_max_diff(np.asarray(logits), torch_logits.detach().numpy())
  result = {"variant": variant, "num_classes": num_classes, "cc_attention": cc_attention, "weights": load_summary,
            "torch_model": torch_model or "faer_jax.interop.torch_reference",
            "batch_size": batch_size, "image_size": image_size, "backend": jax.default_backend(),
            "conv_impl": conv_impl, "dtype": np.dtype(dtype).name,
            "features_max_abs_diff": fa, "features_max_rel_diff": fr,
            "logits_max_abs_diff": la, "logits_max_rel_diff": lr}
  if gradients:

    def loss_fn(params):
      _, logits = model.apply({**variables, "params": params}, nhwc, train=False)
      return optax.softmax_cross_entropy_with_integer_labels(logits.astype(dtype), labels).mean()

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(variables["params"])
    result["loss_rel_diff"] = abs(float(loss) - torch_loss.item()) / max(abs(torch_loss.item()), 1e-30)
    result.update(_gradient_diffs(to_torch_state_dict({"params": grads}, dtype), inner))
  return result


def _export(args) -> int:
  from faer_jax.interop import onnx_export
  fmt = args.format or ("onnx" if args.out.endswith(".onnx") else
                        "safetensors" if args.out.endswith(".safetensors") else "pth")
  if not os.path.isdir(args.checkpoint):
    raise ValueError(f"--checkpoint {args.checkpoint}: not a folder (a training run's workdir, or a directory "
                     "written by `import`)")
  if os.path.exists(os.path.join(args.checkpoint, "config.json")):  # a training run
    from faer_jax import predict
    loaded = predict.load_model(args.checkpoint, args.step)
    flax_model, variables = loaded.model, {"params": loaded.params}
    image_size, metadata = loaded.image_size, {"task": loaded.task, "class_names": list(loaded.class_names)}
  else:
    variables, variant, num_classes, cc_attention = load_imported(args.checkpoint, args.variant,
                                                                  args.num_classes, not args.baseline)
    flax_model = create_model(variant, num_classes, cc_attention=cc_attention)
    image_size, metadata = 224, {"num_classes": num_classes}
  kind = "the original FAER" if flax_model.use_cc_attention else "the Baseline (ConvNeXt)"
  if fmt == "onnx":
    try:
      done = onnx_export.export_onnx(flax_model, variables, args.out, image_size=args.image_size or image_size,
                                     dynamic_batch=args.dynamic_batch, metadata=metadata)
    except ImportError as e:
      raise ValueError(f"ONNX export needs torch, onnx, onnxscript and onnxruntime ({e}): "
                       "pip install 'faer-jax[onnx]'") from None
    size = done["image_size"]
    print(f"Wrote {args.out}: {kind}, input images ({'N' if done['dynamic_batch'] else 1}, 3, {size}, {size}); "
          "onnxruntime matches the Flax model to "
          f"{done['max_rel_diff']:.1e} (relative) on {done['batch']} images.")
    return 0
  if fmt == "safetensors" and not args.out.endswith(".safetensors"):
    raise ValueError(f"--format safetensors: name the file .safetensors, not {args.out}")
  _write_state_dict(to_torch_state_dict(variables), args.out)
  print(f"Wrote {args.out}: {kind}'s state dict ({flax_model.num_classes} classes).")
  return 0


def _check_train(args, overrides: list[str]) -> int:
  from faer_jax import config_lib
  config = config_lib.load_file(args.config)
  config_lib.apply_overrides(config, overrides)
  if args.baseline:
    config.model.cc_attention = False
  result = train_check.check_train(
      config, num_steps=args.steps, steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size,
      image_size=args.image_size, data_root=args.data_root,
      torch_model=args.torch_model, torch_model_kwargs=external.parse_kwargs(args.torch_model_kwargs),
      torch_checkpoint=args.torch_checkpoint, seed=args.seed, tolerance=args.tolerance,
      loss_tolerance=args.loss_tolerance)
  print(json.dumps(result) if args.json else train_check.format_table(result))
  return 0 if result["passed"] else 1


def main(argv: list[str] | None = None) -> int:
  parser = _parser()
  args, rest = parser.parse_known_args(argv)
  unknown = [t for t in rest if args.command != "check-train" or not t.startswith("--config.")]
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)}")
  overrides = [t[len("--config."):] for t in rest]
  logging.basicConfig(level=logging.WARNING, format="%(message)s")
  logging.getLogger("faer_jax").setLevel(logging.INFO)
  try:
    if args.command == "check-train":
      return _check_train(args, overrides)
    if args.command == "import":
      model = create_model(args.variant, args.num_classes, cc_attention=not args.baseline)
      variables, report = load_torch_checkpoint(args.torch_checkpoint, model, strict=args.strict,
                                                return_report=True)
      _save_variables(args.out, variables, args.variant, args.num_classes, not args.baseline)
      print(f"Wrote {os.path.abspath(args.out)}\n{report.summary()}")
    elif args.command == "export":
      return _export(args)
    else:
      result = check(args.variant, args.num_classes, args.torch_checkpoint, args.batch_size, args.image_size,
                     args.seed, args.torch_model, external.parse_kwargs(args.torch_model_kwargs),
                     gradients=not args.no_gradients, conv_impl=args.conv_impl, float64=args.float64,
                     cc_attention=not args.baseline)
      precision = "float64" if args.float64 else "float32"
      tolerance = TOLERANCE[precision] if args.tolerance is None else args.tolerance
      grad_tolerance = GRAD_TOLERANCE[precision] if args.grad_tolerance is None else args.grad_tolerance
      # Features only where the PyTorch model returns them; gradients unless --no-gradients.
      outputs = [d for d in (result["features_max_rel_diff"], result["logits_max_rel_diff"]) if d is not None]
      ok = max(outputs) <= tolerance
      if result.get("gradients_max_rel_diff") is not None:
        ok = ok and result["gradients_max_rel_diff"] <= grad_tolerance
        result.update(grad_tolerance=grad_tolerance)
      result.update(tolerance=tolerance, ok=ok)
      if args.json:
        print(json.dumps(result))
      else:
        for k, v in result.items():
          print(f"{k:>22}: {v:.3e}" if isinstance(v, float) else f"{k:>22}: {v}")
      return 0 if ok else 1
  except (CheckpointError, FileExistsError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0
