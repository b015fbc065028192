"""Image manipulations and before/after folder pairs: what ``featinv maps`` learns to follow in feature space
(the feature map of an image -> the feature map of the same image manipulated).

The manipulations are one function each, named with a one-line help in ``featinv.registry.MANIPULATIONS``
(adding one is a function here plus an entry there, its default in ``featinv.config.MANIPULATION_DEFAULTS`` and its
range in ``featinv.analysis.specs.MANIPULATION_RANGES``). Each is built on torchvision's v2 functional transforms
and draws its random parameters (jitter factors, box positions) from the CPU generator it is given, so a seed fixes
the result. Pairs edited elsewhere (an editing tool, a filter) come from two folders, matched by file name.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from featinv import registry
from featinv.analysis.specs import parse_manipulation
from featinv.data import IMAGE_EXTENSIONS, crop_transform

MANIPULATIONS = tuple(registry.MANIPULATIONS)  # the names, in order
# What fills the corners a rotation or shift uncovers, and the occluding box: mid-grey has no colour or edge of
# its own, so the feature map sees the missing content rather than a black frame.
GREY = 0.5


def hflip(x: Tensor, value: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """x (B, 3, H, W) mirrored left-right (the value is ignored; the spec only takes 1)."""
    return TF.hflip(x)


def rotate(x: Tensor, degrees: float, generator: torch.Generator | None = None) -> Tensor:
    """x (B, 3, H, W) rotated about its centre by ``degrees``, counter-clockwise; the uncovered corners grey."""
    return TF.rotate(x, degrees, interpolation=InterpolationMode.BILINEAR, fill=[GREY] * 3)


def translate(x: Tensor, fraction: float, generator: torch.Generator | None = None) -> Tensor:
    """x (B, 3, H, W) shifted right and down by ``fraction`` of its width and height; the uncovered part grey."""
    h, w = x.shape[-2:]
    # Whole pixels and nearest sampling: the content moves unchanged, with no resampling blur to learn as well.
    shift = [round(fraction * w), round(fraction * h)]
    return TF.affine(x, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0],
                     interpolation=InterpolationMode.NEAREST, fill=[GREY] * 3)


def crop(x: Tensor, fraction: float, generator: torch.Generator | None = None) -> Tensor:
    """x (B, 3, H, W) -> its central ``fraction`` of each side, resized back to (H, W) (a zoom in)."""
    h, w = x.shape[-2:]
    ch, cw = max(1, round(fraction * h)), max(1, round(fraction * w))
    return TF.resized_crop(x, (h - ch) // 2, (w - cw) // 2, ch, cw, [h, w], antialias=True)


def blur(x: Tensor, sigma: float, generator: torch.Generator | None = None) -> Tensor:
    """x (B, 3, H, W) blurred by a Gaussian of std ``sigma`` pixels per 64 px of side (at least 1x), as perturb's."""
    if sigma == 0:
        return x.clone()
    side = min(x.shape[-2:])
    sigma_px = sigma * max(1.0, side / 64)
    # Three stds each way, but torchvision pads by reflection, which cannot reach past the image's far edge.
    kernel = min(2 * math.ceil(3 * sigma_px) + 1, 2 * side - 1)
    return TF.gaussian_blur(x, [kernel, kernel], [sigma_px, sigma_px])


def grayscale(x: Tensor, strength: float, generator: torch.Generator | None = None) -> Tensor:
    """x (B, 3, H, W) moved ``strength`` of the way to its grey levels (1: grey, the same value in all 3 channels)."""
    # lerp is exact at weight 1, so full strength gives three equal channels.
    return x.lerp(TF.rgb_to_grayscale(x, num_output_channels=3), strength)


def jitter(x: Tensor, v: float, generator: torch.Generator | None = None) -> Tensor:
    """x (B, 3, H, W) with brightness, contrast and saturation factors drawn per image in [1-v, 1+v] and a hue
    shift in [-v/4, v/4] turn, applied in that order."""
    # A fixed order (torchvision's ColorJitter shuffles it) so that the generator alone decides the result.
    draws = (torch.rand((len(x), 4), generator=generator, dtype=torch.float64) * 2 - 1).tolist()
    out = []
    for image, (brightness, contrast, saturation, hue) in zip(x, draws):
        image = TF.adjust_brightness(image, 1 + v * brightness)
        image = TF.adjust_contrast(image, 1 + v * contrast)
        image = TF.adjust_saturation(image, 1 + v * saturation)
        out.append(TF.adjust_hue(image, v * hue / 4))
    return torch.stack(out) if out else x.clone()


def invert(x: Tensor, strength: float, generator: torch.Generator | None = None) -> Tensor:
    """x (B, 3, H, W) moved ``strength`` of the way to its negative 1 - x (1: fully inverted)."""
    return x.lerp(TF.invert(x), strength)


