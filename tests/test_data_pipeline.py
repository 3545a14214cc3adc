"""Tests for the grain input pipeline and the shared preprocessing.

Most tests read `FakeSource`, whose example i is an image that encodes i in
its pixels, so a batch tells which examples it holds; images already have the
model's size, so resizing is the identity and the pixels survive exactly. The
last tests run the real RAF-DB source on a small synthetic tree.
"""

import json
import logging

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from faer_jax.data import create_source
from faer_jax.data import input_benchmark
from faer_jax.data import pipeline
from faer_jax.data import synth
from faer_jax.data import transforms
from faer_jax.data.errors import ImageReadError

SIZE = 8  # Image side of FakeSource and the pipeline's image_size.


class FakeSource:
  """In-memory source obeying the source contract.

  Example i: red + 256 * green = i; blue ramps up from left to right, so a
  mirrored image is recognisable.
  """

  def __init__(self, labels, task="fer", bad=()):
    self.labels = np.asarray(labels, np.int32)
    self.task = task
    self.split = "train"
    self.class_names = tuple(f"c{k}" for k in range(7 if task == "fer" else 40))
    self._bad = set(bad)

  def __len__(self):
    return len(self.labels)

  def path(self, i):
    return f"/fake/{i:05d}.jpg"

  def __getitem__(self, i):
    if i in self._bad:
      raise ImageReadError(self.path(i), "not a JPEG file")
    image = np.empty((SIZE, SIZE, 3), np.uint8)
    image[..., 0], image[..., 1] = i % 256, i // 256
    image[..., 2] = np.arange(SIZE) * 30
    label = int(self.labels[i]) if self.task == "fer" else self.labels[i].copy()
    return {"image": image, "label": label}


def fer_source(n, num_classes=7, **kwargs):
  return FakeSource(np.arange(n) % num_classes, **kwargs)


def decode(batch):
  """(example indices, flipped flags) of a batch of FakeSource images."""
  std = np.array(transforms.IMAGENET_STD) * 255
  mean = np.array(transforms.IMAGENET_MEAN) * 255
  pixels = np.rint(batch["image"] * std + mean).astype(int)
  indices = pixels[:, 0, 0, 0] + 256 * pixels[:, 0, 0, 1]
  flipped = pixels[:, 0, 0, 2] > pixels[:, 0, -1, 2]
  return indices, flipped


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def train_iterator(source, **kwargs):
  kwargs = {"batch_size": 4, "image_size": SIZE, "seed": 0, **kwargs}
  return pipeline.create_train_iterator(source, **kwargs)


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


