"""PyTorch <-> Flax: numerical parity, every checkpoint layout, the load report, the CLI."""

import json
import os
import pickle
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faer_jax.interop import (CheckpointError, init_variables, load_state_dict, load_torch_checkpoint,
                              to_torch_state_dict)
from faer_jax.interop import cli
from faer_jax.models import create_backbone, create_model

torch = pytest.importorskip("torch")
F = torch.nn.functional
from faer_jax.interop.torch_reference import create_torch_model  # noqa: E402  (needs torch)

DATA = os.path.join(os.path.dirname(__file__), "data")
# Counted, not computed by the code under test: the original's CC Attention has 10 tensors
# (attention.{mlp.0, mlp.2, value, depthwise, norm}.{weight, bias}; 10 'attention.' keys in
# data/faer_original_tiny_7classes.txt). The 'test' variant (depths 1, 1, 2, 1) has 75: four
# downsampling layers of 4 (conv and norm, weight and bias), five blocks of 9 (dwconv, norm, pwconv1,
# pwconv2: weight and bias; gamma), CC Attention's 10, the final norm's 2 and the head's 2.
ATTENTION_TENSORS = 10
TEST_VARIANT_TENSORS = 4 * 4 + 5 * 9 + ATTENTION_TENSORS + 2 + 2
EVERY_TEST_GRADIENT = f"{TEST_VARIANT_TENSORS} of {TEST_VARIANT_TENSORS} tensors"
TOL = 5e-6  # relative max difference, float32 (a correct model: ~1e-6; see test_cli_check_catches_numerics_bugs)


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _perturbed_torch(variant, num_classes, seed=0, cc_attention=True):
  torch.manual_seed(seed)
  model = create_torch_model(variant, num_classes, cc_attention=cc_attention).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)  # gamma 1e-6 -> ~0.05: every block now matters
  return model


