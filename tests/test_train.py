"""End-to-end training: the demo config shrunk to a few steps, resume, SIGTERM, devices, processes."""

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faer_jax import evaluate, metric_writer, sharding, steps, train
from faer_jax.data.synth import ensure_synthetic_rafdb

from conftest import load_config, shared_dir

# Training runs end to end: `make test-fast` leaves them out.
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "demo.py")

# The demo config, shrunk: 48 training images of 64 px (the last stage's 2x2 map gives CC Attention's
# softmax positions to weigh; at 32 px it sees one and CC Attention is the identity), 6 steps of batch 8,
# with the real configs' drop path, so that its masks are part of what resuming, devices and processes
# must reproduce. Layer scale starts at 0.1, not 1e-6, so that every block, and so every mask, shows in
# the losses.
SHRINK = {"image_size": 64, "batch_size": 8, "eval_batch_size": 8, "num_train_steps": 6, "eval_every_steps": 3,
          "checkpoint_every_steps": 3, "log_every_steps": 1, "data.synthetic_num_train": 48,
          "data.synthetic_num_test": 20, "optimizer.warmup_steps": 2, "model.drop_path_rate": 0.25,
          "model.layer_scale_init_value": 0.1}


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
  make = lambda root: ensure_synthetic_rafdb(root, SHRINK["data.synthetic_num_train"],
                                             SHRINK["data.synthetic_num_test"], seed=0)
  return str(shared_dir(tmp_path_factory, "synthetic", make))


def demo_config(synth_root, **overrides):
  return load_config("demo.py", **{**SHRINK, "data.root": synth_root, **overrides})


def cli_args(synth_root, workdir, **overrides):
  values = {**SHRINK, "data.root": synth_root, **overrides}
  return ["--config", DEMO, "--workdir", str(workdir)] + [f"--config.{k}={v}" for k, v in values.items()]


