"""predict and gradcam: agreement with the evaluation path and with a direct Grad-CAM, bad files, the PNGs."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from faer_jax import gradcam, predict, train
from faer_jax.data import create_source, pipeline
from faer_jax.interop import init_variables, load_state_dict
from faer_jax.models import create_model
from conftest import shared_dir
from test_train import SHRINK, demo_config, synth_root  # noqa: F401  (the shrunk demo run and its data)


@pytest.fixture(scope="module")
def trained(synth_root, tmp_path_factory):  # noqa: F811
  """The shrunk demo run (made once, shared by the test workers; read only)."""
  make = lambda workdir: train.train_and_evaluate(demo_config(synth_root), str(workdir))
  return str(shared_dir(tmp_path_factory, "trained", make))


def test_predictions_equal_the_evaluation_path(trained, synth_root):  # noqa: F811
  config = demo_config(synth_root)
  source = create_source("rafdb", synth_root, "test")
  loaded = predict.load_model(trained, "latest")
  iterator, _ = pipeline.create_eval_iterator(source, batch_size=8, image_size=config.image_size)
  apply = jax.jit(lambda p, x: loaded.model.apply({"params": p}, x)[1])
  eval_logits = np.concatenate([np.asarray(apply(loaded.params, b["image"]))[b["mask"]] for b in iterator])
  paths = [source.path(i) for i in range(len(source))]
  predictions, unreadable = predict.predict_files(loaded, paths, batch_size=5)
  assert not unreadable and len(predictions) == len(source) == len(eval_logits)
  probs = np.array([[p["probabilities"][n] for n in loaded.class_names] for p in predictions])
  expected = np.exp(eval_logits - eval_logits.max(1, keepdims=True))
  np.testing.assert_allclose(probs, expected / expected.sum(1, keepdims=True), rtol=1e-5, atol=1e-6)
  assert [p["predicted"] for p in predictions] == [loaded.class_names[i] for i in eval_logits.argmax(1)]
  # And the accuracy these predictions give is the one `evaluate` reported.
  accuracy = np.mean([p["predicted"] == source.class_names[source.labels[i]] for i, p in enumerate(predictions)])
  logged = [json.loads(line) for line in open(os.path.join(trained, "metrics.jsonl"))]
  final = [m["eval_accuracy"] for m in logged if m["step"] == 6 and "eval_accuracy" in m]
  assert accuracy == pytest.approx(final[0])


def test_bad_files_are_named_and_nothing_is_lost(trained, synth_root, tmp_path, capsys):  # noqa: F811
  good = create_source("rafdb", synth_root, "test").path(0)
  folder = tmp_path / "mixed"
  folder.mkdir()
  Image.open(good).save(folder / "a_good.png")
  (folder / "b_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  Image.open(good).save(folder / "c_good.jpg")
  args = ["--workdir", trained, str(folder), str(tmp_path / "missing.jpg"), "--json"]
  assert predict.main(args) == 1
  captured = capsys.readouterr()
  out = json.loads(captured.out)
  assert [os.path.basename(p["path"]) for p in out["predictions"]] == ["a_good.png", "c_good.jpg"]
  assert "b_broken.jpg" in captured.err and "missing.jpg" in captured.err
  assert predict.main(args + ["--skip-bad"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert sorted(os.path.basename(s["path"]) for s in out["skipped"]) == ["b_broken.jpg", "missing.jpg"]
  assert predict.main(["--workdir", str(tmp_path / "nothing-here"), good]) == 2


def test_csv_output(trained, synth_root, capsys):  # noqa: F811
  good = create_source("rafdb", synth_root, "test").path(1)
  assert predict.main(["--workdir", trained, good, "--csv"]) == 0
  header, row = capsys.readouterr().out.strip().splitlines()
  assert header.split(",")[:3] == ["path", "prediction", "Surprise"]
  assert sum(float(v) for v in row.split(",")[2:]) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("layer", ["cc_attention", "stage4"])
def test_gradcam_matches_a_direct_pytorch_computation(layer, torch):
  from faer_jax.interop.torch_reference import create_torch_model
  torch.manual_seed(0)
  torch_model = create_torch_model("test", 7).eval()
  with torch.no_grad():
    for p in torch_model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  model = create_model("test", 7)
  variables, _ = load_state_dict({k: v.numpy() for k, v in torch_model.state_dict().items()},
                                 jax.eval_shape(lambda: init_variables(model)), strict=True)
  images = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
  targets = np.array([0, 3, 6])

  # Direct: activations and their gradient from PyTorch autograd, the formula by hand.
  x = torch.from_numpy(images)
  stage4 = torch_model.forward_backbone(x)
  if layer == "cc_attention":
    acts = torch_model.attention(stage4)
    tail = lambda a: torch_model.head(torch_model.norm(a.mean(dim=(-2, -1))))
  else:
    acts = stage4
    tail = lambda a: torch_model.head(torch_model.norm(torch_model.attention(a).mean(dim=(-2, -1))))
  acts = acts.detach().requires_grad_(True)
  logits = tail(acts)
  logits[torch.arange(3), torch.from_numpy(targets)].sum().backward()
  weights = acts.grad.mean(dim=(2, 3))                              # (B, C)
  expected = torch.relu((weights[:, :, None, None] * acts).sum(1)).detach().numpy()

  cams, jax_logits = gradcam.gradcam(model, variables["params"], jnp.asarray(images.transpose(0, 2, 3, 1)),
                                     jnp.asarray(targets), layer)
  assert np.max(expected) > 0
  np.testing.assert_allclose(np.asarray(cams), expected, rtol=1e-4, atol=1e-5 * np.max(expected))
  np.testing.assert_allclose(np.asarray(jax_logits), logits.detach().numpy(), rtol=1e-4, atol=1e-5)


def test_gradcam_cli_writes_heat_maps(trained, synth_root, tmp_path):  # noqa: F811
  source = create_source("rafdb", synth_root, "test")
  paths = [source.path(i) for i in range(3)]
  out = tmp_path / "cams"
  assert gradcam.main(["--workdir", trained, *paths, "--out", str(out), "--target", "Happiness"]) == 0
  overlays = sorted(p for p in os.listdir(out) if "_gradcam_" in p)
  assert len(overlays) == 3
  image = np.asarray(Image.open(out / overlays[0]))
  assert image.shape == (SHRINK["image_size"], SHRINK["image_size"], 3)
  assert os.path.exists(out / "gradcam_grid_cc_attention.png")
  assert gradcam.main(["--workdir", trained, paths[0], "--out", str(out), "--target", "Boredom"]) == 2
