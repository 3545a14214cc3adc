"""Faces in photographs: MTCNN detection and alignment on real photos, and `predict --detect`.

The photos are scikit-image's: `astronaut` (one face, Eileen Collins), `camera`
(the cameraman, one face), `coffee`, `chelsea` (a cat) and `rocket` (no
face), and compositions of them with several faces.
"""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from faer_jax import predict
from faer_jax.faces import align, annotate, detect, mtcnn
from test_predict import trained  # noqa: F401  (the shrunk demo run, shared)
from test_train import synth_root  # noqa: F401

skimage_data = pytest.importorskip("skimage.data")


def _rgb(image: np.ndarray) -> np.ndarray:
  return np.stack([image] * 3, axis=-1) if image.ndim == 2 else image[..., :3]


def _rotated(image: np.ndarray, degrees: float) -> np.ndarray:
  return np.asarray(Image.fromarray(image).rotate(degrees, resample=Image.Resampling.BILINEAR, expand=True))


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
  astronaut, camera = skimage_data.astronaut(), _rgb(skimage_data.camera())
  group = np.zeros((600, 1400, 3), np.uint8)  # three faces, two of them smaller and one turned
  group[40:552, 0:512] = astronaut
  group[150:406, 560:816] = np.asarray(Image.fromarray(camera).resize((256, 256)))
  turned = _rotated(astronaut[::2, ::2], -15)
  group[100:100 + turned.shape[0], 900:900 + turned.shape[1]] = turned
  return {"astronaut": astronaut, "camera": camera, "pair": np.concatenate([astronaut, astronaut[:, ::-1]], axis=1),
          "group": group, "coffee": skimage_data.coffee(), "chelsea": skimage_data.chelsea(),
          "rocket": skimage_data.rocket()}


@pytest.mark.parametrize("name,count", [("astronaut", 1), ("camera", 1), ("pair", 2), ("group", 3), ("coffee", 0),
                                        ("chelsea", 0), ("rocket", 0)])
def test_detection_counts(photos, name, count):
  faces = detect.detect_faces(photos[name])
  assert len(faces) == count, [(f.box, f.score) for f in faces]
  for face in faces:
    x0, y0, x1, y1 = face.box
    assert face.score > 0.9 and x1 - x0 > detect.MIN_FACE_SIZE and y1 - y0 > detect.MIN_FACE_SIZE
    # On the face: inside its box, give or take a tenth of it (the cameraman's far eye, in three-quarter view).
    margin = 0.1 * np.array([x1 - x0, y1 - y0])
    assert np.all((face.landmarks >= [x0, y0] - margin) & (face.landmarks <= [x1, y1] + margin))


def test_astronauts_landmarks_are_her_eyes_nose_and_mouth(photos):
  (face,) = detect.detect_faces(photos["astronaut"])
  # Measured by eye on the 512 × 512 photo: her eyes' centers, nose tip and mouth corners.
  expected = np.array([[204, 100], [247, 103], [225, 127], [201, 138], [245, 141]])
  np.testing.assert_allclose(face.landmarks, expected, atol=6)
  # Mirrored, her left eye becomes the one on the image's right: the order is by image side.
  (mirrored,) = detect.detect_faces(photos["astronaut"][:, ::-1])
  assert mirrored.landmarks[0, 0] < mirrored.landmarks[1, 0]
  np.testing.assert_allclose(mirrored.landmarks[:, 0], 511 - face.landmarks[[1, 0, 2, 4, 3], 0], atol=4)


def test_similarity_transform_recovers_a_known_one():
  rng = np.random.default_rng(0)
  points = rng.uniform(0, 100, (5, 2))
  angle, scale, shift = np.radians(23.0), 1.7, np.array([12.0, -5.0])
  rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  matrix = align.similarity_transform(points, points @ (scale * rotation).T + shift)
  np.testing.assert_allclose(matrix, np.concatenate([scale * rotation, shift[:, None]], axis=1), atol=1e-10)


