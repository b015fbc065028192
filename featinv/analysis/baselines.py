"""Baselines that invert a classifier's features without training a model: pixel optimisation.

Pixel optimisation is Mahendran & Vedaldi 2015 ("Understanding Deep Image Representations by
Inverting Them", arXiv 1412.0035): find the image whose features match the target under a
total-variation image prior. The other training-free baseline, guiding a frozen diffusion model with
the classifier's gradient, is a sampler option (:func:`featinv.diffusion.guidance.feature_guided_eps_fn`, used
through ``Reconstructor(..., guidance=...)``). ``benchmarks/bench_baselines.py`` compares both with
FeatInv's spatial and pooled conditioning.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from featinv.diffusion.guidance import relative_feature_distance


@dataclass(frozen=True)
class PixelInversionConfig:
    """Settings of :func:`pixel_inversion` (Adam on the pixels, projected onto [0, 1] after each step)."""

    steps: int = 200          # Adam steps (one classifier forward + backward each)
    lr: float = 0.05          # Adam learning rate, in units of the [0, 1] pixel range
    tv_weight: float = 0.05   # λ_TV of the total-variation prior
    tv_beta: float = 2.0      # β of the prior (2: squared neighbour differences; 1: plain TV)
    init_std: float = 0.1     # the start: grey 0.5 plus Gaussian noise of this std (seeded)

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"PixelInversionConfig.steps must be >= 1, got {self.steps}")
        for name, positive in (("lr", True), ("tv_beta", True), ("tv_weight", False), ("init_std", False)):
            value = getattr(self, name)
            if not 0 <= value < float("inf") or (positive and value == 0):  # also refuses NaN
                raise ValueError(f"PixelInversionConfig.{name} must be a finite number {'>' if positive else '>='} 0, "
                                 f"got {value!r}")


def total_variation(images: Tensor, beta: float = 2.0) -> Tensor:
    """images (B, C, H, W) -> (B,) mean over pixels of ((x[i+1,j]-x[i,j])² + (x[i,j+1]-x[i,j])²)^(β/2)
    (Mahendran & Vedaldi 2015, Sec. 2: the V^β regulariser; differences on the (H-1)×(W-1) interior)."""
    dy = images[:, :, 1:, :-1] - images[:, :, :-1, :-1]
    dx = images[:, :, :-1, 1:] - images[:, :, :-1, :-1]
    sq = dy.square() + dx.square()
    # β = 2 needs no root; for β < 2 a small floor keeps the gradient of the root finite at 0
    per_pixel = sq if beta == 2 else (sq + 1e-8).pow(beta / 2)
    return per_pixel.flatten(1).mean(1)


def pixel_inversion(feature_fn: Callable[[Tensor], Tensor], target: Tensor, image_size: int,
                    cfg: PixelInversionConfig = PixelInversionConfig(),
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Adam on the pixels from noise: minimise ||φ(x) - φ*||² / ||φ*||² + λ_TV·R_TV^β(x) over x in [0, 1]
    (the distance: :func:`featinv.diffusion.guidance.relative_feature_distance`).

    feature_fn: images (B, 3, S, S) in [0, 1] -> features (B, ...) like ``target``, differentiable
    (e.g. a :class:`featinv.nets.backbone.FeatureExtractor`); target: (B, ...) feature maps to match;
    image_size: S. Rows are independent (their losses are summed). The noise comes from ``generator``
    (CPU; default: a fresh one seeded 0). Returns the images (B, 3, S, S) in [0, 1], detached, and the
    feature distance before each step, (steps, B) float32 on the CPU."""
    target = target.detach()
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    start = 0.5 + cfg.init_std * torch.randn(target.shape[0], 3, image_size, image_size, generator=g)
    x = start.clamp(0, 1).to(target.device).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr)
    history = []
    with torch.enable_grad():
        for _ in range(cfg.steps):
            feats = feature_fn(x)
            if not feats.requires_grad:
                raise ValueError("pixel_inversion: the feature function's output has no gradient with respect to "
                                 "the image (is it run under torch.no_grad() or detached?)")
            dist = relative_feature_distance(feats, target)
            loss = (dist + cfg.tv_weight * total_variation(x, cfg.tv_beta)).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                x.clamp_(0, 1)  # projected: the image stays a valid image
            history.append(dist.detach().cpu())
    return x.detach(), torch.stack(history)