# ----------------------------------------------------------------- transforms
def test_normalize_uses_imagenet_mean_and_std_on_pixels_over_255():
  pixels = np.array([[0, 128, 255], [12, 200, 37]], np.uint8)
  expected = (pixels / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
  out = transforms.normalize(pixels)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_squash_resize_is_pil_bilinear_like_torchvision():
  image = np.random.default_rng(0).integers(0, 256, (218, 178, 3), np.uint8)
  expected = np.asarray(Image.fromarray(image).resize((64, 64), Image.BILINEAR))
  np.testing.assert_array_equal(transforms.resize(image, 64, "squash"), expected)
  np.testing.assert_array_equal(
      transforms.preprocess(image, 64), transforms.normalize(expected))


def test_center_crop_follows_torchvision_resize_then_center_crop():
  image = np.random.default_rng(1).integers(0, 256, (218, 178, 3), np.uint8)
  # Resize(224): 178 -> 224, 218 -> int(224 * 218 / 178) = 274; then the
  # crop starts at round((274 - 224) / 2) = 25.
  resized = np.asarray(Image.fromarray(image).resize((224, 274), Image.BILINEAR))
  np.testing.assert_array_equal(
      transforms.resize(image, 224, "center_crop"), resized[25:249])


def test_pad_keeps_the_aspect_and_pads_with_the_mean_colour():
  image = np.full((218, 178, 3), 255, np.uint8)
  out = transforms.resize(image, 109, "pad")
  assert out.shape == (109, 109, 3)
  # 178 * 109 / 218 = 89 columns of image, 10 of padding on each side.
  assert (out[:, 10:99] == 255).all()
  np.testing.assert_allclose(transforms.normalize(out[:, :10]), 0, atol=0.01)
  np.testing.assert_allclose(transforms.normalize(out[:, 99:]), 0, atol=0.01)


@pytest.mark.parametrize("shape", [(5, 7, 3), (8, 8, 3)])
def test_flip_mirrors_columns(shape):
  image = np.random.default_rng(2).integers(0, 256, shape, np.uint8)
  flipped = transforms.resize(image, 8, flip=True)
  np.testing.assert_array_equal(flipped, transforms.resize(image, 8)[:, ::-1])


# -------------------------------------------------------------------- sharding
@pytest.mark.parametrize("n", [0, 1, 7, 24, 25])
@pytest.mark.parametrize("count", [1, 2, 3])
def test_shards_are_contiguous_disjoint_and_cover_everything(n, count):
  shards = [pipeline.shard_indices(n, i, count) for i in range(count)]
  np.testing.assert_array_equal(np.concatenate(shards), np.arange(n))
  assert max(map(len, shards)) - min(map(len, shards)) <= 1


# -------------------------------------------------------------------- training
def test_train_batches_have_the_promised_structure():
  source = fer_source(20)
  batch = next(train_iterator(source, random_flip=False))
  assert set(batch) == {"image", "label"}
  assert batch["image"].shape == (4, SIZE, SIZE, 3)
  assert batch["image"].dtype == np.float32
  assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
  indices, _ = decode(batch)
  np.testing.assert_array_equal(batch["label"], source.labels[indices])


def test_attribute_labels_are_int32_vectors():
  labels = np.random.default_rng(0).integers(0, 2, (12, 40))
  batch = next(train_iterator(FakeSource(labels, task="fae")))
  assert batch["label"].shape == (4, 40) and batch["label"].dtype == np.int32
  np.testing.assert_array_equal(batch["label"], labels[decode(batch)[0]])


def test_each_epoch_is_a_new_permutation_of_the_data():
  source = fer_source(24)
  batches = take(train_iterator(source), 3 * 6)  # Three epochs of 24.
  order = np.concatenate([decode(b)[0] for b in batches]).reshape(3, 24)
  for epoch in order:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(24))
  assert not np.array_equal(order[0], order[1])
  assert not np.array_equal(order[1], order[2])
  assert not np.array_equal(order[0], np.arange(24))


def test_same_seed_same_batches_other_seed_other_order():
  source = fer_source(24)
  first = take(train_iterator(source, seed=3), 8)
  assert_same_batches(first, take(train_iterator(source, seed=3), 8))
  other = take(train_iterator(source, seed=4), 8)
  assert not np.array_equal(np.concatenate([decode(b)[0] for b in first]),
                            np.concatenate([decode(b)[0] for b in other]))


def test_start_epoch_continues_the_stream_of_epochs():
  source = fer_source(24)
  full = take(train_iterator(source), 6 + 6)  # Epochs 0 and 1.
  assert_same_batches(full[6:], take(train_iterator(source, start_epoch=1), 6))


def test_finite_epochs_end_and_drop_the_remainder():
  batches = list(train_iterator(fer_source(10), num_epochs=2))
  assert len(batches) == 5  # 20 examples in batches of 4.


def test_flips_are_random_per_example_and_faithful():
  source = fer_source(64)
  batches = take(train_iterator(source, batch_size=8), 16)
  flipped = np.concatenate([decode(b)[1] for b in batches])
  assert 0.3 < flipped.mean() < 0.7
  for batch in batches:
    for image, index, flip in zip(batch["image"], *decode(batch)):
      expected = source[index]["image"]
      expected = expected[:, ::-1] if flip else expected
      np.testing.assert_array_equal(image, transforms.normalize(expected))
  unflipped = take(train_iterator(source, batch_size=8, random_flip=False), 16)
  assert not any(decode(b)[1].any() for b in unflipped)


@pytest.mark.parametrize(("num_workers", "balanced"),
                         [(0, False), (0, True), (2, False)])
def test_resume_gives_exactly_the_batches_an_uninterrupted_run_would(
    num_workers, balanced):
  source = fer_source(26)
  make = lambda: train_iterator(source, seed=7, num_workers=num_workers,
                                balanced=balanced)
  # A run saves its state after 5 batches and carries on; a second run starts
  # from that state. 26 per epoch in batches of 4: batch 6 spans epochs 0-1.
  uninterrupted = make()
  take(uninterrupted, 5)
  state = json.loads(json.dumps(uninterrupted.get_state()))  # Orbax: JSON.
  expected = take(uninterrupted, 6)
  resumed = make()
  resumed.set_state(state)
  assert_same_batches(take(resumed, 6), expected)
  for iterator in (uninterrupted, resumed):
    iterator.close()