def run_cli(module, args, devices=1, check=True, popen=None):
  """Runs `python -m module args` on `devices` CPU devices; with popen (Popen keywords), returns the process."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", module, *args]
  if popen is not None:
    return subprocess.Popen(cmd, env=env, cwd=REPO, **popen)
  result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  if check:
    assert result.returncode == 0, result.stderr[-4000:]
  return result


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def final_params(workdir, synth_root):
  config = demo_config(synth_root)
  mesh = jax.make_mesh((1, 1), ("data", "fsdp"), devices=jax.devices()[:1])
  step, variables, _ = evaluate.restore_eval_variables(config, str(workdir), "latest", mesh)
  return step, jax.device_get(variables["params"]), jax.device_get(variables["centers"])


def assert_same_run(workdir_a, workdir_b, synth_root):
  assert read_metrics(workdir_a) == read_metrics(workdir_b)
  step_a, params_a, centers_a = final_params(workdir_a, synth_root)
  step_b, params_b, centers_b = final_params(workdir_b, synth_root)
  assert step_a == step_b == SHRINK["num_train_steps"]
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)
  np.testing.assert_array_equal(centers_a, centers_b)


@pytest.fixture(scope="module")
def uninterrupted(synth_root, tmp_path_factory):
  """The reference run, in a subprocess on one CPU device (made once, shared by the test workers)."""
  return shared_dir(tmp_path_factory, "uninterrupted", lambda workdir: run_cli("faer_jax.train",
                                                                             cli_args(synth_root, workdir)))


def test_demo_end_to_end_in_process(synth_root, tmp_path, capsys):
  """8 simulated devices in this process; then evaluate (JSON keys, PNG) and resume-noop."""
  config = demo_config(synth_root)
  metrics = train.train_and_evaluate(config, str(tmp_path))
  assert metrics["num_examples"] == 20 and 0 <= metrics["accuracy"] <= 1
  # The first step (it compiles) is timed apart, once; img_s is the training throughput of the steps after it.
  lines = capsys.readouterr().err.splitlines()
  assert sum(line.startswith("first training step (compilation included) in ") for line in lines) == 1
  progress = [line for line in lines if re.match(r"step \d+/6 ", line)]
  assert len(progress) == 6 and "img_s" not in progress[0]
  assert all(float(re.search(r"img_s=([\d.]+)", line).group(1)) > 0 for line in progress[1:])
  logged = read_metrics(tmp_path)
  assert [m["step"] for m in logged if "train_loss" in m] == [1, 2, 3, 4, 5, 6]
  assert all(np.isfinite(m["train_loss"]) for m in logged if "train_loss" in m)
  assert [m["step"] for m in logged if "eval_accuracy" in m] == [3, 6]
  assert json.load(open(tmp_path / "config.json"))["model"]["variant"] == "test"
  assert os.listdir(tmp_path / "tensorboard")
  # The evaluation CLI reads this run's own config.json when --config is absent.
  result = run_cli("faer_jax.evaluate", ["--workdir", str(tmp_path), "--checkpoint", "best", "--json"])
  out = json.loads(result.stdout)
  assert {"step", "loss", "accuracy", "per_class_accuracy", "confusion_matrix"} <= out.keys()
  assert len(out["per_class_accuracy"]) == 7 and np.sum(out["confusion_matrix"]) == 20
  assert os.path.exists(out["figure"]) and out["figure"].endswith(".png")
  assert out["accuracy"] == pytest.approx(max(m["eval_accuracy"] for m in logged if "eval_accuracy" in m))
  # The finished run's metrics are kept; the same command again trains nothing and returns them.
  assert json.load(open(tmp_path / train.FINAL_METRICS)) == json.loads(json.dumps(metrics)) and metrics["step"] == 6
  before = read_metrics(tmp_path)
  assert train.train_and_evaluate(config, str(tmp_path)) == json.loads(json.dumps(metrics))
  assert read_metrics(tmp_path) == before


def test_one_device_equals_eight(uninterrupted, synth_root, tmp_path):
  """The same run on 8 (simulated) devices: the same losses, up to float reduction order."""
  run_cli("faer_jax.train", cli_args(synth_root, tmp_path), devices=8)
  one = [m["train_loss"] for m in read_metrics(uninterrupted) if "train_loss" in m]
  eight = [m["train_loss"] for m in read_metrics(tmp_path) if "train_loss" in m]
  assert len(one) == len(eight) == 6
  np.testing.assert_allclose(eight, one, rtol=2e-4)


def test_the_plain_layers_train_the_same_run(uninterrupted, synth_root, tmp_path):
  """model.conv_impl=xla, the layers every GPU and TPU runs, trains the run the CPU kernels train: the same
  losses and gradient norms up to float summation order, drop-path masks included."""
  run_cli("faer_jax.train", cli_args(synth_root, tmp_path, **{"model.conv_impl": "xla"}))
  kernels = [m for m in read_metrics(uninterrupted) if "train_loss" in m]
  plain = [m for m in read_metrics(tmp_path) if "train_loss" in m]
  assert len(kernels) == len(plain) == SHRINK["num_train_steps"]
  for key in ("train_loss", "train_grad_norm"):
    np.testing.assert_allclose([m[key] for m in plain], [m[key] for m in kernels], rtol=2e-4, err_msg=key)


def test_sigkill_then_resume_is_bit_exact(uninterrupted, synth_root, tmp_path):
  proc = run_cli("faer_jax.train", cli_args(synth_root, tmp_path),
                 popen=dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
  deadline = time.time() + 240
  while not os.path.isdir(tmp_path / "checkpoints" / "3") and time.time() < deadline and proc.poll() is None:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL, "the run ended before it was killed"
  assert os.path.isdir(tmp_path / "checkpoints" / "3"), "the run never reached its first checkpoint"
  assert not os.path.isdir(tmp_path / "checkpoints" / "6"), "the run was killed after its last step"
  run_cli("faer_jax.train", cli_args(synth_root, tmp_path))
  assert_same_run(uninterrupted, tmp_path, synth_root)


def test_sigterm_saves_then_resume_is_bit_exact(uninterrupted, synth_root, tmp_path):
  proc = run_cli("faer_jax.train", cli_args(synth_root, tmp_path),
                 popen=dict(stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
  metrics_file = tmp_path / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if metrics_file.exists() and '"step": 1,' in metrics_file.read_text():
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  steps_saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert steps_saved and steps_saved[-1] < SHRINK["num_train_steps"], (steps_saved, err[-2000:])
  assert "Pre-empted" in err and not (tmp_path / train.FINAL_METRICS).exists()
  run_cli("faer_jax.train", cli_args(synth_root, tmp_path))
  assert_same_run(uninterrupted, tmp_path, synth_root)


def test_two_processes_equal_one(uninterrupted, synth_root, tmp_path, run_two_processes):
  """A 2-process jax.distributed run (loopback coordinator, gloo) gives one process's losses."""
  script = (
      "import sys, jax; jax.config.update('jax_cpu_collectives_implementation', 'gloo');"
      "from absl import app; from faer_jax import train;"
      "train.define_flags('', '');"
      "port, pid = sys.argv[1], sys.argv[2];"
      "sys.argv = ['train', f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',"
      " f'--process_id={pid}'] + sys.argv[3:];"
      "app.run(train.main)")
  run_two_processes(script, *cli_args(synth_root, tmp_path), timeout=300)
  one = [m["train_loss"] for m in read_metrics(uninterrupted) if "train_loss" in m]
  two = [m["train_loss"] for m in read_metrics(tmp_path) if "train_loss" in m]
  assert len(two) == 6
  np.testing.assert_allclose(two, one, rtol=2e-4)
  evals_one = [m["eval_accuracy"] for m in read_metrics(uninterrupted) if "eval_accuracy" in m]
  evals_two = [m["eval_accuracy"] for m in read_metrics(tmp_path) if "eval_accuracy" in m]
  assert evals_one == evals_two