@pytest.mark.parametrize("degrees", [-30, -12, 0, 20])
@pytest.mark.parametrize("layout", ["rafdb", "celeba"])
def test_aligned_crops_are_upright_with_the_eyes_on_the_template(photos, degrees, layout):
  image = _rotated(photos["astronaut"], degrees)
  (face,) = detect.detect_faces(image)
  assert abs(align.eye_angle(face.landmarks) + degrees) < 6  # the photo is turned
  crop = align.align_face(image, face.landmarks, layout)
  (width, height), template, _ = align.LAYOUTS[layout]
  assert crop.shape == (height, width, 3) and crop.dtype == np.uint8
  (again,) = detect.detect_faces(crop)
  assert abs(align.eye_angle(again.landmarks)) < 3  # the crop is not
  np.testing.assert_allclose(again.landmarks[:2], template[:2], atol=0.04 * width)


def test_predict_detect_reports_every_face_of_every_photo(trained, photos, tmp_path, capsys):  # noqa: F811
  paths = {}
  for name in ("astronaut", "pair", "coffee"):
    paths[name] = str(tmp_path / f"{name}.png")
    Image.fromarray(photos[name]).save(paths[name])
  missing = str(tmp_path / "missing.jpg")
  assert predict.main(["--workdir", trained, "--detect", paths["astronaut"], paths["pair"], paths["coffee"],
                       missing, "--json"]) == 1
  captured = capsys.readouterr()
  out = json.loads(captured.out)
  records = {os.path.basename(r["path"]): r["faces"] for r in out["predictions"]}
  assert {k: len(v) for k, v in records.items()} == {"astronaut.png": 1, "pair.png": 2, "coffee.png": 0}
  assert [os.path.basename(u["path"]) for u in out["unreadable"]] == ["missing.jpg"] and "missing.jpg" in captured.err
  names = out["class_names"]
  for face in records["astronaut.png"] + records["pair.png"]:
    assert len(face["box"]) == 4 and np.shape(face["landmarks"]) == (5, 2) and face["score"] > 0.9
    assert set(face["probabilities"]) == set(names) and abs(sum(face["probabilities"].values()) - 1) < 1e-6
    assert face["predicted"] == max(face["probabilities"], key=face["probabilities"].get)
    assert [n for n, _ in face["top_k"]][0] == face["predicted"] and "path" not in face
  # The model saw the aligned crop, preprocessed as a file of the dataset: the same crop saved as a (lossless)
  # file and predicted as one gives the same probabilities.
  (face,) = detect.detect_faces(photos["astronaut"])
  crop_path = str(tmp_path / "crop.png")
  Image.fromarray(align.align_face(photos["astronaut"], face.landmarks, "rafdb")).save(crop_path)
  (as_file,), _ = predict.predict_files(predict.load_model(trained), [crop_path])
  detected = records["astronaut.png"][0]["probabilities"]
  np.testing.assert_allclose([detected[n] for n in names], [as_file["probabilities"][n] for n in names], rtol=1e-5)


