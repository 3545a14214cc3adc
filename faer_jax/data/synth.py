"""Synthetic faces written in the owners' RAF-DB, AffectNet and CelebA layouts.

The demo and the tests train on these instead of the real datasets, and they
go through the real loaders because the files sit exactly where the owners put
them. Each face is drawn with Pillow: position, scale, skin tone, background,
hair and accessories vary; the expression is carried by the mouth, eyebrows
and eyes, and the CelebA attributes are visible.

Every example is rendered from an RNG derived from ``(seed, split, index)``, so
a seed gives the same bytes whatever the number of worker processes.

Command line (dispatched by ``python -m faer_jax.data``)::

  python -m faer_jax.data synth --layout rafdb --out /tmp/rafdb_synth
  python -m faer_jax.data synth --layout affectnet --out /tmp/affectnet_synth
  python -m faer_jax.data synth --layout celeba --out /tmp/celeba_synth \
      --num-train 2000 --num-test 300
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import math
import multiprocessing
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from faer_jax.data.affectnet import CSV_HEADER

# RAF-DB's label order (file labels 1-7 are these, in this order).
# Bump when the drawing changes, so cached sets are regenerated.
SYNTH_VERSION = 1

EXPRESSIONS = ("Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger",
               "Neutral")

# AffectNet's expression codes 0-7, as drawn (the loader names them Happy, Sad).
AFFECTNET_EXPRESSIONS = ("Neutral", "Happiness", "Sadness", "Surprise", "Fear",
                         "Disgust", "Anger", "Contempt")
_AFFECTNET_NO_FACE = 10

# CelebA's attribute order, as in list_attr_celeba.txt.
ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes",
    "Bald", "Bangs", "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair",
    "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin",
    "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones",
    "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard",
    "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair",
    "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace",
    "Wearing_Necktie", "Young")

# How each expression moves the brows, eyes and mouth. Heights are fractions
# of the face's half-height b; `tilt` > 0 lifts the inner ends of the brows.
_FACE_ACTIONS = {
    "Surprise": dict(brow_raise=0.14, brow_tilt=0.0, brow_arch=0.08,
                     eye_open=2.0, mouth="round"),
    "Fear": dict(brow_raise=0.1, brow_tilt=0.12, brow_arch=0.0,
                 eye_open=2.0, mouth="stretched"),
    "Disgust": dict(brow_raise=-0.04, brow_tilt=-0.05, brow_arch=0.0,
                    eye_open=0.5, mouth="sneer"),
    "Happiness": dict(brow_raise=0.0, brow_tilt=0.0, brow_arch=0.03,
                      eye_open=0.8, mouth="smile"),
    "Sadness": dict(brow_raise=0.0, brow_tilt=0.15, brow_arch=0.0,
                    eye_open=0.8, mouth="frown"),
    "Anger": dict(brow_raise=-0.06, brow_tilt=-0.15, brow_arch=0.0,
                  eye_open=0.6, mouth="clenched"),
    "Neutral": dict(brow_raise=0.0, brow_tilt=0.0, brow_arch=0.02,
                    eye_open=1.0, mouth="flat"),
    # AffectNet's eighth expression: one lip corner pulled up and back.
    "Contempt": dict(brow_raise=0.02, brow_tilt=0.0, brow_arch=0.02,
                     eye_open=0.75, mouth="smirk"),
}

_HAIR_COLOURS = {
    "Black_Hair": (28, 22, 20), "Blond_Hair": (222, 192, 112),
    "Brown_Hair": (112, 68, 36), "Gray_Hair": (165, 165, 160),
    "other": (150, 62, 30),  # auburn: none of CelebA's four colours.
}
_SUPERSAMPLE = 2  # Draw at 2x and downsample: smooth edges, cheap.
_SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}


# ----------------------------------------------------------------- attributes
def sample_attributes(rng: np.random.Generator) -> dict[str, bool]:
  """Draws a consistent set of CelebA attributes (rates loosely like CelebA's).

  Args:
    rng: the example's generator.

  Returns:
    Every name of `ATTRIBUTES` mapped to a bool; exclusive ones stay exclusive
    (one hair colour at most, No_Beard = no beard of any kind, ...).
  """
  p = lambda prob: bool(rng.random() < prob)
  male, young = p(0.42), p(0.75)
  bald = male and p(0.1)
  colour_odds = np.array([0.3, 0.08 if male else 0.2, 0.27,
                          0.05 if young else 0.25, 0.15])
  hair_colour = "none" if bald else str(rng.choice(
      ["Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair", "other"],
      p=colour_odds / colour_odds.sum()))
  beard = male and p(0.35)
  goatee = beard and p(0.5)
  smiling, makeup = p(0.48), (not male) and p(0.45)
  hair_texture = "none" if bald else rng.choice(["Straight_Hair", "Wavy_Hair",
                                                 "none"], p=[0.4, 0.35, 0.25])
  receding = male and not bald and p(0.15)
  attrs = {
      "5_o_Clock_Shadow": male and not beard and p(0.3),
      "Arched_Eyebrows": p(0.08 if male else 0.4),
      "Attractive": p(0.5),
      "Bags_Under_Eyes": p(0.2 if young else 0.45),
      "Bald": bald,
      "Bangs": not bald and not receding and p(0.08 if male else 0.25),
      "Big_Lips": p(0.24),
      "Big_Nose": p(0.23),
      "Blurry": p(0.05),
      "Bushy_Eyebrows": p(0.25 if male else 0.08),
      "Chubby": p(0.06),
      "Double_Chin": p(0.05),
      "Eyeglasses": p(0.12),
      "Goatee": goatee,
      "Heavy_Makeup": makeup,
      "High_Cheekbones": p(0.8 if smiling else 0.15),
      "Male": male,
      "Mouth_Slightly_Open": p(0.48),
      "Mustache": male and p(0.6 if beard else 0.05),
      "Narrow_Eyes": p(0.12),
      "No_Beard": not beard,
      "Oval_Face": p(0.28),
      "Pale_Skin": p(0.05),
      "Pointy_Nose": p(0.28),
      "Receding_Hairline": receding,
      "Rosy_Cheeks": (not male) and p(0.12),
      "Sideburns": male and not bald and p(0.12),
      "Smiling": smiling,
      "Wearing_Earrings": p(0.03 if male else 0.35),
      "Wearing_Hat": p(0.1),
      "Wearing_Lipstick": (not male) and (makeup or p(0.3)),
      "Wearing_Necklace": p(0.02 if male else 0.2),
      "Wearing_Necktie": male and p(0.15),
      "Young": young,
  }
  for name in ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair"):
    attrs[name] = hair_colour == name
  for name in ("Straight_Hair", "Wavy_Hair"):
    attrs[name] = hair_texture == name
  return attrs


def _rafdb_nuisance(rng: np.random.Generator) -> dict[str, bool]:
  """Attributes for an expression image: varied, but never hiding the mouth,
  brows or eyes (no beard, mustache, bangs, blur or narrowed eyes)."""
  attrs = sample_attributes(rng)
  for name in ("Bangs", "Goatee", "Mustache", "Blurry", "Narrow_Eyes",
               "Smiling", "Mouth_Slightly_Open"):
    attrs[name] = False
  attrs["No_Beard"] = True
  return attrs


# -------------------------------------------------------------------- drawing
def _ellipse(cx, cy, rx, ry):
  return [cx - rx, cy - ry, cx + rx, cy + ry]


def _curve(x0, x1, y_of_x, n=9):
  """Polyline through y_of_x(u) for u in [-1, 1] mapped onto [x0, x1]."""
  us = np.linspace(-1.0, 1.0, n)
  return [(x0 + (u + 1) / 2 * (x1 - x0), y_of_x(u)) for u in us]


def _background(rng, width, height):
  """Smooth random colour field plus a few random shapes."""
  grid = rng.integers(0, 256, size=(3, 3, 3), dtype=np.uint8)
  img = Image.fromarray(grid).resize((width, height), Image.BILINEAR)
  draw = ImageDraw.Draw(img, "RGBA")
  for _ in range(rng.integers(0, 5)):
    x, y = rng.uniform(0, width), rng.uniform(0, height)
    r = rng.uniform(0.05, 0.3) * width
    colour = tuple(int(c) for c in rng.integers(0, 256, 3)) + (140,)
    if rng.random() < 0.5:
      draw.ellipse(_ellipse(x, y, r, r * rng.uniform(0.3, 1.0)), fill=colour)
    else:
      draw.rectangle(_ellipse(x, y, r, r * rng.uniform(0.1, 1.0)), fill=colour)
  return img


def _skin(rng, pale):
  light, dark = np.array([255, 226, 200]), np.array([105, 66, 42])
  t = rng.uniform(0.0, 0.1) if pale else rng.uniform(0.1, 1.0)
  return tuple(int(v) for v in light + t * (dark - light))


def _draw_face(rng, width, height, expression, attrs, centre_y):
  """Renders one face; all lengths scale with the face's half-axes (a, b)."""
  s = _SUPERSAMPLE
  img = _background(rng, width * s, height * s)
  draw = ImageDraw.Draw(img, "RGBA")
  j = lambda: rng.uniform(0.85, 1.15)  # Per-feature size jitter.
  a = min(width, height) * s * rng.uniform(0.28, 0.34)
  a *= 1.12 if attrs["Chubby"] else 1.0
  b = a * (rng.uniform(1.3, 1.4) if attrs["Oval_Face"] else
           rng.uniform(1.12, 1.25))
  cx = width * s * (0.5 + rng.uniform(-0.06, 0.06))
  cy = height * s * (centre_y + rng.uniform(-0.05, 0.05))
  t = max(2.0, 0.07 * a)  # Stroke width of lines on the face.
  skin = _skin(rng, attrs["Pale_Skin"])
  dark_skin = tuple(int(c * 0.75) for c in skin)
  hair = next((_HAIR_COLOURS[name] for name in _HAIR_COLOURS
               if attrs.get(name)),
              (40, 30, 25) if attrs["Bald"] else _HAIR_COLOURS["other"])
  act = _FACE_ACTIONS[expression]

  # Body: shoulders with shirt, neck, and what is worn there.
  shirt = tuple(int(c) for c in rng.integers(0, 256, 3))
  draw.ellipse(_ellipse(cx, cy + 2.05 * b, 1.9 * a, 1.05 * b), fill=shirt)
  draw.rectangle([cx - 0.42 * a, cy + 0.5 * b, cx + 0.42 * a, cy + 1.25 * b],
                 fill=dark_skin)
  if attrs["Wearing_Necktie"]:
    tie = (200, 30, 40) if sum(shirt) > 300 else (235, 235, 70)
    y0 = cy + 1.08 * b
    draw.polygon([(cx - 0.12 * a, y0), (cx + 0.12 * a, y0),
                  (cx + 0.2 * a, y0 + 0.7 * b), (cx, y0 + 0.85 * b),
                  (cx - 0.2 * a, y0 + 0.7 * b)], fill=tie)
  if attrs["Wearing_Necklace"]:
    for u in np.linspace(-1, 1, 9):
      x, y = cx + 0.38 * a * u, cy + 1.12 * b + 0.15 * b * (1 - u * u)
      draw.ellipse(_ellipse(x, y, 0.05 * a, 0.05 * a), fill=(245, 215, 90))

  # Long hair hangs behind the head (women), drawn before the face.
  has_hair = not attrs["Bald"]
  wavy = attrs["Wavy_Hair"]
  if has_hair and not attrs["Male"]:
    waves = lambda y: 0.08 * a * math.sin(y / (0.18 * b)) if wavy else 0.0
    ys = np.linspace(cy - 0.4 * b, cy + 1.35 * b, 12)
    left = [(cx - 1.25 * a + waves(y), y) for y in ys]
    right = [(cx + 1.25 * a + waves(y), y) for y in ys[::-1]]
    draw.polygon(left + right, fill=hair)
    draw.ellipse(_ellipse(cx, cy - 0.25 * b, 1.25 * a, 0.95 * b), fill=hair)

  # Ears, earrings, head.
  for side in (-1, 1):
    draw.ellipse(_ellipse(cx + side * 0.98 * a, cy - 0.05 * b, 0.16 * a,
                          0.2 * b), fill=skin)
    if attrs["Wearing_Earrings"]:
      draw.ellipse(_ellipse(cx + side * 1.0 * a, cy + 0.22 * b, 0.08 * a,
                            0.08 * a), fill=(250, 205, 40))
  draw.ellipse(_ellipse(cx, cy, a, b), fill=skin)
  if attrs["Double_Chin"]:
    draw.arc(_ellipse(cx, cy + 0.9 * b, 0.45 * a, 0.18 * b), 20, 160,
             fill=dark_skin, width=int(t))

  # Lower-face hair: stubble, beards, sideburns.
  if attrs["5_o_Clock_Shadow"]:
    draw.chord(_ellipse(cx, cy, a, b), 15, 165, fill=(60, 50, 45, 90))
  if not attrs["No_Beard"] and not attrs["Goatee"]:  # A full beard.
    draw.chord(_ellipse(cx, cy, a * 1.02, b * 1.04), 10, 170, fill=hair)
  if attrs["Goatee"]:
    draw.ellipse(_ellipse(cx, cy + 0.82 * b, 0.25 * a, 0.17 * b), fill=hair)
  if attrs["Sideburns"]:
    for side in (-1, 1):
      draw.rectangle(_ellipse(cx + side * 0.88 * a, cy - 0.05 * b, 0.1 * a,
                              0.32 * b), fill=hair)

  # Cheeks.
  if attrs["Rosy_Cheeks"] or attrs["Heavy_Makeup"]:
    for side in (-1, 1):
      draw.ellipse(_ellipse(cx + side * 0.55 * a, cy + 0.2 * b, 0.2 * a,
                            0.13 * b), fill=(235, 80, 95, 120))

  # Eyes: white, iris; expression sets how open they are.
  eye_y, eye_dx = cy - 0.12 * b * j(), 0.4 * a * j()
  eye_rx = 0.15 * a * j()
  eye_ry = 0.075 * b * act["eye_open"] * j()
  eye_ry *= 0.5 if attrs["Narrow_Eyes"] else 1.0
  iris = tuple(int(c) for c in rng.integers(20, 110, 3))
  for side in (-1, 1):
    ex = cx + side * eye_dx
    if attrs["Heavy_Makeup"]:
      draw.ellipse(_ellipse(ex, eye_y - eye_ry, eye_rx * 1.1, eye_ry * 1.2),
                   fill=(120, 60, 160, 140))
    if attrs["Bags_Under_Eyes"]:
      draw.arc(_ellipse(ex, eye_y + eye_ry, eye_rx, 0.06 * b), 20, 160,
               fill=dark_skin, width=max(1, int(t / 2)))
    draw.ellipse(_ellipse(ex, eye_y, eye_rx, eye_ry), fill=(250, 250, 250),
                 outline=(40, 30, 30), width=max(1, int(t / 2)))
    iris_r = min(0.07 * a, eye_ry)
    draw.ellipse(_ellipse(ex, eye_y, iris_r, iris_r), fill=iris)

  # Brows: raised, tilted (inner ends up or down), arched.
  brow_y = eye_y - (0.2 + act["brow_raise"]) * b * j()
  brow_w = 0.19 * a * j()
  brow_t = t * (2.0 if attrs["Bushy_Eyebrows"] else 1.3)
  arch = act["brow_arch"] + (0.06 if attrs["Arched_Eyebrows"] else 0.0)
  brow_colour = hair if has_hair else (60, 45, 35)
  for side in (-1, 1):
    bx = cx + side * eye_dx
    inner_lift = act["brow_tilt"] * b * j()
    # u runs outer (-1) to inner (+1) end of the brow.
    points = [(bx - side * brow_w * u,
               brow_y - inner_lift * u - arch * b * (1 - u * u))
              for u in np.linspace(-1, 1, 7)]
    draw.line(points, fill=brow_colour, width=int(brow_t), joint="curve")

  # Nose; disgust wrinkles it.
  nose_h = 0.22 * b * (1.5 if attrs["Big_Nose"] else 1.0)
  nose_w = 0.09 * a * (1.6 if attrs["Big_Nose"] else 1.0)
  nose_y = cy + 0.05 * b
  tip = nose_y + nose_h * (0.7 if attrs["Pointy_Nose"] else 0.5)
  draw.line([(cx, nose_y - nose_h * 0.5), (cx - nose_w, tip), (cx + nose_w,
             tip)], fill=dark_skin, width=max(1, int(t * 0.7)))
  if act["mouth"] == "sneer":
    for k in range(3):
      y = nose_y - nose_h * (0.3 - 0.14 * k)
      draw.line([(cx - 0.12 * a, y), (cx + 0.12 * a, y - 0.02 * b)],
                fill=(90, 50, 40), width=max(1, int(t * 0.6)))

  # Mouth.
  lipstick = attrs["Wearing_Lipstick"]
  lip = (205, 25, 50) if lipstick else tuple(int(c * 0.4) for c in skin)
  lip_t = int(t * (1.9 if attrs["Big_Lips"] else 1.2) * (1.3 if lipstick
                                                            else 1.0))
  _draw_mouth(draw, rng, act["mouth"], attrs, cx, cy + 0.5 * b, a, b, lip,
              lip_t)
  if attrs["Mustache"]:
    draw.rectangle(_ellipse(cx, cy + 0.36 * b, 0.3 * a, 0.045 * b), fill=hair)

  # Hair on top, bangs, hat, glasses.
  if has_hair:
    hairline = cy - (0.78 if attrs["Receding_Hairline"] else 0.58) * b
    top = [(cx + 1.06 * a * math.cos(th), cy - 0.05 * b + 1.1 * b *
            math.sin(th) + (0.04 * b * math.sin(8 * th) if wavy else 0.0))
           for th in np.linspace(math.pi, 2 * math.pi, 17)]
    draw.polygon(top + [(cx + 0.92 * a, hairline), (cx - 0.92 * a, hairline)],
                 fill=hair)
    if attrs["Bangs"]:
      fringe_y = cy - 0.44 * b
      teeth = [(cx + 0.85 * a * u, fringe_y - (0.06 * b if k % 2 else 0.0))
               for k, u in enumerate(np.linspace(1, -1, 9))]
      draw.polygon([(cx - 0.9 * a, hairline), (cx + 0.9 * a, hairline)] +
                   teeth, fill=hair)
  if attrs["Wearing_Hat"]:
    hat = tuple(int(c) for c in rng.integers(0, 256, 3))
    brim_y = cy - 0.68 * b
    draw.rectangle([cx - 0.8 * a, brim_y - 0.75 * b, cx + 0.8 * a, brim_y],
                   fill=hat)
    draw.rectangle([cx - 1.35 * a, brim_y - 0.08 * b, cx + 1.35 * a,
                    brim_y + 0.06 * b], fill=tuple(c // 2 for c in hat))
  if attrs["Eyeglasses"]:
    frame = tuple(int(c) for c in rng.integers(0, 90, 3))
    r = 0.27 * a
    for side in (-1, 1):
      ex = cx + side * eye_dx
      draw.ellipse(_ellipse(ex, eye_y, r, r * 0.85), outline=frame,
                   width=int(t * 0.8))
      draw.line([(ex + side * r, eye_y), (cx + side * 0.98 * a,
                                          eye_y - 0.05 * b)],
                fill=frame, width=int(t * 0.8))
    draw.line([(cx - eye_dx + r, eye_y), (cx + eye_dx - r, eye_y)],
              fill=frame, width=int(t * 0.8))

  img = img.reduce(s)
  if attrs["Blurry"]:
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(1.5, 2.5)))
  pixels = np.asarray(img, dtype=np.float32)
  pixels += rng.normal(0.0, rng.uniform(0.0, 8.0), pixels.shape)
  return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _draw_mouth(draw, rng, shape, attrs, cx, my, a, b, lip, lip_t):
  """Draws the mouth `shape` centred at (cx, my)."""
  mw = 0.3 * a * rng.uniform(0.9, 1.1)
  curve = 0.13 * b * rng.uniform(0.85, 1.15)
  inside = (70, 15, 20)
  if shape == "smile":
    if attrs["Mouth_Slightly_Open"]:
      upper = _curve(cx - mw, cx + mw, lambda u: my + 0.25 * curve * (1 - u * u))
      lower = _curve(cx - mw, cx + mw, lambda u: my + curve * (1 - u * u))
      draw.polygon(upper + lower[::-1], fill=inside, outline=lip)
    else:
      draw.line(_curve(cx - mw, cx + mw, lambda u: my + curve * (1 - u * u)),
                fill=lip, width=lip_t, joint="curve")
  elif shape == "frown":
    draw.line(_curve(cx - mw, cx + mw,
                     lambda u: my + curve * (0.4 - (1 - u * u))),
              fill=lip, width=lip_t, joint="curve")
  elif shape == "round":
    draw.ellipse(_ellipse(cx, my + 0.05 * b, 0.14 * a, 0.17 * b), fill=inside,
                 outline=lip, width=lip_t)
  elif shape == "stretched":
    draw.rounded_rectangle(_ellipse(cx, my, mw * 1.15, 0.075 * b),
                           radius=0.05 * b, fill=inside, outline=lip,
                           width=lip_t)
    draw.line([(cx - mw, my - 0.02 * b), (cx + mw, my - 0.02 * b)],
              fill=(245, 245, 245), width=max(1, lip_t // 2))
  elif shape == "clenched":  # Bared, clenched teeth.
    box = _ellipse(cx, my, 0.75 * mw, 0.07 * b)
    draw.rounded_rectangle(box, radius=0.03 * b, fill=(245, 245, 235),
                           outline=lip, width=lip_t)
    draw.line([(box[0], my), (box[2], my)], fill=(90, 80, 80),
              width=max(1, lip_t // 2))
  elif shape == "smirk":  # Closed; one corner pulled up and back.
    side = rng.choice([-1, 1])
    draw.line(_curve(cx - mw, cx + mw, lambda u: my - 0.9 * curve * max(0.0, side * u) ** 2),
              fill=lip, width=lip_t, joint="curve")
  elif shape == "sneer":  # One corner pulled up, lip raised off the teeth.
    side = rng.choice([-1, 1])
    lift = lambda u: my - 1.3 * curve * max(0.0, side * u) ** 1.5
    upper = _curve(cx - mw, cx + mw, lambda u: lift(u) - 0.04 * b)
    lower = _curve(cx - mw, cx + mw, lambda u: my + 0.03 * b)
    draw.polygon(upper + lower[::-1], fill=inside, outline=lip)
    draw.line(upper, fill=lip, width=lip_t, joint="curve")
  elif attrs["Mouth_Slightly_Open"]:  # 'flat', ajar.
    draw.ellipse(_ellipse(cx, my, 0.7 * mw, 0.06 * b), fill=inside,
                 outline=lip, width=max(1, lip_t // 2))
  else:  # 'flat', closed.
    draw.line([(cx - mw, my), (cx + mw, my)], fill=lip, width=lip_t)


# -------------------------------------------------------------------- layouts
def _rng(seed: int, split: str, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, _SPLIT_IDS[split], index])


def _balanced_labels(seed: int, split: str, n: int) -> np.ndarray:
  """0-based expression labels, each class n/7 times (±1), in random order."""
  rng = np.random.default_rng([seed, _SPLIT_IDS[split], 2**31])
  return rng.permutation(np.arange(n) % len(EXPRESSIONS))


def _render_rafdb(job):
  path, seed, split, index, label, size = job
  rng = _rng(seed, split, index)
  img = _draw_face(rng, size, size, EXPRESSIONS[label], _rafdb_nuisance(rng),
                   centre_y=0.5)
  img.save(path, quality=92)


def _render_celeba(job):
  path, seed, split, index, width, height = job
  rng = _rng(seed, split, index)
  attrs = sample_attributes(rng)
  expression = "Happiness" if attrs["Smiling"] else "Neutral"
  img = _draw_face(rng, width, height, expression, attrs, centre_y=0.52)
  img.save(path, quality=92)
  return [attrs[name] for name in ATTRIBUTES]


def _render_affectnet(job):
  path, seed, split, index, code, size = job
  rng = _rng(seed, split, index)
  if code == _AFFECTNET_NO_FACE:
    img = _background(rng, size, size)
  else:
    # None (8) and Uncertain (9): a face whose expression is none of the eight.
    expression = AFFECTNET_EXPRESSIONS[code] if code < len(AFFECTNET_EXPRESSIONS) else str(rng.choice(EXPRESSIONS))
    img = _draw_face(rng, size, size, expression, _rafdb_nuisance(rng), centre_y=0.5)
  img.save(path, quality=92)


def _run(render: Callable, jobs: Sequence, workers: int) -> list:
  if workers <= 1 or len(jobs) < 64:
    return [render(job) for job in jobs]
  # Spawned, not forked: the caller may have started JAX's threads.
  with concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context("spawn")) as pool:
    return list(pool.map(render, jobs, chunksize=32))


def make_synthetic_rafdb(out_dir: str | os.PathLike, num_train: int = 3500,
                         num_test: int = 700, seed: int = 0, size: int = 100,
                         workers: int | None = None) -> pathlib.Path:
  """Writes a synthetic RAF-DB (basic) tree in the owners' layout.

  Writes ``basic/EmoLabel/list_patition_label.txt`` (train lines first, then
  test, labels 1-7, no trailing newline) and
  ``basic/Image/aligned/<name>_aligned.jpg``.

  Args:
    out_dir: the dataset root; created if missing.
    num_train: train images (names ``train_00001`` ...; at most 99,999).
    num_test: test images (names ``test_0001`` ...; at most 9,999).
    seed: the same seed writes the same bytes.
    size: side of the square aligned faces (100 in the real set).
    workers: processes; defaults to the CPU count. Does not change the output.

  Returns:
    The root, as a path.
  """
  if not (0 < num_train <= 99_999 and 0 < num_test <= 9_999):
    raise ValueError(f"RAF-DB names allow 1..99999 train and 1..9999 test "
                     f"images, got {num_train=} and {num_test=}.")
  root = pathlib.Path(out_dir)
  image_dir = root / "basic" / "Image" / "aligned"
  image_dir.mkdir(parents=True, exist_ok=True)
  jobs, lines = [], []
  for split, count, digits in (("train", num_train, 5), ("test", num_test, 4)):
    for i, label in enumerate(_balanced_labels(seed, split, count)):
      name = f"{split}_{i + 1:0{digits}d}"
      lines.append(f"{name}.jpg {label + 1}")
      jobs.append((str(image_dir / f"{name}_aligned.jpg"), seed, split, i,
                   int(label), size))
  _run(_render_rafdb, jobs, workers or os.cpu_count() or 1)
  label_file = root / "basic" / "EmoLabel" / "list_patition_label.txt"
  label_file.parent.mkdir(parents=True, exist_ok=True)
  label_file.write_text("\n".join(lines))  # The owners' file ends without \n.
  return root


def make_synthetic_celeba(out_dir: str | os.PathLike, num_train: int = 2000,
                          num_val: int = 300, num_test: int = 300,
                          seed: int = 0, size: tuple[int, int] = (178, 218),
                          workers: int | None = None) -> pathlib.Path:
  """Writes a synthetic CelebA tree in the owners' layout.

  Writes ``Anno/list_attr_celeba.txt`` (count line, the 40 names, then rows of
  1/-1 padded with the owners' variable spacing), ``Eval/
  list_eval_partition.txt`` (0 train, 1 validation, 2 test) and
  ``Img/img_align_celeba/000001.jpg`` ... (train, then validation, then test).

  Args:
    out_dir: the dataset root; created if missing.
    num_train: training images.
    num_val: validation images.
    num_test: test images.
    seed: the same seed writes the same bytes.
    size: (width, height); the real aligned images are 178 x 218.
    workers: processes; defaults to the CPU count. Does not change the output.

  Returns:
    The root, as a path.
  """
  root = pathlib.Path(out_dir)
  image_dir = root / "Img" / "img_align_celeba"
  image_dir.mkdir(parents=True, exist_ok=True)
  jobs, partition = [], []
  for code, (split, count) in enumerate((("train", num_train),
                                          ("validation", num_val),
                                          ("test", num_test))):
    for i in range(count):
      name = f"{len(jobs) + 1:06d}.jpg"
      partition.append(f"{name} {code}")
      jobs.append((str(image_dir / name), seed, split, i, *size))
  rows = _run(_render_celeba, jobs, workers or os.cpu_count() or 1)
  # Like the owners' file: each value right-aligned in two characters.
  lines = [str(len(jobs)), " ".join(ATTRIBUTES)]
  lines += [f"{job[0].rsplit(os.sep, 1)[-1]} " +
            " ".join(f"{1 if v else -1:2d}" for v in row)
            for job, row in zip(jobs, rows)]
  (root / "Anno").mkdir(exist_ok=True)
  (root / "Anno" / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
  (root / "Eval").mkdir(exist_ok=True)
  (root / "Eval" / "list_eval_partition.txt").write_text(
      "\n".join(partition) + "\n")
  return root


def make_synthetic_affectnet(out_dir: str | os.PathLike, num_train: int = 2400,
                             num_val: int = 400, seed: int = 0, size: int = 128,
                             workers: int | None = None) -> pathlib.Path:
  """Writes a synthetic AffectNet (manually annotated part) in the owners' CSV release.

  Writes ``Manually_Annotated_file_lists/{training,validation}.csv`` (the
  owners' header and columns) and ``Manually_Annotated_Images/<k>/<sha1>.jpg``
  (some ``.JPG`` and ``.png``, as in the real set). Codes 0-7 are drawn
  evenly; about one image in 25 carries code 8 (None), 9 (Uncertain) or 10
  (No-Face, a background without a face), which the 7- and 8-class
  protocols leave out. The face box is the image's central 80 %; the 68
  landmarks are points on the box's inscribed ellipse (the loader reads
  neither unless asked for the box).

  Args:
    out_dir: the dataset root; created if missing.
    num_train: rows of training.csv.
    num_val: rows of validation.csv.
    seed: the same seed writes the same bytes.
    size: side of the square images.
    workers: processes; defaults to the CPU count. Does not change the output.

  Returns:
    The root, as a path.
  """
  root = pathlib.Path(out_dir)
  lists = root / "Manually_Annotated_file_lists"
  lists.mkdir(parents=True, exist_ok=True)
  margin = round(0.1 * size)
  box = (margin, margin, size - 2 * margin, size - 2 * margin)
  angles = np.linspace(0, 2 * np.pi, 68, endpoint=False)
  landmarks = ";".join(f"{v:.2f}" for a in angles for v in (
      box[0] + box[2] / 2 * (1 + np.cos(a)), box[1] + box[3] / 2 * (1 + np.sin(a))))
  jobs = []
  for split, count, csv_name in (("train", num_train, "training.csv"), ("validation", num_val, "validation.csv")):
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], 2**31])
    codes = rng.permutation(np.arange(count) % len(AFFECTNET_EXPRESSIONS))
    excluded = rng.random(count) < 0.04
    codes[excluded] = rng.integers(len(AFFECTNET_EXPRESSIONS), _AFFECTNET_NO_FACE + 1, int(excluded.sum()))
    rows = [",".join(CSV_HEADER)]
    for i, code in enumerate(codes):
      digest = hashlib.sha1(f"{seed}/{split}/{i}".encode()).hexdigest()
      extension = ".png" if i % 50 == 49 else ".JPG" if i % 37 == 36 else ".jpg"
      relative = f"{i // 500 + 1}/{digest}{extension}"
      (root / "Manually_Annotated_Images" / relative).parent.mkdir(parents=True, exist_ok=True)
      jobs.append((str(root / "Manually_Annotated_Images" / relative), seed, split, i, int(code), size))
      valence, arousal = ((-2, -2) if code >= 9 else np.round(rng.uniform(-1, 1, 2), 6))
      rows.append(f"{relative},{','.join(map(str, box))},{landmarks},{code},{valence},{arousal}")
    (lists / csv_name).write_text("\n".join(rows) + "\n")
  _run(_render_affectnet, jobs, workers or os.cpu_count() or 1)
  return root


def ensure_synthetic_rafdb(cache_dir: str | os.PathLike, num_train: int = 3500,
                           num_test: int = 700, seed: int = 0,
                           size: int = 100) -> pathlib.Path:
  """Returns a synthetic RAF-DB root under `cache_dir`, creating it once.

  Written through `write_once`: never half-written, shared by concurrent callers.

  Args:
    cache_dir: where cached synthetic sets live.
    num_train: see `make_synthetic_rafdb`.
    num_test: see `make_synthetic_rafdb`.
    seed: see `make_synthetic_rafdb`.
    size: see `make_synthetic_rafdb`.

  Returns:
    The dataset root (pass it to ``create_source('rafdb', root, split)``).
  """
  # The drawing's version is in the name: a cache written by older code is
  # never mistaken for the current set.
  root = pathlib.Path(cache_dir) / f"rafdb_synth_v{SYNTH_VERSION}_{num_train}_{num_test}_seed{seed}_{size}px"
  return write_once(root, lambda tmp: make_synthetic_rafdb(tmp, num_train, num_test, seed, size))


def write_once(root: str | os.PathLike, make: Callable[[pathlib.Path], object]) -> pathlib.Path:
  """`root`, written by `make(folder)` unless it exists.

  `make` writes into a temporary folder beside `root`, renamed into place
  when complete: an interrupted call never leaves a half-written dataset
  behind, and concurrent callers end up sharing one complete copy.
  """
  root = pathlib.Path(root)
  if root.is_dir():
    return root
  root.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=".tmp_", dir=root.parent))
  try:
    make(tmp)
    os.rename(tmp, root)  # Atomic; fails if another caller finished first.
  except OSError:
    if not root.is_dir():
      raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return root


def main(argv: list[str]) -> int:
  """``python -m faer_jax.data synth ...``; returns the exit status."""
  parser = argparse.ArgumentParser(
      prog="python -m faer_jax.data synth",
      description='Write a synthetic face set in the owners\' layout.')
  parser.add_argument("--layout", choices=("rafdb", "affectnet", "celeba"), required=True)
  parser.add_argument("--out", required=True, help="dataset root to write")
  parser.add_argument("--num-train", type=int)
  parser.add_argument("--num-val", type=int,
                      help="celeba (default 300) and affectnet (default 400); rafdb has no validation split")
  parser.add_argument("--num-test", type=int)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--size", type=int,
                      help="rafdb: side (default 100); affectnet: side (default 128); "
                      "celeba: width (default 178), height keeps the 178:218 ratio")
  parser.add_argument("--workers", type=int, default=None,
                      help="processes (default: CPU count)")
  args = parser.parse_args(argv)
  if args.layout == "rafdb":
    root = make_synthetic_rafdb(args.out, args.num_train or 3500,
                                args.num_test or 700, args.seed,
                                args.size or 100, args.workers)
  elif args.layout == "affectnet":
    root = make_synthetic_affectnet(args.out, args.num_train or 2400,
                                    400 if args.num_val is None else args.num_val, args.seed,
                                    args.size or 128, args.workers)
  else:
    width = args.size or 178
    root = make_synthetic_celeba(args.out, args.num_train or 2000,
                                 300 if args.num_val is None else args.num_val, args.num_test or 300, args.seed,
                                 (width, round(width * 218 / 178)),
                                 args.workers)
  print(f"wrote a synthetic {args.layout} set to {root}")
  return 0