def _numpy_state(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _images(n=2, size=64, seed=0):
  return np.random.default_rng(seed).standard_normal((n, 3, size, size), np.float32)


def _torch_out(model, images):
  with torch.no_grad():
    return tuple(t.numpy() for t in model(torch.from_numpy(images)))


def _flax_out(model, variables, images):
  return jax.jit(model.apply)(variables, jnp.asarray(images.transpose(0, 2, 3, 1)))


@pytest.fixture(scope="module")
def tiny_pair():
  """A perturbed PyTorch FAER-tiny and the Flax model loaded from it."""
  torch_model = _perturbed_torch("tiny", 7)
  model = create_model("tiny", 7)
  variables, report = load_state_dict(_numpy_state(torch_model), init_variables(model), strict=True)
  assert report.clean and len(report.loaded) == len(torch_model.state_dict())
  return torch_model, model, variables


# --- Parity ------------------------------------------------------------------

# 'auto' runs the CPU kernels here; 'xla' is the plain form every GPU and TPU runs.
CONV_IMPLS = ["auto", "xla"]


@pytest.mark.parametrize("conv_impl", CONV_IMPLS)
@pytest.mark.parametrize("variant,size", [("test", 64), ("atto", 64)])
def test_torch_to_flax_parity(variant, size, conv_impl):
  torch_model = _perturbed_torch(variant, 7)
  model = create_model(variant, 7, conv_impl=conv_impl)
  variables, _ = load_state_dict(_numpy_state(torch_model), init_variables(model), strict=True)
  images = _images(size=size)
  tf, tl = _torch_out(torch_model, images)
  jf, jl = _flax_out(model, variables, images)
  assert _rel(jf, tf) < TOL and _rel(jl, tl) < TOL
  assert np.std(tl) > 1e-2  # not a degenerate output that any two models share


def test_tiny_parity_at_224(tiny_pair):
  torch_model, model, variables = tiny_pair
  images = _images(n=1, size=224)
  tf, tl = _torch_out(torch_model, images)
  jf, jl = _flax_out(model, variables, images)
  assert _rel(jf, tf) < TOL and _rel(jl, tl) < TOL


def _quiet_norm_inputs(model, scale=1e-3):
  """Scales the layers feeding the stem's, the blocks' and CC Attention's LayerNorms, so that each
  sees a variance near its epsilon: there the epsilon decides the output."""
  with torch.no_grad():
    layers = [model.downsample_layers[0][0], model.attention.depthwise]
    layers += [block.dwconv for stage in model.stages for block in stage]
    for layer in layers:
      layer.weight.mul_(scale)
      layer.bias.mul_(scale)
  return model


@pytest.mark.parametrize("eps_of", [None, "stem", "blocks", "attention"])
def test_parity_where_the_epsilons_decide(eps_of):
  """With random weights the norms see variances far above their epsilons, and a wrong epsilon moves the
  outputs by under 1e-6 for CC Attention's. With their inputs scaled down the Flax model still matches
  (5e-7 relative), and a PyTorch model with one epsilon changed does not: the stem's or the blocks' 1e-6
  to torch's default 1e-5 (0.44, 1.9e-3), CC Attention's 1e-5 to the backbone's 1e-6 (9.5e-3)."""
  torch_model = _quiet_norm_inputs(_perturbed_torch("test", 7, seed=5))
  model = create_model("test", 7)
  variables, _ = load_state_dict(_numpy_state(torch_model), init_variables(model), strict=True)
  if eps_of == "stem":
    torch_model.downsample_layers[0][1].eps = 1e-5
  elif eps_of == "blocks":
    for stage in torch_model.stages:
      for block in stage:
        block.norm.eps = 1e-5
  elif eps_of == "attention":
    torch_model.attention.norm.eps = 1e-6
  images = _images(size=64, seed=2)
  tf, tl = _torch_out(torch_model, images)
  jf, jl = _flax_out(model, variables, images)
  difference = max(_rel(jf, tf), _rel(jl, tl))
  if eps_of is None:
    assert difference < TOL
  else:
    assert difference > 10 * TOL, difference


@pytest.mark.parametrize("conv_impl", CONV_IMPLS)
@pytest.mark.parametrize("variant", ["test", "atto"])
def test_flax_to_torch_parity(variant, conv_impl):
  model = create_model(variant, 7, conv_impl=conv_impl)
  variables = init_variables(model, seed=3)
  # Noise from numpy: a jax.random.normal per parameter shape compiled a program each, ~20 s of this test.
  rng = np.random.default_rng(4)
  variables = jax.tree_util.tree_map(lambda p: p + np.float32(0.05) * rng.standard_normal(p.shape, np.float32),
                                     variables)
  torch_model = create_torch_model(variant, 7).eval()
  torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in to_torch_state_dict(variables).items()},
                              strict=True)
  images = _images(size=64, seed=1)
  tf, tl = _torch_out(torch_model, images)
  jf, jl = _flax_out(model, variables, images)
  assert _rel(jf, tf) < TOL and _rel(jl, tl) < TOL


# --- The paper's Baseline: ConvNeXt -> pool -> LayerNorm -> head, no CC Attention ---

@pytest.mark.parametrize("conv_impl", CONV_IMPLS)
def test_baseline_parity_forward_and_gradients_in_float64(conv_impl):
  result = cli.check("test", 7, image_size=64, conv_impl=conv_impl, float64=True, cc_attention=False)
  assert result["cc_attention"] is False
  # The test variant's tensors without CC Attention's.
  assert result["gradients_compared"] == f"{TEST_VARIANT_TENSORS - 10} of {TEST_VARIANT_TENSORS - 10} tensors"
  assert max(result["features_max_rel_diff"], result["logits_max_rel_diff"], result["gradients_max_rel_diff"]) < 1e-13


