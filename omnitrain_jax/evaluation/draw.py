"""Boxes and labels drawn on an image with PIL (predict's PNGs).

Line width and font size follow the image size, so labels stay readable on
a 4000 px photo and do not cover a 64 px ShapesWorld image; one color per
query.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

# Distinct, saturated colors (Tableau 10), cycled by query index.
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40),
           (148, 103, 189), (140, 86, 75), (227, 119, 194), (127, 127, 127),
           (188, 189, 34), (23, 190, 207))


def _font(size: int) -> ImageFont.ImageFont:
  try:
    return ImageFont.load_default(size=size)
  except (TypeError, OSError):  # Pillow < 10.1 or no FreeType.
    return ImageFont.load_default()


def draw_detections(image: np.ndarray | Image.Image,
                    detections: Sequence[Mapping[str, Any]],
                    min_side: int = 512) -> Image.Image:
  """Draws boxes with "label score" tags.

  Args:
    image: uint8 ``[H, W, 3]`` (or ``[H, W]``) array, or a PIL image.
    detections: dicts with ``box_xyxy`` (original pixels), ``score``,
      ``query`` (label text) and optionally ``query_index`` (color).
    min_side: an image whose longest side is below this is first enlarged
      by the smallest integer factor that reaches it (nearest neighbour, so
      pixels stay sharp), boxes with it: labels on a 128 px image would
      otherwise cover the objects. 0 keeps every image at its size.

  Returns:
    A new RGB PIL image: the input's size times that factor.
  """
  if isinstance(image, Image.Image):
    canvas = image.convert("RGB")
  else:
    canvas = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
  factor = 1
  if min_side and max(canvas.size) < min_side:
    factor = -(-min_side // max(canvas.size))  # ceil
    canvas = canvas.resize((canvas.width * factor, canvas.height * factor),
                           Image.NEAREST)
  w, h = canvas.size
  side = max(w, h)
  width = max(1, round(side / 300))
  font = _font(max(8, round(side / 40)))
  draw = ImageDraw.Draw(canvas)
  # Lowest score first so the best boxes end up on top.
  for det in sorted(detections, key=lambda d: d["score"]):
    color = PALETTE[int(det.get("query_index", 0)) % len(PALETTE)]
    x0, y0, x1, y1 = (float(v) * factor for v in det["box_xyxy"])
    draw.rectangle([x0, y0, max(x0, x1), max(y0, y1)], outline=color,
                   width=width)
    label = f"{det['query']} {det['score']:.2f}"
    tx0, ty0, tx1, ty1 = draw.textbbox((0, 0), label, font=font)
    tw, th = tx1 - tx0, ty1 - ty0
    # Above the box when there is room, else inside its top edge.
    ty = y0 - th - 2 if y0 - th - 2 >= 0 else y0
    tx = min(max(x0, 0), max(w - tw - 2, 0))
    draw.rectangle([tx, ty, tx + tw + 2, ty + th + 2], fill=color)
    draw.text((tx + 1 - tx0, ty + 1 - ty0), label, fill=(255, 255, 255),
              font=font)
  return canvas