def occlude(x: Tensor, fraction: float, generator: torch.Generator | None = None) -> Tensor:
    """x (B, 3, H, W) with a grey box of ``fraction`` of each side, at a place drawn per image (inside it)."""
    h, w = x.shape[-2:]
    bh, bw = max(1, round(fraction * h)), max(1, round(fraction * w))
    tops = torch.randint(0, h - bh + 1, (len(x),), generator=generator).tolist()
    lefts = torch.randint(0, w - bw + 1, (len(x),), generator=generator).tolist()
    grey = torch.tensor(GREY, dtype=x.dtype, device=x.device)
    out = [TF.erase(image, i, j, bh, bw, grey) for image, i, j in zip(x, tops, lefts)]
    return torch.stack(out) if out else x.clone()


def manipulate(images01: Tensor, spec: str, seed: int = 0) -> Tensor:
    """images01 (B, 3, H, W) in [0, 1] -> the manipulation ``spec`` (``rotate``, ``rotate:45``) of them, same shape,
    dtype and device, in [0, 1]; random parameters drawn from a CPU generator seeded with ``seed``."""
    name, value = parse_manipulation(spec)
    if images01.ndim != 4 or images01.shape[1] != 3:
        raise ValueError(f"manipulation {spec!r}: images must be (B, 3, H, W) in [0, 1], "
                         f"got shape {tuple(images01.shape)}")
    fn = registry.MANIPULATIONS[name].load()
    out = fn(images01.float(), value, torch.Generator().manual_seed(seed))
    return out.clamp(0, 1).to(images01.dtype)


# ----- before/after folders ---------------------------------------------------------------------------

def _images_by_stem(folder: Path) -> dict[str, Path]:
    """The image files directly in ``folder`` by stem; ValueError naming the folder or two files of one stem."""
    if not folder.is_dir():
        raise ValueError(f"image folder {str(folder)!r} " + ("is a file" if folder.exists() else "not found"))
    files: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
            if f.stem in files:
                raise ValueError(f"{str(files[f.stem])!r} and {str(f)!r} share the name {f.stem!r}, "
                                 "so a partner cannot be told apart")
            files[f.stem] = f
    return files


def _read(f: Path) -> Image.Image:
    """The RGB image of ``f``, fully decoded; ValueError naming the file when it cannot be read."""
    try:
        with Image.open(f) as im:
            return im.convert("RGB")  # forces a full decode, so a truncated file fails here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"unreadable image {str(f)!r}: {type(e).__name__}: {' '.join(str(e).split())}") from None


def match_folder_pairs(before: str | Path, after: str | Path) -> list[tuple[str, Path, Path]]:
    """Two folders of images paired by file name (stem) -> [(stem, before file, after file)], sorted; nothing is
    read. An image without a partner is skipped with a warning naming it; ValueError naming the folder when one is
    missing or no pair is left."""
    before, after = Path(before), Path(after)
    ours, theirs = _images_by_stem(before), _images_by_stem(after)
    for files, other in ((ours, after), (theirs, before)):
        for stem in sorted(files.keys() - (ours.keys() & theirs.keys())):
            warnings.warn(f"skipping {str(files[stem])!r}: no image named {stem!r} in {str(other)!r}", stacklevel=2)
    stems = sorted(ours.keys() & theirs.keys())
    if not stems:
        raise ValueError(f"no image pairs (images of the same name) in {str(before)!r} and {str(after)!r}")
    return [(stem, ours[stem], theirs[stem]) for stem in stems]


def read_folder_pairs(pairs: list[tuple[str, Path, Path]], size: int) -> tuple[Tensor, Tensor, list[str]]:
    """Pairs from :func:`match_folder_pairs` -> (before (N, 3, size, size), after (N, 3, size, size), both in
    [0, 1], the stems). Each image is resized (shorter side) and centre-cropped to ``size``, as in evaluation.
    ValueError naming the file: unreadable, or a pair of different pixel sizes (an edit that resized or cropped
    the image, so that its two crops no longer show the same places)."""
    transform = crop_transform(size, train=False)
    xs, ys = [], []
    for _, fa, fb in pairs:
        a, b = _read(fa), _read(fb)
        if a.size != b.size:
            raise ValueError(f"{str(fa)!r} is {a.width}x{a.height} px but {str(fb)!r} is "
                             f"{b.width}x{b.height} px: a pair must keep its size, or the crops do not align")
        xs.append(_to_tensor(transform(a)))
        ys.append(_to_tensor(transform(b)))
    return torch.stack(xs), torch.stack(ys), [stem for stem, _, _ in pairs]


def load_folder_pairs(before: str | Path, after: str | Path, size: int) -> tuple[Tensor, Tensor, list[str]]:
    """:func:`match_folder_pairs` then :func:`read_folder_pairs`: two folders paired by file name -> (before, after,
    stems)."""
    return read_folder_pairs(match_folder_pairs(before, after), size)


def _to_tensor(pil: Image.Image) -> Tensor:
    """PIL RGB (W, H) -> (3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1)