def test_baseline_is_the_official_convnext_classifier(tmp_path):
  """A ConvNeXt release with its 1000-class head loads whole into the Baseline, and its logits are those of an
  independent functional ConvNeXt with the release's head (mean over H x W, LayerNorm 1e-6, Linear)."""
  torch_model = _perturbed_torch("atto", 1000, seed=4, cc_attention=False)
  state = torch_model.state_dict()
  assert not any(k.startswith("attention.") for k in state)
  torch.save({"model": state}, tmp_path / "convnext_atto_1k.pth")
  model = create_model("atto", 1000, cc_attention=False)
  variables, report = load_torch_checkpoint(str(tmp_path / "convnext_atto_1k.pth"), model, strict=True,
                                            return_report=True)
  assert report.clean and len(report.loaded) == len(state) and "cc_attention" not in variables["params"]
  images = _images(size=64, seed=5)
  timm_state = _to_timm(state, conv_mlp=False)
  with torch.no_grad():
    pooled = _timm_style_features(timm_state, (2, 2, 6, 2), torch.from_numpy(images)).mean(dim=(2, 3))
    logits = F.linear(F.layer_norm(pooled, pooled.shape[1:], timm_state["head.norm.weight"],
                                   timm_state["head.norm.bias"], 1e-6), timm_state["head.fc.weight"],
                      timm_state["head.fc.bias"]).numpy()
  features, got = _flax_out(model, variables, images)
  assert _rel(features, pooled.numpy()) < TOL and _rel(got, logits) < TOL
  # Into a 7-class Baseline the 1000-class head is reported and skipped; into FAER, CC Attention is missing.
  _, report = load_torch_checkpoint(str(tmp_path / "convnext_atto_1k.pth"), create_model("atto", 7, cc_attention=False),
                                    return_report=True)
  assert sorted(k for k, _ in report.skipped) == ["head.bias", "head.weight"] and not report.missing


def test_baseline_import_predict_gradcam_export(tmp_path, capsys):
  """`interop import --baseline` writes a model the other commands read as the Baseline."""
  from PIL import Image
  from faer_jax import gradcam, predict
  torch_model = _perturbed_torch("test", 7, seed=6, cc_attention=False)
  torch.save({"model": torch_model.state_dict()}, tmp_path / "baseline.pth")
  out = tmp_path / "imported"
  assert cli.main(["import", "--torch-checkpoint", str(tmp_path / "baseline.pth"), "--variant", "test",
                   "--num-classes", "7", "--out", str(out), "--strict", "--baseline"]) == 0
  assert json.load(open(out / "model.json"))["cc_attention"] is False
  face = tmp_path / "face.png"
  Image.fromarray((np.random.default_rng(0).random((80, 80, 3)) * 255).astype(np.uint8)).save(face)
  capsys.readouterr()
  assert predict.main(["--workdir", str(out), "--json", str(face)]) == 0
  predicted = json.loads(capsys.readouterr().out)["predictions"][0]
  with torch.no_grad():
    x = predict.read_image(str(face), 224, "squash")[1].transpose(2, 0, 1)[None]
    want = torch.softmax(torch_model(torch.from_numpy(np.ascontiguousarray(x)))[1], -1).numpy()[0]
  np.testing.assert_allclose(list(predicted["probabilities"].values()), want, atol=1e-5)
  assert gradcam.main(["--workdir", str(out), "--out", str(tmp_path / "cams"), str(face)]) == 0
  assert cli.main(["export", "--checkpoint", str(out), "--out", str(tmp_path / "back.pth")]) == 0
  back = torch.load(tmp_path / "back.pth", weights_only=True)
  assert back.keys() == torch_model.state_dict().keys()


def test_round_trip_is_exact(tiny_pair):
  torch_model, _, variables = tiny_pair
  original = _numpy_state(torch_model)
  exported = to_torch_state_dict(variables)
  assert exported.keys() == original.keys()
  for k in original:
    np.testing.assert_array_equal(exported[k], original[k], err_msg=k)


