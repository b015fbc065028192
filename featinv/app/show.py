"""What the panels share, without the web page: pictures for the page, the classifier's read-back, captions,
top-5 tables and the region a panel edits.

Tensors in, PIL images, strings and pandas tables out; user mistakes raise a one-line ``ValueError``.
"""
from __future__ import annotations

import pandas as pd
import torch
from PIL import Image

from featinv.analysis import common, steering
from featinv.app.session import Session
from featinv.metrics import read_back

TOP_K = 5
KEY = "featinv-app"  # every request seeds its noise from this key: reruns give the same pixels
DISPLAY_PX = 160     # small images are shown enlarged (nearest) to at least this many pixels
NBSP = "\u00a0"      # captions wrap between their parts, never inside "91 %" or "cos 0.927"
STRIP = 5            # tiles per steering strip: strengths 0, s/4, ..., s
MAX_STRENGTH = 4.0   # |strength| of a steering strip, in units of the map's mean feature norm
REGIONS = ("whole map", "box", "cell")


def no_progress(fraction: float, desc: str = "") -> None:
    """``progress(fraction, desc)`` where nobody watches (the page passes Gradio's progress bar)."""


def display_factor(width: int) -> int:
    """The integer factor :func:`tile` enlarges an image ``width`` pixels wide by (1 from DISPLAY_PX up)."""
    return max(1, -(-DISPLAY_PX // width))


def tile(image01: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> PIL image, enlarged by an integer factor (nearest) when smaller than DISPLAY_PX."""
    return common.tile(image01, size=image01.shape[-1] * display_factor(image01.shape[-1]))


@torch.no_grad()
def classify(session: Session, images01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """images (N, 3, H, W) in [0, 1] -> (feature maps (N, C, h, w), class probabilities (N, classes)).

    Reconstructions come at the model's output size; they are resized (antialiased) to the
    backbone's input size, as ``featinv evaluate`` does."""
    feats, logits = read_back(session.extractor, images01)
    return feats, logits.softmax(dim=-1)


def label(session: Session, probs: torch.Tensor) -> str:
    """(classes,) probabilities -> "name (p %)" of the top-1 class (a no-break space before the %)."""
    p, i = probs.max(dim=-1)
    return f"{session.class_names[int(i)]} ({100 * float(p):.0f}{NBSP}%)"


def topk_table(session: Session, probs: torch.Tensor, columns: list[str]) -> pd.DataFrame:
    """probs (N, classes) -> a table with one row per rank (top-5) and one column per image."""
    k = min(TOP_K, probs.shape[-1])
    values, indices = probs.topk(k, dim=-1)
    data = {"rank": [str(r + 1) for r in range(k)]}
    for n, column in enumerate(columns):
        data[column] = [f"{session.class_names[int(i)]} ({100 * float(v):.1f} %)"
                        for v, i in zip(values[n], indices[n])]
    return pd.DataFrame(data)


def _numbers(text: str, n: int, what: str) -> list[float]:
    try:
        values = [float(v) for v in str(text).replace(",", " ").split()]
    except ValueError:
        values = []
    if len(values) != n:
        raise ValueError(f"{what}: expected {n} numbers, got {text!r}")
    return values


def region_mask(session: Session, region: str, coords: str) -> torch.Tensor | None:
    """The region a panel edits -> (h, w) cell weights in [0, 1], or None for the whole map.

    box: "x0, y0, x1, y1" in pixels of the S x S input; cell: "row, col" of the feature grid."""
    _, h, w = session.extractor.feature_shape
    size = session.image_size
    if region == "whole map":
        return None
    if region == "box":
        return steering.box_mask(_numbers(coords, 4, "box x0, y0, x1, y1"), size, (h, w))
    if region == "cell":
        row, col = (int(v) for v in _numbers(coords, 2, "cell row, col"))
        if not (0 <= row < h and 0 <= col < w):
            raise ValueError(f"cell ({row}, {col}) is outside the {h}x{w} feature grid (rows 0..{h - 1}, cols 0..{w - 1})")
        # A cell is the box that covers exactly that cell of the grid.
        box = (col * size / w, row * size / h, (col + 1) * size / w, (row + 1) * size / h)
        return steering.box_mask(box, size, (h, w))
    raise ValueError(f"region {region!r}: choose one of {', '.join(REGIONS)}")