@pytest.mark.parametrize("metric,value", [("loss", jnp.nan), ("grad_norm", jnp.inf)])
def test_non_finite_step_stops_and_keeps_last_good_checkpoint(synth_root, tmp_path, monkeypatch, metric, value):
  original = steps.train_step

  def poisoned(state, batch, **kwargs):
    new_state, metrics = original(state, batch, **kwargs)
    metrics[metric] = jnp.where(state["step"] >= 4, value, metrics[metric])  # the 5th update
    return new_state, metrics

  monkeypatch.setattr(steps, "train_step", poisoned)
  config = demo_config(synth_root, checkpoint_every_steps=2, eval_every_steps=100)
  with pytest.raises(train.NonFiniteLossError, match="at step 5"):
    train.train_and_evaluate(config, str(tmp_path))
  saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert saved[-1] == 4


def test_diverging_run_exits_with_an_error_naming_the_step(synth_root, tmp_path):
  """A NaN learning rate: step 1's loss is finite, its update is not, so step 2 stops the run, exit status 1."""
  result = run_cli("faer_jax.train", cli_args(synth_root, tmp_path, **{"optimizer.lr": "nan",
                                                                       "optimizer.warmup_steps": 0}), check=False)
  assert result.returncode == 1, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("Non-finite loss (nan) or gradient norm (nan) at step 2."), last
  assert "Traceback" not in result.stderr


def test_bad_config_fails_before_compiling(synth_root, tmp_path):
  result = run_cli("faer_jax.train", cli_args(synth_root, tmp_path) + ["--config.batch_szie=4"], check=False)
  assert result.returncode != 0 and "batch_szie" in result.stderr
  result = run_cli("faer_jax.train", cli_args(synth_root, tmp_path) + ["--config.batch_size=oops"], check=False)
  assert result.returncode != 0 and "batch_size" in result.stderr