# --- Key names of the real checkpoints (tests/data, from shared/checkpoint_keys) ---

def _read_key_list(name):
  shapes = {}
  for line in open(os.path.join(DATA, name)):
    if line.startswith("#") or not line.strip():
      continue
    key, shape = re.match(r"(\S+) \((.*)\)", line.strip()).groups()
    shapes[key] = tuple(int(s) for s in shape.split(",") if s.strip())
  return shapes


def test_export_matches_original_key_list():
  expected = _read_key_list("faer_original_tiny_7classes.txt")
  params = jax.eval_shape(lambda: init_variables(create_model("tiny", 7)))
  exported = to_torch_state_dict(jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), params))
  assert {k: v.shape for k, v in exported.items()} == expected


def test_original_key_list_loads_strictly():
  shapes = _read_key_list("faer_original_tiny_7classes.txt")
  rng = np.random.default_rng(0)
  state = {"module." + k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
  variables, report = load_state_dict(state, init_variables(create_model("tiny", 7)), strict=True)
  assert report.clean and len(report.loaded) == len(shapes)
  np.testing.assert_array_equal(variables["params"]["cc_attention"]["depthwise"]["kernel"],
                                state["module.attention.depthwise.weight"].transpose(2, 3, 1, 0))


def test_timm_key_list_loads_backbone_and_reports_the_rest():
  shapes = _read_key_list("timm_convnext_tiny.txt")
  state = {k: np.ones(s, np.float32) for k, s in shapes.items()}
  _, report = load_state_dict(state, init_variables(create_model("tiny", 7)))
  assert report.layout == "timm" and not report.unexpected
  assert sorted(k for k, _ in report.skipped) == ["head.bias", "head.weight"]  # 1000 classes vs 7
  assert all(k.startswith("attention.") for k in report.missing) and len(report.missing) == ATTENTION_TENSORS
  assert len(report.loaded) == len(shapes) - 2


# --- Checkpoint files and layouts ----------------------------------------------

def test_dataparallel_training_checkpoint(tmp_path, tiny_pair):
  """The original training script's file: {'state_dict': {'module.' + k}, 'epoch', 'best_acc', 'optimizer'}."""
  torch_model, model, variables = tiny_pair
  optimizer = torch.optim.AdamW(torch_model.parameters())
  path = tmp_path / "faer_best.pth"
  torch.save({"epoch": 37, "best_acc": np.float64(91.5),
              "state_dict": {"module." + k: v for k, v in torch_model.state_dict().items()},
              "optimizer": optimizer.state_dict()}, path)
  loaded, report = load_torch_checkpoint(str(path), model, strict=True, return_report=True)
  assert report.container == "state_dict"
  for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(variables)):
    np.testing.assert_array_equal(a, b)


def test_official_convnext_release_into_faer(tmp_path, tiny_pair):
  """{'model': backbone + norm + 1000-class head}: CC Attention stays fresh, the head is skipped."""
  torch_model, _, _ = tiny_pair
  state = {k: v for k, v in torch_model.state_dict().items() if not k.startswith(("attention.", "head."))}
  state["head.weight"], state["head.bias"] = torch.randn(1000, 768), torch.randn(1000)
  path = tmp_path / "convnext_tiny_1k_224_ema.pth"
  torch.save({"model": state}, path)
  model = create_model("tiny", 7)
  fresh = init_variables(model, seed=5)
  variables, report = load_torch_checkpoint(str(path), model, seed=5, return_report=True)
  assert report.container == "model"
  assert sorted(k for k, _ in report.skipped) == ["head.bias", "head.weight"]
  assert len(report.missing) == ATTENTION_TENSORS and not report.unexpected
  np.testing.assert_array_equal(variables["params"]["cc_attention"]["value"]["kernel"],
                                fresh["params"]["cc_attention"]["value"]["kernel"])
  np.testing.assert_array_equal(variables["params"]["head"]["kernel"], fresh["params"]["head"]["kernel"])
  np.testing.assert_array_equal(variables["params"]["norm"]["scale"], state["norm.weight"].numpy())
  with pytest.raises(CheckpointError, match="Strict load failed"):
    load_torch_checkpoint(str(path), model, strict=True)
  # With a 1000-class head everything but CC Attention loads.
  _, report = load_torch_checkpoint(str(path), create_model("tiny", 1000), return_report=True)
  assert not report.skipped and len(report.missing) == ATTENTION_TENSORS