def test_two_processes_read_disjoint_shares_that_cover_the_data():
  source = fer_source(24)
  seen = []
  for shard in range(2):
    batches = list(train_iterator(source, shard_index=shard, shard_count=2,
                                  num_epochs=1, batch_size=3))
    seen.append(np.concatenate([decode(b)[0] for b in batches]))
  assert set(seen[0]).isdisjoint(seen[1])
  np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(24))


def test_global_batches_do_not_depend_on_the_process_count():
  """Process p's batch k is rows [p*b, (p+1)*b) of one process's global batch k (flips included)."""
  source = fer_source(24)
  single = list(train_iterator(source, num_epochs=2, batch_size=6))
  halves = [list(train_iterator(source, shard_index=p, shard_count=2, num_epochs=2, batch_size=3))
            for p in range(2)]
  assert len(single) == len(halves[0]) == len(halves[1]) == 8
  for k, batch in enumerate(single):
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([halves[0][k][key], halves[1][k][key]]), batch[key])


def test_balanced_sampling_draws_classes_equally_often():
  labels = np.array([0] * 70 + [1] * 20 + [2] * 10)
  source = FakeSource(labels)
  batches = take(train_iterator(source, balanced=True, batch_size=100), 30)
  drawn = np.concatenate([b["label"] for b in batches])
  frequencies = np.bincount(drawn, minlength=3) / len(drawn)
  np.testing.assert_allclose(frequencies, 1 / 3, atol=0.04)
  # Within a class, every example gets drawn.
  indices = np.concatenate([decode(b)[0] for b in batches])
  assert set(indices) == set(range(100))
  again = take(train_iterator(source, balanced=True, batch_size=100), 30)
  assert_same_batches(batches, again)


def test_balanced_sampling_needs_single_labels():
  with pytest.raises(ValueError, match="one class label"):
    train_iterator(FakeSource(np.zeros((8, 40)), task="fae"), balanced=True)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_unreadable_image_stops_training_with_its_name(num_workers):
  iterator = train_iterator(fer_source(12, bad={5}), num_epochs=1,
                            num_workers=num_workers)
  with pytest.raises(ImageReadError, match="/fake/00005.jpg"):
    list(iterator)
  iterator.close()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skipped_images_are_dropped_counted_and_logged(num_workers, caplog):
  source = fer_source(40, bad={3, 17})
  # Batches of one: with workers, each drops its own remainder otherwise.
  iterator = train_iterator(source, skip_bad_images=True, num_epochs=2,
                            batch_size=1, num_workers=num_workers)
  with caplog.at_level(logging.WARNING):
    batches = list(iterator)
  indices = np.concatenate([decode(b)[0] for b in batches])
  assert len(indices) == 2 * 38
  assert not {3, 17} & set(indices)
  assert all(set(b) == {"image", "label"} for b in batches)
  assert pipeline.num_skipped_images(iterator) == 4
  logged = " ".join(r.getMessage() for r in caplog.records)
  assert logged.count("/fake/00003.jpg") == 2
  assert logged.count("/fake/00017.jpg") == 2
  state = iterator.get_state()
  assert state["num_skipped"] == 4


