"""What the analyses share: input images, labelled tiles and grids, tables.

Pictures are built from tiles: each image is upscaled to ``TILE`` pixels (nearest neighbour for
images smaller than a tile, so 8x8 digits stay crisp) with its caption in a white band beneath,
drawn with PIL's default bitmap font (no font files needed).
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from featinv.data import IMAGE_EXTENSIONS, crop_transform
from featinv.diffusion.reconstruct import uncertainty
from featinv.io import atomic_write_text
from featinv.pair import Pair
from featinv.visualize import heatmap, save_png, to_uint8

TILE = 64          # tile side in pixels
LINE = 11          # caption line height of the default bitmap font
PAD = 3


# ----- inputs -----------------------------------------------------------------------------------

def _image_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise ValueError(f"no images ({' '.join(IMAGE_EXTENSIONS)}) in folder {str(path)!r}")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"image file or folder {str(path)!r} not found")
    return [path]


def load_images(paths: Sequence[str | Path], size: int) -> tuple[torch.Tensor, list[str]]:
    """Image files and/or folders (any size) -> ((N, 3, size, size) in [0, 1], names).

    Each image is resized (shorter side) and centre-cropped to the backbone's input, as in evaluation.
    An image that cannot be read (a broken file, a decompression bomb) is skipped with a warning naming
    it; ValueError naming it when no image is left."""
    crop = crop_transform(size, train=False)
    images, names, bad = [], [], []
    for p in paths:
        for f in _image_files(Path(p)):
            try:
                with Image.open(f) as im:
                    pil = crop(im.convert("RGB"))
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                bad.append(f"unreadable image {str(f)!r}: {type(e).__name__}: {' '.join(str(e).split())}")
                continue
            images.append(torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1))
            names.append(f.stem)
    if not images and bad:
        raise ValueError(bad[0] + (f" (and {len(bad) - 1} more unreadable)" if len(bad) > 1 else ""))
    for reason in bad:
        warnings.warn(f"skipping {reason}", stacklevel=2)
    return torch.stack(images), names


def demo_digits(data: dict, digits: Sequence[int] | None, count: int, split: str = "test"
                ) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Held-out digits: the first ``count`` of each class in ``digits`` (or the first ``count`` overall)
    -> ((N, 3, S, S) in [0, 1], names, labels (N,))."""
    x, y = data[f"x_{split}"], data[f"y_{split}"]
    if digits:
        bad = [d for d in digits if not 0 <= d <= 9]
        if bad:
            raise ValueError(f"digit classes must be 0..9, got {bad}")
        idx = torch.cat([(y == d).nonzero().flatten()[:count] for d in digits])
    else:
        idx = torch.arange(min(count, len(y)))
    names = [f"d{int(y[i])}_{split}{i}" for i in idx.tolist()]
    return x[idx].expand(-1, 3, -1, -1).clone(), names, y[idx].clone()


def digit_classes(spec: str) -> list[int]:
    """``digit3`` -> [3], ``digits3+5`` -> [3, 5]; ValueError naming ``spec`` otherwise."""
    body = spec[len("digits"):] if spec.startswith("digits") else spec[len("digit"):]
    try:
        classes = [int(c) for c in body.split("+")]
    except ValueError:
        classes = []
    if not spec.startswith("digit") or not classes or any(not 0 <= c <= 9 for c in classes):
        raise ValueError(f"{spec!r} is neither an image folder nor digit classes (digit3, digits3+5, rest)")
    return classes


def digit_set(data: dict, classes: Sequence[int], split: str = "train") -> torch.Tensor:
    """The demo's digits of ``classes`` from ``split`` -> (N, 3, S, S) in [0, 1]."""
    x, y = data[f"x_{split}"], data[f"y_{split}"]
    return x[torch.isin(y, torch.tensor(list(classes)))].expand(-1, 3, -1, -1).clone()


def image_set(spec: str, pair: Pair, exclude: str | None = None) -> tuple[torch.Tensor, str]:
    """A folder of images, or on the demo pair digit classes of the training split (``digit3``,
    ``digits3+5``; ``rest``: every digit not in ``exclude``) -> ((N, 3, S, S) in [0, 1], a description)."""
    if Path(spec).exists():
        images, _ = load_images([spec], pair.extractor.image_size)
        return images, spec
    if pair.data is None:
        raise FileNotFoundError(f"image folder {spec!r} not found")
    if spec == "rest":
        taken = set(digit_classes(exclude)) if exclude and not Path(exclude).exists() else set()
        classes = [c for c in range(10) if c not in taken]
    else:
        classes = digit_classes(spec)
    return digit_set(pair.data, classes), "digits " + "+".join(map(str, classes))