def _to_timm(state: dict, conv_mlp: bool) -> dict:
  """Renames original ConvNeXt keys to timm's (written independently of faer_jax.interop.mapping)."""
  out = {}
  for k, v in state.items():
    parts = k.split(".")
    if k.startswith("downsample_layers.0."):
      name = "stem." + ".".join(parts[2:])
    elif k.startswith("downsample_layers."):
      name = f"stages.{parts[1]}.downsample." + ".".join(parts[2:])
    elif k.startswith("stages."):
      rest = {"dwconv": "conv_dw", "pwconv1": "mlp.fc1", "pwconv2": "mlp.fc2"}.get(parts[3], parts[3])
      name = f"stages.{parts[1]}.blocks.{parts[2]}.{rest}" + ("." + parts[4] if len(parts) > 4 else "")
      if conv_mlp and "mlp.fc" in name and name.endswith("weight"):
        v = v[:, :, None, None]  # timm's conv_mlp=True stores the MLP as 1x1 convs
    elif k.startswith("norm."):
      name = "head.norm." + parts[1]
    elif k.startswith("head."):
      name = "head.fc." + parts[1]
    else:
      continue
    out[name] = v
  return out


def _timm_style_features(state: dict, depths, x: torch.Tensor) -> torch.Tensor:
  """An independent functional ConvNeXt on timm keys, in timm's conv_mlp form (NCHW throughout)."""
  ln2d = lambda x, p: F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], state[p + ".weight"],
                                   state[p + ".bias"], 1e-6).permute(0, 3, 1, 2)
  def conv(x, p, **kw):
    w = state[p + ".weight"]
    return F.conv2d(x, w if w.ndim == 4 else w[:, :, None, None], state[p + ".bias"], **kw)

  x = ln2d(conv(x, "stem.0", stride=4), "stem.1")
  for i, depth in enumerate(depths):
    if i > 0:
      x = conv(ln2d(x, f"stages.{i}.downsample.0"), f"stages.{i}.downsample.1", stride=2)
    for j in range(depth):
      p = f"stages.{i}.blocks.{j}"
      y = conv(x, p + ".conv_dw", padding=3, groups=x.shape[1])
      y = F.gelu(conv(ln2d(y, p + ".norm"), p + ".mlp.fc1"))
      y = conv(y, p + ".mlp.fc2")
      x = x + state[p + ".gamma"][None, :, None, None] * y
  return x


@pytest.mark.parametrize("conv_mlp,prefix,suffix", [(False, "", ".pth"), (True, "net.", ".pth"),
                                                    (False, "", ".safetensors")])
