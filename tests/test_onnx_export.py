"""`interop export --format onnx`: the exported graph against PyTorch and Flax, its metadata, and its check."""

import json

import numpy as np
import pytest

from faer_jax.interop import cli, onnx_export
from test_predict import trained  # noqa: F401  (the shrunk demo run, shared)
from test_train import synth_root  # noqa: F401

onnxruntime = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def _imported(tmp_path, torch, num_classes: int, cc_attention: bool) -> tuple[str, object]:
  from faer_jax.interop.external import perturb
  from faer_jax.interop.torch_reference import create_torch_model
  torch.manual_seed(0)
  model = perturb(create_torch_model("test", num_classes, cc_attention=cc_attention), seed=1)
  torch.save(model.state_dict(), tmp_path / "weights.pth")
  args = ["import", "--torch-checkpoint", str(tmp_path / "weights.pth"), "--variant", "test",
          "--num-classes", str(num_classes), "--out", str(tmp_path / "imported")]
  assert cli.main(args + ([] if cc_attention else ["--baseline"])) == 0
  return str(tmp_path / "imported"), model


@pytest.mark.parametrize("num_classes,cc_attention", [(7, True), (40, False)], ids=["faer-fer", "baseline-fae"])
def test_onnx_runs_the_model_pytorch_runs(tmp_path, capsys, torch, num_classes, cc_attention):
  imported, model = _imported(tmp_path, torch, num_classes, cc_attention)
  capsys.readouterr()
  out = str(tmp_path / "model.onnx")
  assert cli.main(["export", "--checkpoint", imported, "--out", out, "--image-size", "64", "--dynamic-batch"]) == 0
  message = capsys.readouterr().out
  assert message.startswith(f"Wrote {out}: ") and "(N, 3, 64, 64)" in message and "on 3 images" in message
  session = onnxruntime.InferenceSession(out, providers=["CPUExecutionProvider"])
  assert [i.name for i in session.get_inputs()] == ["images"] and [o.name for o in session.get_outputs()] == ["logits"]
  images = np.random.default_rng(3).standard_normal((5, 3, 64, 64)).astype(np.float32)  # a batch not exported with
  logits = session.run(["logits"], {"images": images})[0]
  with torch.no_grad():
    expected = model(torch.from_numpy(images))[1].numpy()
  assert logits.shape == (5, num_classes)
  assert np.max(np.abs(logits - expected)) / np.max(np.abs(expected)) < 1e-5
  props = {p.key: p.value for p in onnx.load(out).metadata_props}
  assert props["image_size"] == "64" and json.loads(props["normalization"])["layout"] == "NCHW RGB"


def test_training_run_exports_with_its_classes_and_a_fixed_batch(trained, tmp_path, capsys):  # noqa: F811
  out = str(tmp_path / "demo.onnx")
  assert cli.main(["export", "--checkpoint", trained, "--step", "best", "--out", out]) == 0
  assert "(1, 3, 64, 64)" in capsys.readouterr().out
  props = {p.key: p.value for p in onnx.load(out).metadata_props}
  assert props["task"] == "fer" and len(json.loads(props["class_names"])) == 7
  session = onnxruntime.InferenceSession(out, providers=["CPUExecutionProvider"])
  assert session.get_inputs()[0].shape == [1, 3, 64, 64]


def test_a_wrong_export_fails_its_check_and_leaves_no_file(tmp_path, capsys, torch, monkeypatch):
  imported, _ = _imported(tmp_path, torch, 7, True)
  original = onnx_export._torch_model

  def off_by_a_little(flax_model, variables):  # a conversion that loses the head's bias
    wrapper = original(flax_model, variables)
    wrapper.model.head.bias.data.zero_()
    return wrapper

  monkeypatch.setattr(onnx_export, "_torch_model", off_by_a_little)
  out = tmp_path / "model.onnx"
  capsys.readouterr()
  assert cli.main(["export", "--checkpoint", imported, "--out", str(out), "--image-size", "32"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"error: {out}: onnxruntime's logits differ from the Flax model's by ") and "\n" not in err
  assert not out.exists()


def test_export_names_a_missing_checkpoint(tmp_path, capsys):
  assert cli.main(["export", "--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m.onnx")]) == 2
  err = capsys.readouterr().err.strip()
  assert err == f"error: --checkpoint {tmp_path / 'nowhere'}: not a folder (a training run's workdir, or a " \
                "directory written by `import`)"