@torch.no_grad()
def features_of(extractor, images01: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Images (N, 3, S, S) in [0, 1] -> the extractor's feature maps (N, C, h, w), fp32, in chunks."""
    dev = extractor.mean.device
    return torch.cat([extractor(c.to(dev)).float() for c in images01.split(chunk)])


@torch.no_grad()
def predict(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (N, classes) -> (top-1 (N,), its probability (N,), all probabilities (N, classes))."""
    probs = logits.float().softmax(dim=1)
    p, top = probs.max(dim=1)
    return top, p, probs


# ----- pictures ------------------------------------------------------------------------------------

def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def tile(image: torch.Tensor, caption: Sequence[str] = (), size: int = TILE, lines: int | None = None) -> Image.Image:
    """(3, H, W) in [0, 1] -> PIL tile of ``size`` px with the caption's lines in a band beneath."""
    x = image.detach().float().cpu()[None]
    if x.shape[-2:] != (size, size):
        mode = "nearest" if x.shape[-1] < size else "bilinear"
        x = F.interpolate(x, size=(size, size), mode=mode, **({"antialias": True} if mode == "bilinear" else {}))
    x = x[0]
    lines = len(caption) if lines is None else lines
    canvas = Image.new("RGB", (size, size + lines * LINE + (2 if lines else 0)), "white")
    canvas.paste(Image.fromarray(to_uint8(x)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(caption):
        draw.text((1, size + 1 + i * LINE), text, fill="black", font=_font())
    return canvas


def heat_tiles(samples: torch.Tensor, captions: Sequence[Sequence[str]] | None = None,
               vmax: float | None = None) -> list[Image.Image]:
    """samples (N, K, 3, H, W) -> N heat-map tiles of the per-pixel std over K (shared scale, white = vmax)."""
    u = uncertainty(samples)
    vmax = u.max().item() if vmax is None else vmax
    captions = captions or [["spread (std)", f"white = {vmax:.2f}"]] * len(u)
    return [tile(heatmap(m, vmax=vmax), c) for m, c in zip(u, captions)]


def grid(rows: Sequence[Sequence[Image.Image | None]], title: Sequence[str] = (),
         row_labels: Sequence[str] | None = None) -> Image.Image:
    """Rows of tiles (None leaves a gap) -> one picture with a title band and optional row labels."""
    tw = max((t.width for r in rows for t in r if t is not None), default=TILE)
    heights = [max((t.height for t in r if t is not None), default=0) for r in rows]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = lambda lines: max((int(measure.textlength(s, font=_font())) for s in lines), default=0)  # noqa: E731
    label_w = text_w(row_labels) + 2 * PAD if row_labels else 0
    title_h = len(title) * LINE + (2 * PAD if title else 0)
    width = max(label_w + PAD + max(map(len, rows), default=0) * (tw + PAD), text_w(title) + 2 * PAD)
    canvas = Image.new("RGB", (width, title_h + sum(h + PAD for h in heights) + PAD), "white")
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(title):
        draw.text((PAD, PAD + i * LINE), text, fill="black", font=_font())
    y = title_h + PAD
    for r, (row, h) in enumerate(zip(rows, heights)):
        if row_labels:
            draw.text((PAD, y + TILE // 2 - LINE // 2), row_labels[r], fill="black", font=_font())
        for c, t in enumerate(row):
            if t is not None:
                canvas.paste(t, (label_w + PAD + c * (tw + PAD), y))
        y += h + PAD
    return canvas


# ----- tables --------------------------------------------------------------------------------------

def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """rows of dicts -> Markdown table; columns: (key, header); floats in [0, 1] keys ending 'share' as %."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for key, _ in columns:
            v = r.get(key)
            if v is None:
                cells.append("n/a")
            elif isinstance(v, float) and key.endswith("share"):
                cells.append(f"{100 * v:.1f} %")
            elif isinstance(v, float):
                cells.append(f"{v:.3f}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(out: str | Path, picture: Image.Image, picture_name: str, markdown: str, table: dict) -> dict:
    """Write ``<out>/<picture_name>``, ``table.md`` and ``table.json`` atomically -> their paths.

    table.json is strict JSON: a non-finite number (a statistic of nothing) is written as null."""
    out = Path(out)
    table = _finite(json.loads(json.dumps(table, default=_jsonable)))
    out.mkdir(parents=True, exist_ok=True)
    paths = {"picture": save_png(picture, out / picture_name),
             "markdown": atomic_write_text(markdown, out / "table.md"),
             "json": atomic_write_text(json.dumps(table, indent=2, default=_jsonable, allow_nan=False) + "\n", out / "table.json")}
    return {k: str(v) for k, v in paths.items()}


def _finite(v):
    """NaN / inf -> None, in nested lists and dicts (strict JSON has no such numbers)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if dataclasses.is_dataclass(v):
        return dataclasses.asdict(v)
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")
