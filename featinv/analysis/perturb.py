"""Perturbed inputs: common corruptions and a PGD attack, to see what a model perceives in them
(paper: out-of-distribution, corrupted and adversarial inputs, reconstructed from their feature maps).

The corruptions are one function each, named with a one-line help in ``featinv.registry.CORRUPTIONS``
(adding one is a function here plus an entry there, and its SEVERITIES). Severities 1-3 follow the spirit of
ImageNet-C (Hendrycks & Dietterich 2019), scaled so that they are visible on 8x8 digits as well as on 224 px
photos; the values are in :data:`SEVERITIES`.
PGD is Madry et al. 2018: L∞ steps of ``step_size · sign(∇)``, projected onto the ε-ball and [0, 1].
"""
from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from featinv import registry

CORRUPTIONS = tuple(registry.CORRUPTIONS)  # the names, in order
SEVERITIES = {
    "gaussian_noise": (0.08, 0.16, 0.32),  # noise std (images in [0, 1])
    "blur": (0.5, 1.0, 1.5),               # Gaussian std in pixels per 64 px of image side (at least 1x)
    "jpeg": (30, 10, 3),                   # JPEG quality
    "contrast": (0.5, 0.3, 0.15),          # contrast factor around each image's mean
}


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    radius = max(1, math.ceil(3 * sigma))
    coords = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-coords.square() / (2 * sigma ** 2))
    k = k / k.sum()
    c = x.shape[1]
    pad = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)
    if pad < radius:  # tiny images: reflect padding cannot exceed the image, replicate the rest
        x = F.pad(x, (pad,) * 4, mode="reflect")
        x = F.pad(x, (radius - pad,) * 4, mode="replicate")
    else:
        x = F.pad(x, (radius,) * 4, mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def gaussian_noise(x: Tensor, std: float, generator: torch.Generator | None = None) -> Tensor:
    """x (B, 3, H, W) plus Gaussian noise of ``std``, drawn on the CPU from ``generator``."""
    noise = torch.randn(x.shape, generator=generator).to(x)
    return x + std * noise


def blur(x: Tensor, sigma: float, generator: torch.Generator | None = None) -> Tensor:
    """x (B, 3, H, W) blurred by a Gaussian of std ``sigma`` pixels per 64 px of image side (at least 1x)."""
    return _gaussian_blur(x, sigma * max(1.0, x.shape[-1] / 64))


def jpeg(x: Tensor, quality: float, generator: torch.Generator | None = None) -> Tensor:
    """x (B, 3, H, W) in [0, 1] through JPEG at ``quality`` (PIL, 8-bit RGB) and back."""
    out = []
    for img in x:
        array = (img.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        decoded = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255.0
        out.append(torch.from_numpy(decoded).permute(2, 0, 1))
    return torch.stack(out).to(x)


def contrast(x: Tensor, factor: float, generator: torch.Generator | None = None) -> Tensor:
    """x (B, 3, H, W) with its contrast scaled by ``factor`` around each image's mean."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * factor + mean


def corrupt(images01: Tensor, kind: str, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """images01: (B, 3, H, W) in [0, 1] -> corrupted copy, same shape, in [0, 1].

    kind: one of CORRUPTIONS; severity: 1, 2 or 3 (see SEVERITIES); generator: for the noise (CPU)."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; choose from {', '.join(CORRUPTIONS)}")
    if severity not in (1, 2, 3):
        raise ValueError(f"corruption severity must be 1, 2 or 3, got {severity!r}")
    if images01.ndim != 4 or images01.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W) in [0, 1], got shape {tuple(images01.shape)}")
    fn = registry.CORRUPTIONS[kind].load()
    out = fn(images01.float(), SEVERITIES[kind][severity - 1], generator)
    return out.clamp(0, 1).to(images01.dtype)


def default_step_size(eps: float, steps: int) -> float:
    """2.5·eps/steps: Madry et al.'s rule, so that the walk can reach the ball's surface and move along it."""
    return 2.5 * eps / max(steps, 1)


def pgd(extractor, images01: Tensor, labels: Tensor, eps: float, steps: int, step_size: float | None = None,
        target: Tensor | None = None) -> Tensor:
    """L∞ PGD on the extractor's classifier -> adversarial images (B, 3, S, S) in [0, 1], |x' − x|∞ <= eps.

    Untargeted (target None): ascend the cross-entropy of ``labels``. Targeted: descend the
    cross-entropy of ``target`` (B,) int. Starts at the clean image (no random start: deterministic).
    step_size None: :func:`default_step_size` (ε/8 at 20 steps)."""
    step_size = default_step_size(eps, steps) if step_size is None else step_size
    if eps < 0 or steps < 1 or step_size <= 0:
        raise ValueError(f"pgd: need eps >= 0, steps >= 1, step_size > 0; got {eps}, {steps}, {step_size}")
    clean = images01.detach().float()
    lo, hi = (clean - eps).clamp(0, 1), (clean + eps).clamp(0, 1)
    x = clean.clone()
    sign = 1.0 if target is None else -1.0
    y = labels if target is None else target
    with torch.enable_grad():
        for _ in range(steps):
            x.requires_grad_(True)
            loss = F.cross_entropy(extractor.classify(x), y.to(x.device))
            (grad,) = torch.autograd.grad(loss, x)
            x = x.detach() + sign * step_size * grad.sign()
            x = torch.maximum(torch.minimum(x, hi), lo)  # project: ε-ball ∩ [0, 1]
    return x.detach().to(images01.dtype)
