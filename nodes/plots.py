"""Small charts drawn with Pillow (ComfyUI ships it; matplotlib is not a ComfyUI dependency)."""

from typing import Dict, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

SIZE = (512, 320)
MARGIN = 40
COLOURS = [(66, 135, 245), (245, 130, 48), (60, 180, 75), (230, 25, 75), (145, 30, 180), (70, 240, 240)]


def to_image(picture: Image.Image) -> torch.Tensor:
    """A Pillow RGB picture -> IMAGE (1, H, W, 3) in [0, 1]."""
    return torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0)[None]


def line_chart(series: Sequence[Sequence[float]], title: str) -> torch.Tensor:
    """One line per series (e.g. the loss of each clip), sharing the y range."""
    picture, draw = _canvas(title)
    values = [v for s in series for v in s]
    if not values:
        draw.text((MARGIN, SIZE[1] // 2), "no data", fill=(0, 0, 0))
        return to_image(picture)
    low, high = min(values), max(values)
    high = high if high > low else low + 1.0
    w, h = SIZE[0] - 2 * MARGIN, SIZE[1] - 2 * MARGIN
    for index, s in enumerate(series):
        points = [(MARGIN + w * i / max(1, len(s) - 1), MARGIN + h * (1 - (v - low) / (high - low)))
                  for i, v in enumerate(s)]
        if len(points) > 1:
            draw.line(points, fill=COLOURS[index % len(COLOURS)], width=2)
        elif points:
            draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2],
                         fill=COLOURS[index % len(COLOURS)])
    draw.text((4, MARGIN - 12), f"{high:.4g}", fill=(0, 0, 0))
    draw.text((4, SIZE[1] - MARGIN), f"{low:.4g}", fill=(0, 0, 0))
    return to_image(picture)


def bar_chart(pairs: Dict[str, Sequence[Optional[float]]], title: str) -> torch.Tensor:
    """Grouped bars: name -> (value, reference) drawn side by side, each group scaled to its own max."""
    picture, draw = _canvas(title)
    names = list(pairs)
    slot = (SIZE[0] - 2 * MARGIN) / max(1, len(names))
    h = SIZE[1] - 2 * MARGIN
    for g, name in enumerate(names):
        values = [v for v in pairs[name] if v is not None]
        top = max([abs(v) for v in values] + [1e-12])
        for b, value in enumerate(pairs[name]):
            if value is None:
                continue
            x0 = MARGIN + g * slot + 4 + b * (slot - 8) / 2
            height = h * abs(value) / top
            draw.rectangle([x0, MARGIN + h - height, x0 + (slot - 8) / 2 - 2, MARGIN + h], fill=COLOURS[b])
        draw.text((MARGIN + g * slot + 2, SIZE[1] - MARGIN + 4), name[:12], fill=(0, 0, 0))
    return to_image(picture)


def _canvas(title: str):
    picture = Image.new("RGB", SIZE, (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    draw.text((MARGIN, 8), title, fill=(0, 0, 0))
    draw.rectangle([MARGIN, MARGIN, SIZE[0] - MARGIN, SIZE[1] - MARGIN], outline=(180, 180, 180))
    return picture, draw