def test_rafdb_config_without_data_points_to_the_demo(tmp_path):
  missing = tmp_path / "RAF-DB"
  result = run_cli("faer_jax.train", ["--config", os.path.join(REPO, "configs", "rafdb.py"), "--workdir",
                                      str(tmp_path / "run"), f"--config.data.root={missing}"], check=False)
  assert result.returncode != 0
  assert "list_patition_label.txt" in result.stderr and "make demo" in result.stderr
  assert "whdeng.cn" in result.stderr


def test_fsdp_and_bfloat16(uninterrupted, synth_root, tmp_path):
  """Parameters and optimizer state sharded over 'fsdp'; bf16 compute with float32 state."""
  config = demo_config(synth_root, fsdp=2, num_train_steps=2, eval_every_steps=2, checkpoint_every_steps=2)
  config.model.dtype = "bfloat16"
  metrics = train.train_and_evaluate(config, str(tmp_path))
  assert 0 <= metrics["accuracy"] <= 1
  logged = [m for m in read_metrics(tmp_path) if "train_loss" in m]
  assert len(logged) == 2 and all(np.isfinite([m["train_loss"] for m in logged]))
  # The same first step in float32 without FSDP: the same gradient, up to bfloat16's rounding (at initialisation
  # the loss is ln 7 whatever the model; the gradient is not).
  first = [m for m in read_metrics(uninterrupted) if "train_loss" in m][0]
  assert logged[0]["train_grad_norm"] == pytest.approx(first["train_grad_norm"], rel=0.03)
  step, params, _ = final_params(tmp_path, synth_root)
  assert step == 2 and all(p.dtype == np.float32 for p in jax.tree.leaves(params))


@pytest.fixture(scope="module")
def learning_root(tmp_path_factory):
  return str(shared_dir(tmp_path_factory, "synthetic_learning",
                        lambda root: ensure_synthetic_rafdb(root, 1000, 210, seed=0)))


def test_expression_training_learns(learning_root, tmp_path):
  """The demo recipe, 200 steps of 32 images at 32 px from scratch, reaches well above chance (1/7) on the
  synthetic test split: measured 0.42-0.52 accuracy over 200-300 steps and learning rates 2e-3 to 4e-3."""
  config = load_config("demo.py", **{"image_size": 32, "batch_size": 32, "eval_batch_size": 64,
                                     "num_train_steps": 200, "eval_every_steps": 200, "checkpoint_every_steps": 200,
                                     "log_every_steps": 50, "data.root": learning_root,
                                     "data.synthetic_num_train": 1000, "data.synthetic_num_test": 210,
                                     "optimizer.lr": 2e-3, "optimizer.warmup_steps": 20})
  metrics = train.train_and_evaluate(config, str(tmp_path))
  assert metrics["num_examples"] == 210
  assert metrics["accuracy"] > 0.3 and metrics["mean_class_accuracy"] > 0.3, metrics
  losses = [m["train_loss"] for m in read_metrics(tmp_path) if "train_loss" in m]
  assert losses[-1] < 0.8 * losses[0], losses