def test_predict_detect_text_and_csv(trained, photos, tmp_path, capsys):  # noqa: F811
  path = str(tmp_path / "pair.jpg")
  Image.fromarray(photos["pair"]).save(path, quality=95)
  assert predict.main(["--workdir", trained, "--detect", path]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == f"{path}: 2 faces" and lines[1].startswith("  0: [") and lines[2].startswith("  1: [")
  assert predict.main(["--workdir", trained, "--detect", path, "--csv"]) == 0
  rows = capsys.readouterr().out.splitlines()
  assert rows[0].startswith("path,face,x0,y0,x1,y1,prediction,") and len(rows) == 3


def test_missing_detector_weights_is_one_line(monkeypatch):
  monkeypatch.setattr(mtcnn.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(mtcnn.WeightsNotFound, match=r"pip install 'faer-jax\[faces\]'"):
    mtcnn.weights_dir()


def test_detect_names_a_bad_array():
  with pytest.raises(ValueError, match=r"\(H, W, 3\) RGB image, got shape \(10, 10\)"):
    detect.detect_faces(np.zeros((10, 10), np.uint8))


def test_annotate_draws_boxes_landmarks_and_labels(trained, photos, tmp_path, capsys):  # noqa: F811
  paths = []
  for folder, name in (("a", "pair"), ("b", "pair"), ("a", "coffee")):  # two photos named alike
    os.makedirs(tmp_path / folder, exist_ok=True)
    paths.append(str(tmp_path / folder / f"{name}.png"))
    Image.fromarray(photos[name]).save(paths[-1])
  out = tmp_path / "annotated"
  assert predict.main(["--workdir", trained, "--detect", *paths, "--annotate", str(out), "--json"]) == 0
  faces = [r["faces"] for r in json.loads(capsys.readouterr().out)["predictions"]]
  assert sorted(os.listdir(out)) == ["coffee.png", "pair.png", "pair_1.png"]
  drawn = np.asarray(Image.open(out / "pair.png"))
  assert drawn.shape == photos["pair"].shape
  changed = np.any(drawn != photos["pair"], axis=-1)
  x0, y0, x1, y1 = (round(v) for v in faces[0][0]["box"])
  assert changed[(y0 + y1) // 2, x0] and changed[(y0 + y1) // 2, x1]  # the box's sides
  lx, ly = (round(v) for v in faces[0][0]["landmarks"][2])
  assert tuple(drawn[ly, lx]) == annotate.LANDMARK_COLOR  # the nose tip
  assert changed[max(y0 - 10, 0), x0 + 5]  # the label above the box
  assert changed.mean() < 0.1 and not changed[500, 20]  # the rest of the photo untouched
  assert np.array_equal(np.asarray(Image.open(out / "coffee.png")), photos["coffee"])  # no face: the photo as is
  assert predict.main(["--workdir", trained, paths[0], "--annotate", str(out)]) == 2
  assert capsys.readouterr().err.strip() == "error: --annotate draws the faces --detect finds: add --detect"


def _write_video(path: str, frames: list[np.ndarray], fps: float = 10.0) -> None:
  cv2 = pytest.importorskip("cv2")
  height, width = frames[0].shape[:2]
  writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
  for frame in frames:
    writer.write(np.ascontiguousarray(frame[..., ::-1]))
  writer.release()


def test_video_round_trip(trained, photos, tmp_path, capsys):  # noqa: F811
  cv2 = pytest.importorskip("cv2")
  small = np.asarray(Image.fromarray(photos["astronaut"]).resize((256, 256)))
  no_face = np.asarray(Image.fromarray(photos["coffee"]).resize((256, 256)))
  frames = [np.roll(small, 6 * i, axis=1) for i in range(9)]
  frames[4] = no_face
  source, out = str(tmp_path / "in.mp4"), str(tmp_path / "out" / "annotated.mp4")
  _write_video(source, frames)
  assert predict.main(["--workdir", trained, "--video", source, "--out", out, "--every", "2", "--json"]) == 0
  done = json.loads(capsys.readouterr().out)
  assert done["frames"] == 9 and done["analysed"] == 5 and done["faces"] == 4 and done["size"] == [256, 256]
  # The annotated video: every frame, the size kept, boxes drawn where there are faces.
  capture = cv2.VideoCapture(out)
  written = []
  while True:
    ok, frame = capture.read()
    if not ok:
      break
    written.append(frame[..., ::-1])
  assert len(written) == 9 and written[0].shape == (256, 256, 3)
  assert np.abs(written[0].astype(int) - frames[0]).max() > 100  # drawn on (beyond the codec's error)
  # The CSV: one row per face of each analysed frame; the frame without a face has one empty row.
  with open(tmp_path / "out" / "annotated.csv") as f:
    rows = list(csv.DictReader(f))
  assert [int(r["frame"]) for r in rows] == [0, 2, 4, 6, 8]
  assert rows[2]["face"] == "" and rows[2]["prediction"] == "" and rows[2]["time"] == "0.400"
  x0 = [float(r["x0"]) for r in rows if r["face"] == "0"]
  assert np.all(np.diff(x0) > 0)  # the face moves right, 12 px per analysed frame
  classes = list(rows[0])[9:]
  assert rows[0]["prediction"] == max(classes, key=lambda n: float(rows[0][n]))
  assert abs(sum(float(rows[0][n]) for n in classes) - 1) < 1e-5


@pytest.mark.parametrize("make,args,message", [
    (lambda p: p.write_text("not a video"), ["--out", "{tmp}/o.mp4"], "not a video OpenCV can open"),
    (None, ["--out", "{tmp}/o.mp4"], "no such file"),
    (lambda p: _write_video(str(p), [np.zeros((64, 64, 3), np.uint8)] * 2), [], "takes --out OUT.mp4"),
    (lambda p: _write_video(str(p), [np.zeros((64, 64, 3), np.uint8)] * 2), ["--out", "{tmp}/o.mp4", "--every", "0"],
     "--every 0"),
])
def test_video_bad_input_is_one_line(trained, tmp_path, capsys, make, args, message):  # noqa: F811
  source = tmp_path / "in.mp4"
  if make:
    make(source)
  argv = ["--workdir", trained, "--video", str(source), *[a.format(tmp=tmp_path) for a in args]]
  assert predict.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and message in err and "\n" not in err


def test_detector_comparison_matching_and_sets():
  from faer_jax.faces import compare
  face = (10, 10, 60, 60)
  assert compare.match([(12, 8, 58, 62)], [face]) == (1, 0, 0)
  assert compare.match([(12, 8, 58, 62), (14, 10, 56, 60)], [face]) == (1, 1, 0)  # one face, one match
  assert compare.match([(0, 0, 200, 200)], [face]) == (0, 1, 1)  # the center inside, but far too big
  assert compare.match([(70, 10, 120, 60)], [face]) == (0, 1, 1)
  mosaics = compare.lfw_mosaics()
  assert len(mosaics) == 20 and sum(len(faces) for _, _, faces in mosaics) == 100
  photos = compare.photographs()
  assert sum(len(faces) for _, _, faces in photos) == 7
  # The hand-marked boxes are where MTCNN finds the faces (and so where the other detectors are looked for).
  for name, image, faces in photos[:2] + photos[-2:]:
    assert compare.match([f.box for f in detect.detect_faces(image)], faces) == (len(faces), 0, 0), name


def test_attribute_models_get_celeba_crops_and_attribute_sets(photos, tmp_path, capsys, torch):
  from faer_jax.interop import cli
  from faer_jax.interop.external import perturb
  from faer_jax.interop.torch_reference import create_torch_model
  torch.manual_seed(0)
  torch.save(perturb(create_torch_model("test", 40), seed=2).state_dict(), tmp_path / "celeba.pth")
  imported = str(tmp_path / "imported")
  assert cli.main(["import", "--torch-checkpoint", str(tmp_path / "celeba.pth"), "--variant", "test",
                   "--num-classes", "40", "--out", imported]) == 0
  path = str(tmp_path / "astronaut.png")
  Image.fromarray(photos["astronaut"]).save(path)
  capsys.readouterr()
  assert predict.main(["--workdir", imported, "--detect", path, "--json"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["task"] == "fae" and len(out["class_names"]) == 40
  (face,) = out["predictions"][0]["faces"]
  assert "predicted" not in face and len(face["probabilities"]) == 40
  assert face["attributes"] == [n for n in out["class_names"] if face["probabilities"][n] > 0.5]
  # The crop the model saw is CelebA's eye-aligned 178 × 218, preprocessed as a CelebA file would be.
  loaded = predict.load_model(imported)
  (detected,) = detect.detect_faces(photos["astronaut"])
  crop_path = str(tmp_path / "crop.png")
  Image.fromarray(align.align_face(photos["astronaut"], detected.landmarks, "celeba")).save(crop_path)
  assert Image.open(crop_path).size == (178, 218)
  (as_file,), _ = predict.predict_files(loaded, [crop_path])
  names = out["class_names"]
  np.testing.assert_allclose([face["probabilities"][n] for n in names], [as_file["probabilities"][n] for n in names],
                             rtol=1e-5)


def test_a_phone_photo_is_read_the_way_it_is_displayed(trained, photos, tmp_path, capsys):  # noqa: F811
  # Stored sideways with EXIF orientation 6 ("turn 90° clockwise to display"), as phone cameras write them.
  stored = Image.fromarray(np.rot90(photos["astronaut"], k=1).copy())
  exif = stored.getexif()
  exif[0x0112] = 6
  path = str(tmp_path / "phone.jpg")
  stored.save(path, quality=95, exif=exif)
  out = tmp_path / "annotated"
  assert predict.main(["--workdir", trained, "--detect", path, "--json", "--annotate", str(out)]) == 0
  (face,) = json.loads(capsys.readouterr().out)["predictions"][0]["faces"]
  (upright,) = detect.detect_faces(photos["astronaut"])
  np.testing.assert_allclose(face["box"], upright.box, atol=4)
  assert np.asarray(Image.open(out / "phone.png")).shape == photos["astronaut"].shape