# ------------------------------------------------------------------ evaluation
def test_eval_reads_in_order_and_pads_the_last_batch():
  source = fer_source(10)
  iterator, num_batches = pipeline.create_eval_iterator(
      source, batch_size=4, image_size=SIZE)
  batches = list(iterator)
  assert num_batches == len(batches) == 3
  last = batches[-1]
  np.testing.assert_array_equal(last["mask"], [True, True, False, False])
  np.testing.assert_array_equal(last["index"], [8, 9, -1, -1])
  assert not last["image"][2:].any() and not last["label"][2:].any()
  real = np.concatenate([b["index"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(real, np.arange(10))
  np.testing.assert_array_equal(
      np.concatenate([decode(b)[0][b["mask"]] for b in batches]), real)
  np.testing.assert_array_equal(
      np.concatenate([b["label"][b["mask"]] for b in batches]), source.labels)


@pytest.mark.parametrize("n", [23, 3])
def test_two_eval_processes_see_every_example_once_in_as_many_batches(n):
  source = fer_source(n)
  outputs = [pipeline.create_eval_iterator(source, batch_size=4,
                                           image_size=SIZE, shard_index=i,
                                           shard_count=2) for i in range(2)]
  batches = [list(iterator) for iterator, _ in outputs]
  assert outputs[0][1] == outputs[1][1] == len(batches[0]) == len(batches[1])
  real = np.concatenate([b["index"][b["mask"]] for bs in batches for b in bs])
  np.testing.assert_array_equal(np.sort(real), np.arange(n))
  masks = [sum(int(b["mask"].sum()) for b in bs) for bs in batches]
  assert masks == [n // 2, n - n // 2]


def test_eval_with_workers_keeps_the_order():
  source = fer_source(30)
  iterator, num_batches = pipeline.create_eval_iterator(
      source, batch_size=4, image_size=SIZE, num_workers=2)
  batches = list(iterator)
  assert len(batches) == num_batches == 8
  real = np.concatenate([b["index"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(real, np.arange(30))


def test_eval_attribute_padding_keeps_the_label_shape():
  labels = np.ones((5, 40))
  iterator, _ = pipeline.create_eval_iterator(
      FakeSource(labels, task="fae"), batch_size=4, image_size=SIZE)
  last = list(iterator)[-1]
  assert last["label"].shape == (4, 40)
  assert last["label"][0].all() and not last["label"][1:].any()


# ------------------------------------------------ the real RAF-DB source
@pytest.fixture(scope="module")
def rafdb_root(tmp_path_factory):
  return synth.make_synthetic_rafdb(tmp_path_factory.mktemp("rafdb"),
                                    num_train=35, num_test=14, workers=1)


def test_rafdb_eval_batches_are_the_preprocessed_images(rafdb_root):
  source = create_source("rafdb", str(rafdb_root), "test")
  iterator, _ = pipeline.create_eval_iterator(source, batch_size=8,
                                              image_size=32)
  for batch in iterator:
    for image, label, index in zip(batch["image"], batch["label"],
                                   batch["index"]):
      if index < 0:
        continue
      example = source[index]
      np.testing.assert_array_equal(
          image, transforms.preprocess(example["image"], 32))
      assert label == example["label"]


def test_rafdb_training_resumes_exactly_across_an_epoch(rafdb_root):
  source = create_source("rafdb", str(rafdb_root), "train")
  make = lambda: pipeline.create_train_iterator(
      source, batch_size=8, image_size=32, seed=1)
  expected = take(make(), 7)  # 35 per epoch: batch 4 spans epochs 0 and 1.
  first = make()
  take(first, 3)
  resumed = make()
  resumed.set_state(first.get_state())
  assert_same_batches(take(resumed, 4), expected[3:])


def test_rafdb_corrupt_jpeg_is_named_or_skipped(rafdb_root, tmp_path):
  source = create_source("rafdb", str(rafdb_root), "train")
  corrupt = tmp_path / "broken"
  synth.make_synthetic_rafdb(corrupt, num_train=14, num_test=1, workers=1)
  bad = corrupt / "basic/Image/aligned/train_00004_aligned.jpg"
  bad.write_bytes(b"not a jpeg")
  source = create_source("rafdb", str(corrupt), "train")
  with pytest.raises(ImageReadError, match="train_00004_aligned.jpg"):
    list(pipeline.create_train_iterator(source, batch_size=2, image_size=16,
                                        seed=0, num_epochs=1))
  iterator = pipeline.create_train_iterator(
      source, batch_size=1, image_size=16, seed=0, num_epochs=1,
      skip_bad_images=True)
  assert len(list(iterator)) == 13
  assert pipeline.num_skipped_images(iterator) == 1


def test_training_iterator_round_trips_through_grains_orbax_handler(tmp_path):
  source = fer_source(26)
  first = train_iterator(source)
  take(first, 4)
  checkpointer = ocp.Checkpointer(grain.checkpoint.CheckpointHandler())
  checkpointer.save(tmp_path / "iterator",
                    args=grain.checkpoint.CheckpointSave(first))
  expected = take(first, 4)
  resumed = train_iterator(source)
  checkpointer.restore(tmp_path / "iterator",
                       args=grain.checkpoint.CheckpointRestore(resumed))
  assert_same_batches(take(resumed, 4), expected)


def test_input_benchmark_reports_both_loaders(rafdb_root, capsys):
  assert input_benchmark.main([
      "--root", str(rafdb_root), "--batch-size", "4", "--image-size", "16",
      "--num-workers", "0", "--batches", "2", "--warmup", "1", "--rounds", "1",
      "--decoders", "--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  assert report["num_examples"] == 35
  assert report["grain_images_per_s"] > 0 and report["torch_images_per_s"] > 0
  assert report["ratio"] == pytest.approx(
      report["grain_images_per_s"] / report["torch_images_per_s"], rel=0.01)
  assert report["decoders"]["pillow"]["decode"] > 0
