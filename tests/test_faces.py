"""Faces in photographs: MTCNN detection and alignment on real photos, and `predict --detect`.

The photos are scikit-image's: `astronaut` (one face, Eileen Collins), `camera`
(the cameraman, one face), `coffee`, `chelsea` (a cat) and `rocket` (no
face), and compositions of them with several faces.
"""

import json
import os

import numpy as np
import pytest
from PIL import Image

from faer_jax import predict
from faer_jax.faces import align, detect, mtcnn
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
