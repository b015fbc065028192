"""Image grids, heat maps and atomic PNG writing, shared by training logs, evaluation and the demo."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from featinv.io import atomic_save


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(..., 3 or 1, H, W) floats in [0, 1] -> (..., H, W, 3) uint8 (the reference's rounding: clip, floor)."""
    x = images.detach().float().cpu().clamp(0, 1)
    if x.shape[-3] == 1:
        x = x.expand(*x.shape[:-3], 3, *x.shape[-2:])
    return (x * 255.0).to(torch.uint8).movedim(-3, -1).numpy()


def heatmap(values: torch.Tensor, vmax: float | None = None) -> torch.Tensor:
    """(H, W) non-negative values -> (3, H, W) "hot" colour map in [0, 1]: black -> red -> yellow -> white.

    ``vmax`` maps to white (default: the map's own max; 0 or less leaves the map black)."""
    vmax = values.max().item() if vmax is None else vmax
    u = values.float() / vmax if vmax > 0 else torch.zeros_like(values, dtype=torch.float32)
    return torch.stack([(3 * u).clamp(0, 1), (3 * u - 1).clamp(0, 1), (3 * u - 2).clamp(0, 1)])


def image_grid(images: torch.Tensor, pad: int = 2, size: int | None = None) -> Image.Image:
    """(rows, cols, C, H, W) in [0, 1] -> one PIL image; ``size`` resizes each tile (nearest)."""
    rows, cols = images.shape[:2]
    tiles = images.flatten(0, 1).float()
    if size is not None:
        tiles = F.interpolate(tiles, size=(size, size), mode="nearest")
    if tiles.shape[1] == 1:
        tiles = tiles.expand(-1, 3, -1, -1)
    h, w = tiles.shape[-2:]
    canvas = torch.ones(3, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        canvas[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = tile
    return Image.fromarray(to_uint8(canvas))


def save_png(image: Image.Image | torch.Tensor, path: str | Path) -> Path:
    """Write a PIL image or a (3, H, W) [0, 1] tensor as PNG, atomically."""
    if isinstance(image, torch.Tensor):
        image = Image.fromarray(to_uint8(image))
    return atomic_save(lambda tmp: image.save(tmp, format="PNG"), path)