def test_timm_checkpoint_parity(tmp_path, conv_mlp, prefix, suffix):
  torch_model = _perturbed_torch("atto", 1000, seed=2)
  state = {prefix + k: v for k, v in _to_timm(torch_model.state_dict(), conv_mlp).items()}
  path = str(tmp_path / ("timm_atto" + suffix))
  if suffix == ".safetensors":
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state.items()}, path)
  else:
    torch.save(state, path)
  backbone = create_backbone("atto")
  variables, report = load_torch_checkpoint(path, backbone, return_report=True)
  # A bare backbone has no final norm or head: those two are reported, not dropped silently.
  assert report.unexpected == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
  assert not report.missing and not report.skipped
  images = _images(size=64, seed=3)
  plain = {k[len(prefix):]: v for k, v in state.items()}
  with torch.no_grad():
    expected = _timm_style_features(plain, (2, 2, 6, 2), torch.from_numpy(images)).numpy()
  got = jax.jit(backbone.apply)(variables, images.transpose(0, 2, 3, 1))
  assert _rel(np.asarray(got).transpose(0, 3, 1, 2), expected) < TOL
  # The same file into the full FAER: the 1000-class head and final norm load too.
  _, report = load_torch_checkpoint(path, create_model("atto", 1000), return_report=True)
  assert not report.unexpected and not report.skipped and len(report.missing) == ATTENTION_TENSORS


def test_strict_mode_names_what_failed(tmp_path, tiny_pair):
  torch_model, model, _ = tiny_pair
  state = dict(torch_model.state_dict())
  state["attention.extra.weight"] = torch.zeros(3)
  del state["head.bias"]
  path = tmp_path / "odd.pth"
  torch.save(state, path)
  with pytest.raises(CheckpointError, match=r"(?s)head\.bias.*attention\.extra\.weight"):
    load_torch_checkpoint(str(path), model, strict=True)


def test_not_a_checkpoint(tmp_path):
  model = create_model("test", 7)
  text = tmp_path / "notes.pth"
  text.write_text("this is not a checkpoint\n")
  with pytest.raises(CheckpointError, match="notes.pth.*not a PyTorch checkpoint"):
    load_torch_checkpoint(str(text), model)
  with pytest.raises(CheckpointError, match="not found.*missing.pth"):
    load_torch_checkpoint(str(tmp_path / "missing.pth"), model)
  no_tensors = tmp_path / "config.pth"
  torch.save({"epoch": 3, "lr": 0.1}, no_tensors)
  with pytest.raises(CheckpointError, match="config.pth.*no state dict"):
    load_torch_checkpoint(str(no_tensors), model)


class _Exploit:
  def __reduce__(self):
    return (os.system, ("touch " + _Exploit.marker,))


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
  marker = tmp_path / "pwned"
  _Exploit.marker = str(marker)
  path = tmp_path / "evil.pth"
  torch.save({"state_dict": {"head.weight": torch.zeros(7, 64)}, "payload": _Exploit()}, path)
  with pytest.raises(CheckpointError, match="evil.pth.*weights_only"):
    load_torch_checkpoint(str(path), create_model("test", 7))
  assert not marker.exists()
  legacy = tmp_path / "legacy.pth"  # a bare pickle stream
  legacy.write_bytes(pickle.dumps(_Exploit(), protocol=2))
  with pytest.raises(CheckpointError):
    load_torch_checkpoint(str(legacy), create_model("test", 7))
  assert not marker.exists()


def test_import_does_not_need_torch():
  code = ("import sys, faer_jax, faer_jax.models, faer_jax.interop; "
          "assert 'torch' not in sys.modules, 'torch was imported'")
  subprocess.run([sys.executable, "-c", code], check=True)


# --- CLI -----------------------------------------------------------------------

def test_cli_import_export_round_trip(tmp_path, capsys):
  torch_model = _perturbed_torch("test", 7, seed=7)
  src = tmp_path / "faer.pth"
  torch.save({"state_dict": {"module." + k: v for k, v in torch_model.state_dict().items()}, "epoch": 1}, src)
  out = tmp_path / "imported"
  assert cli.main(["import", "--torch-checkpoint", str(src), "--variant", "test", "--num-classes", "7",
                   "--out", str(out), "--strict"]) == 0
  assert cli.main(["export", "--checkpoint", str(out), "--out", str(tmp_path / "back.pth")]) == 0
  back = torch.load(tmp_path / "back.pth", weights_only=True)
  fresh = create_torch_model("test", 7)
  fresh.load_state_dict(back, strict=True)
  for k, v in torch_model.state_dict().items():
    torch.testing.assert_close(back[k], v, rtol=0, atol=0)
  assert cli.main(["import", "--torch-checkpoint", str(src), "--variant", "test", "--num-classes", "7",
                   "--out", str(out)]) == 2  # refuses to overwrite
  assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("conv_impl", CONV_IMPLS)