def test_training_starts_from_a_pretrained_pytorch_checkpoint(synth_root, tmp_path, torch):
  """model.pretrained: an official ConvNeXt release ({'model': backbone + norm + 1000-class head}) fills the
  backbone and the final norm; CC Attention and the 7-class head keep their initialisation (learning rate 0, so
  the first step leaves every parameter where it started)."""
  from faer_jax.interop import to_torch_state_dict
  from faer_jax.interop.torch_reference import create_torch_model
  torch.manual_seed(0)
  release = create_torch_model("test", 1000)
  with torch.no_grad():
    for p in release.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  state = {k: v for k, v in release.state_dict().items() if not k.startswith("attention.")}
  torch.save({"model": state}, tmp_path / "convnext_test_1k.pth")
  config = demo_config(synth_root, num_train_steps=1, eval_every_steps=1, checkpoint_every_steps=1,
                       **{"model.pretrained": str(tmp_path / "convnext_test_1k.pth"), "optimizer.lr": 0.0,
                          "optimizer.warmup_steps": 0})
  train.train_and_evaluate(config, str(tmp_path / "run"))
  _, params, _ = final_params(tmp_path / "run", synth_root)
  loaded = to_torch_state_dict({"params": params})
  for key, value in state.items():
    if not key.startswith("head."):
      np.testing.assert_array_equal(loaded[key], value.numpy(), err_msg=key)
  programs = train.build_programs(config, sharding.create_mesh(1), steps_per_epoch=1)
  fresh = to_torch_state_dict(jax.device_get(programs.init(jax.random.key(config.seed))["params"]))
  for key in loaded:
    if key.startswith(("attention.", "head.")):
      np.testing.assert_array_equal(loaded[key], fresh[key], err_msg=key)


def test_a_tree_without_the_cpu_kernels_trains(synth_root, tmp_path):
  """The CPU fast path sits behind one seam: with faer_jax/kernels/ deleted, the model takes its plain layers and
  the demo recipe trains and saves."""
  tree = tmp_path / "tree"
  shutil.copytree(os.path.join(REPO, "faer_jax"), tree / "faer_jax",
                  ignore=lambda folder, names: [n for n in names if n == "__pycache__" or
                                                os.path.join(folder, n) == os.path.join(REPO, "faer_jax", "kernels")])
  shutil.copytree(os.path.join(REPO, "configs"), tree / "configs")
  assert not (tree / "faer_jax" / "kernels").exists()
  env = dict(os.environ, PYTHONPATH=str(tree), XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu")
  # The copy, and nothing else, is faer_jax: the editable install's finder would supply the missing folder.
  only_the_copy = "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'Editable' not in str(f)]; "
  probe = only_the_copy + "import faer_jax.models as m; print(m.__file__, m.create_model('test', 7).block.__name__)"
  result = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tree, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split() == [str(tree / "faer_jax" / "models" / "__init__.py"), "Block"]
  args = cli_args(synth_root, tmp_path / "run", num_train_steps=2, eval_every_steps=2, checkpoint_every_steps=2)
  args[1] = str(tree / "configs" / "demo.py")
  train_main = only_the_copy + ("import runpy; sys.argv[0] = 'train'; "
                                "runpy.run_module('faer_jax.train', run_name='__main__')")
  result = subprocess.run([sys.executable, "-c", train_main, *args], env=env, cwd=tree, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(result.stdout.splitlines()[-1])["num_examples"] == SHRINK["data.synthetic_num_test"]
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / "2")


def test_progress_is_plain_lines_off_a_terminal(tmp_path):
  """In a log file: one newline-terminated line per log step, no carriage-return redraws."""
  stream = io.StringIO()  # isatty() is False, as for a file or a pipe
  progress = metric_writer.MetricWriter(str(tmp_path)).progress(total=6, initial=2, stream=stream)
  for step in range(3, 7):
    if step % 2 == 0:
      progress.set_postfix(loss=f"{1 / step:.4f}", acc="0.500")
    if step == 6:
      progress.write("step 6: eval accuracy 0.5000, loss 0.1667")
    progress.update(1)
  progress.close()
  assert "\r" not in stream.getvalue()
  assert stream.getvalue().splitlines() == [
      "step 4/6  loss=0.2500  acc=0.500",
      "step 6: eval accuracy 0.5000, loss 0.1667",
      "step 6/6  loss=0.1667  acc=0.500",
  ]

  class Terminal(io.StringIO):
    def isatty(self):
      return True

  assert not isinstance(metric_writer.MetricWriter(str(tmp_path)).progress(6, 0, stream=Terminal()),
                        metric_writer.LineProgress)
