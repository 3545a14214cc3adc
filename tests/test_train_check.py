"""`interop check-train`: the same training steps in PyTorch and in JAX, and the mistakes it catches.

Each mistake is made on purpose in the JAX training code (the port under
test), the PyTorch loop reading the config as it stands; the check must fail
at the step where the mistake first shows, naming the tensor it moved.
Short runs keep the suite fast: ConvNeXt `test`, 32 px, batch 4, epochs of 2
steps (so the schedule's staircase is crossed at step 3).
"""

import json
import shutil

import jax
import pytest

from faer_jax import losses, optim
from faer_jax.interop import cli, train_check

pytestmark = pytest.mark.usefixtures("torch")

SHORT = ["--steps", "6", "--steps-per-epoch", "2", "--batch-size", "4", "--image-size", "32"]
CONFIGS = {"fer": "configs/rafdb.py:test", "fae": "configs/celeba.py:test"}
BACKBONE = ("downsample_layers.", "stages.")


def _run(capsys, task: str, *extra: str) -> tuple[int, dict]:
  code = cli.main(["check-train", "--config", CONFIGS[task], *SHORT, "--json", *extra])
  return code, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("task", ["fer", "fae"])
def test_a_faithful_port_passes_against_your_copy_of_the_original(tmp_path, capsys, task):
  shutil.copy(train_check.__file__.replace("train_check.py", "torch_reference.py"), tmp_path / "faer_original.py")
  num_classes = 7 if task == "fer" else 40
  # FER: the paper's recipe. FAE: with gradient clipping (active: the gradient norms are 0.2 to 0.8) and a
  # warm-up, which the PyTorch loop runs as a LambdaLR.
  recipe = [] if task == "fer" else ["--config.optimizer.grad_clip_norm=0.1", "--config.optimizer.warmup_steps=3"]
  code, result = _run(capsys, task, "--torch-model", f"{tmp_path}/faer_original.py:create_torch_model",
                      "--torch-model-kwargs", json.dumps({"variant": "test", "num_classes": num_classes}), *recipe)
  assert code == 0 and result["passed"] and result["first_failure"] is None
  assert result["torch_model"].endswith("faer_original.py:create_torch_model")
  assert len(result["steps"]) == 6 and [s["epoch"] for s in result["steps"]] == [0, 0, 1, 1, 2, 2]
  rates = [s["learning_rate"] for s in result["steps"]]
  if task == "fer":  # the staircase: the learning rate falls by decay_rate once per epoch, not per step
    assert rates[0] == rates[1] == 2.5e-4 and rates[2] == pytest.approx(rates[0] * 0.95) and rates[4] < rates[3]
  else:
    assert rates[:3] == pytest.approx([0, 1e-3 / 3, 2e-3 / 3 * 0.95]) and rates[3] == pytest.approx(1e-3 * 0.95)
    assert min(s["grad_norm_torch"] for s in result["steps"]) > 0.1
  assert result["max_param_rel_diff"] < 2e-6 and result["max_loss_rel_diff"] < 2e-6
  assert result["max_param_rel_diff"] == max(s["param_rel_diff"] for s in result["steps"]) > 0
  # Training moved the parameters: the comparison is of something.
  assert result["steps"][-1]["loss_torch"] != result["steps"][0]["loss_torch"]
  if task == "fer":
    assert result["config"]["center_loss_weight"] == 0.01 and 0 < result["max_centers_rel_diff"] < 2e-6
  else:
    assert result["config"]["loss"] == "focal" and result["max_centers_rel_diff"] is None
  assert result["shift_invariant"] == list(train_check.SHIFT_INVARIANT)


def _every_param_decays(params):
  return jax.tree.map(lambda p: True, params)


def _all_new(backbone_keys, params):
  return jax.tree.map(lambda p: "new", params)


def _per_step(config, steps_per_epoch, original=optim._epoch_schedule):
  return original(config, 1)


def _alpha_one(*args, original=losses.update_centers, **kwargs):
  return original(*args, **dict(kwargs, alpha=1.0))


def _lambda_times_ten(*args, original=losses.center_loss, **kwargs):
  return 10.0 * original(*args, **kwargs)


def _gamma_one(logits, labels, *, gamma, **kwargs):
  return losses.sigmoid_focal_loss(logits, labels, gamma=1.0, **kwargs)


MISTAKES = {
    # name: (task, patch target, replacement, extra flags, first failing step, which tensor)
    "weight decay on norms and biases": (
        "fae", (optim, "_decay_mask"), _every_param_decays, ["--config.optimizer.decay_all_params=false"], None,
        lambda t: t.endswith(".bias") or "norm" in t),
    "backbone multiplier missing": ("fer", (optim, "_param_groups"), _all_new, [], 1, lambda t: t.startswith(BACKBONE)),
    "schedule stepped per step": ("fer", (optim, "_epoch_schedule"), _per_step, [], 2,
                                  lambda t: not t.startswith(BACKBONE)),
    "center update rate wrong": ("fer", (losses, "update_centers"), _alpha_one, [], 1, lambda t: t == "centers"),
    "center loss weight wrong": ("fer", (losses, "center_loss"), _lambda_times_ten, [], 1, lambda t: t == "loss"),
    "focal gamma wrong": ("fae", (losses.LOSSES, "focal"), _gamma_one, [], 1, lambda t: t == "loss"),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_each_mistake_fails_naming_its_step_and_tensor(monkeypatch, capsys, mistake):
  task, (where, name), replacement, extra, step, tensor_is = MISTAKES[mistake]
  if isinstance(where, dict):
    monkeypatch.setitem(where, name, replacement)
  else:
    monkeypatch.setattr(where, name, replacement)
  code, result = _run(capsys, task, *extra)
  failure = result["first_failure"]
  assert code == 1 and not result["passed"] and failure is not None
  assert failure["rel_diff"] > train_check.TOLERANCE
  if step is not None:
    assert failure["step"] == step
  assert tensor_is(failure["tensor"]), failure
  # The table says the same in words (what the CLI prints without --json).
  table = train_check.format_table(result).splitlines()
  assert table[1].split()[:4] == ["step", "epoch", "lr", "loss"] and len(table) == 2 + 6 + 3
  assert table[-1] == f"FAILED at step {failure['step']}: {failure['tensor']} differs by {failure['rel_diff']:.2e} " \
                      "(relative)"


@pytest.mark.parametrize("args,message", [
    (["--config", "configs/nope.py"], "configs/nope.py is not a file"),
    (["--config", CONFIGS["fer"], "--config.optimizer.lrr=1"], "--config.optimizer.lrr: no such config key"),
    (["--config", CONFIGS["fer"], "--config.batch_size=four"], "--config.batch_size=four"),
    (["--config", CONFIGS["fer"], "--steps", "0"], "--steps 0"),
    (["--config", CONFIGS["fer"], "--data-root", "/nonexistent"], "--data-root /nonexistent: not a folder"),
    (["--config", CONFIGS["fer"], "--torch-model", "nowhere.py:FAER"], "--torch-model 'nowhere.py:FAER'"),
])
def test_bad_input_is_one_line_naming_it(capsys, args, message):
  assert cli.main(["check-train", *args]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and message in err and "\n" not in err
