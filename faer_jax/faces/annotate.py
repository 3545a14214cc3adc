"""Photographs with their faces drawn on them: box, five landmarks and the prediction."""

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BOX_COLOR = (0, 220, 90)
LANDMARK_COLOR = (255, 60, 60)


def label(face: dict, task: str, top: int = 3) -> str:
  """'Happiness 87%' (expressions) or the `top` most probable attributes above 0.5."""
  if task == "fer":
    return f"{face['predicted']} {100 * face['probabilities'][face['predicted']]:.0f}%"
  ranked = sorted(face["attributes"], key=lambda n: -face["probabilities"][n])
  return ", ".join(ranked[:top]) or "(none)"


def annotate(image: np.ndarray, faces: list[dict], task: str) -> Image.Image:
  """A copy of the uint8 RGB `image` with each face of a `predict --detect` record drawn on it."""
  out = Image.fromarray(image).convert("RGB")
  draw = ImageDraw.Draw(out)
  width = max(2, round(min(out.size) / 250))
  font = ImageFont.load_default(size=max(12, round(min(out.size) / 30)))
  for face in faces:
    x0, y0, x1, y1 = face["box"]
    draw.rectangle([x0, y0, x1, y1], outline=BOX_COLOR, width=width)
    r = 1.5 * width
    for x, y in face["landmarks"]:
      draw.ellipse([x - r, y - r, x + r, y + r], fill=LANDMARK_COLOR)
    text = label(face, task)
    left, top, right, bottom = draw.textbbox((x0, y0), text, font=font)
    above = y0 - (bottom - top) - 2 * width
    at = (x0, above if above >= 0 else y1 + width)
    box = draw.textbbox(at, text, font=font)
    draw.rectangle([box[0] - width, box[1] - width, box[2] + width, box[3] + width], fill=BOX_COLOR)
    draw.text(at, text, fill=(0, 0, 0), font=font)
  return out