def test_float64_parity_forward_and_gradients(conv_impl):
  """Both frameworks in float64 from the same weights: what is left is rounding, ~1e-15 (a wrong GELU or epsilon
  stays at 1e-5, test_cli_check_float64_separates_numerics_bugs_by_orders_of_magnitude)."""
  result = cli.check("test", 7, image_size=64, batch_size=2, conv_impl=conv_impl, float64=True)
  assert result["dtype"] == "float64" and result["gradients_compared"] == EVERY_TEST_GRADIENT
  assert result["features_max_rel_diff"] < 1e-13 and result["logits_max_rel_diff"] < 1e-13, result
  assert result["gradients_max_rel_diff"] < 1e-13 and result["loss_rel_diff"] < 1e-13, result


def test_cli_check(tmp_path, capsys):
  assert cli.main(["check", "--variant", "test", "--num-classes", "7", "--image-size", "64", "--json"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["ok"] and result["logits_max_rel_diff"] < TOL and result["gradients_max_rel_diff"] < TOL
  assert result["conv_impl"] == "auto" and result["dtype"] == "float32"
  assert cli.main(["check", "--variant", "test", "--num-classes", "7", "--image-size", "64", "--json",
                   "--no-gradients", "--conv-impl", "xla"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["ok"] and "gradients_max_rel_diff" not in result and result["conv_impl"] == "xla"
  # A checkpoint whose attention weights are scrambled still loads, and check reads it on both sides.
  torch_model = _perturbed_torch("test", 7, seed=8)
  torch.save({"model": torch_model.state_dict()}, tmp_path / "m.pth")
  assert cli.main(["check", "--variant", "test", "--num-classes", "7", "--image-size", "64",
                   "--torch-checkpoint", str(tmp_path / "m.pth"), "--no-gradients"]) == 0


# --- Your copy of the original code (--torch-model) ------------------------------

ORIGINAL_CODE = os.path.join(DATA, "original_faer", "faer_model.py")
_TEST_SIZES = '{"depths": [1, 1, 2, 1], "dims": [16, 32, 48, 64], "num_classes": 7}'


def _check(capsys, *extra):
  code = cli.main(["check", "--variant", "test", "--num-classes", "7", "--image-size", "64", "--json", *extra])
  captured = capsys.readouterr()
  return code, (json.loads(captured.out) if captured.out else None), captured.err


def test_cli_check_runs_your_copy_of_the_original(tmp_path, capsys):
  code, result, _ = _check(capsys, "--torch-model", f"{ORIGINAL_CODE}:build")
  assert code == 0 and result["ok"], result
  assert result["torch_model"] == f"{ORIGINAL_CODE}:build"
  assert result["features_max_rel_diff"] < TOL and result["logits_max_rel_diff"] < TOL
  # The training loss's gradient of every parameter, paired by the original's names.
  assert result["gradients_compared"] == EVERY_TEST_GRADIENT and result["gradients_max_rel_diff"] < TOL
  # In float64 with XLA's convolutions: nothing but rounding is left.
  code, result, _ = _check(capsys, "--torch-model", f"{ORIGINAL_CODE}:build", "--float64", "--conv-impl", "xla")
  assert code == 0 and result["ok"] and result["tolerance"] == 1e-10, result
  assert max(result["features_max_rel_diff"], result["logits_max_rel_diff"], result["gradients_max_rel_diff"]) < 1e-13
  # A class with its arguments; logits only, in a dict: the features are not compared.
  code, result, _ = _check(capsys, "--torch-model", f"{ORIGINAL_CODE}:LogitsOnly",
                           "--torch-model-kwargs", _TEST_SIZES, "--no-gradients")
  assert code == 0 and result["ok"] and result["features_max_rel_diff"] is None, result
  # Its trained checkpoint, as the original's script saves it, read by both sides.
  model = _perturbed_torch("test", 7, seed=3)
  torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}, "epoch": 3},
             tmp_path / "best.pth")
  code, result, _ = _check(capsys, "--torch-model", f"{ORIGINAL_CODE}:build", "--torch-checkpoint",
                           str(tmp_path / "best.pth"), "--no-gradients")
  assert code == 0 and result["ok"] and result["weights"] != "random weights, perturbed from initialisation"


@pytest.mark.parametrize("bug", ["TanhGelu", "BlockNormEps", "HeadNormEps"])
def test_cli_check_catches_numerics_bugs(capsys, bug):
  """What a port gets wrong while accuracy looks fine: GELU's tanh approximation, torch's default LayerNorm
  epsilon where ConvNeXt sets 1e-6. Each moves the outputs by 1e-5 to 3e-5 relative here (a faithful model: under
  1e-6), and the check's default tolerance fails it (a tolerance of 1e-4 would pass them all)."""
  code, result, _ = _check(capsys, "--torch-model", f"{ORIGINAL_CODE}:{bug}", "--torch-model-kwargs", _TEST_SIZES)
  assert code == 1 and not result["ok"], result
  assert max(result["features_max_rel_diff"], result["logits_max_rel_diff"]) > 2 * TOL, result
  assert result["gradients_max_rel_diff"] > 1e-5, result  # 1.4e-5 to 3.0e-5 (a faithful model: 5.9e-7)


@pytest.mark.parametrize("bug", ["TanhGelu", "BlockNormEps", "HeadNormEps"])
def test_cli_check_float64_separates_numerics_bugs_by_orders_of_magnitude(capsys, bug):
  """In float32 a bug sits 3-50x above a faithful model's rounding; in float64 a faithful copy of the original
  agrees to ~1e-15 (test_cli_check_runs_your_copy_of_the_original) and each bug still moves outputs and
  gradients by 1e-5 to 3e-5."""
  code, result, _ = _check(capsys, "--torch-model", f"{ORIGINAL_CODE}:{bug}", "--torch-model-kwargs", _TEST_SIZES,
                           "--float64")
  assert code == 1 and not result["ok"], result
  assert max(result["features_max_rel_diff"], result["logits_max_rel_diff"]) > 1e-6, result
  assert result["gradients_max_rel_diff"] > 1e-6, result


@pytest.mark.parametrize("spec,kwargs,message", [
    ("{dir}/missing.py:build", None, "missing.py is not a file"),
    ("{file}:nothing", None, "has no 'nothing'"),
    ("{file}", None, "expected FILE.py:NAME"),
    ("{file}:not_a_model", None, "returned a str, not a torch.nn.Module"),
    ("{file}:Original", None, "arguments go in --torch-model-kwargs"),
    ("{file}:Original", "[1, 2]", "expected a JSON object"),
    ("{file}:Original", "{depths: 1}", "not JSON"),
    ("{file}:build", '{"num_classes": 8}', "has 169,840 parameters; FAER 'test' with 7 classes has 169,775"),
    ("no_such_package.faer:FAER", None, "importing no_such_package.faer failed: ModuleNotFoundError"),
])
def test_cli_check_names_a_torch_model_it_cannot_use(capsys, spec, kwargs, message):
  spec = spec.format(dir=os.path.dirname(ORIGINAL_CODE), file=ORIGINAL_CODE)
  code, result, err = _check(capsys, "--torch-model", spec, *(["--torch-model-kwargs", kwargs] if kwargs else []))
  assert code == 2 and result is None
  assert message in err and err.startswith("error: "), err
