"""The FeatInv feature adapter: a classifier feature map -> a hint on the latent grid.

FeatInv (arXiv 2505.21032) hint adapter, as its reference checkpoint holds it: bilinear upsampling to the latent grid -> conv3x3 (C_f->512) ->
SiLU -> conv3x3 (512->512) -> SiLU -> zero-initialised conv3x3 (512->model_channels).
Keys ``block.1``, ``block.3``, ``block.5`` follow the reference checkpoint.
With ``AdapterConfig.pooled`` the map is first average-pooled over space and the vector copied to every
position (the paper's pooled-conditioning ablation, what RCDM-style models condition on): the
weights are the same, only what they see differs.
"""
from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from featinv.config import AdapterConfig


def to_nchw(feats: torch.Tensor, channels: int) -> torch.Tensor:
    """Bring a feature map to (B, C, h, w).

    Accepts NCHW, NHWC (channels last) and ViT tokens (B, 1+h*w, C) whose first (class) token
    is dropped and the rest read in row-major order. Raises ValueError naming the shape."""
    if feats.ndim == 3:
        n = feats.shape[1] - 1
        side = math.isqrt(max(n, 0))
        if feats.shape[2] != channels or side * side != n:
            raise ValueError(f"feature tokens of shape {tuple(feats.shape)}: expected (B, 1+h*w, {channels}) "
                             "with one class token and a square grid")
        return rearrange(feats[:, 1:], "b (h w) c -> b c h w", h=side)
    if feats.ndim == 4:
        if feats.shape[1] == channels:
            return feats
        if feats.shape[3] == channels:
            return feats.permute(0, 3, 1, 2)
    raise ValueError(f"feature map of shape {tuple(feats.shape)}: expected {channels} channels "
                     f"as (B, {channels}, h, w), (B, h, w, {channels}) or tokens (B, 1+h*w, {channels})")


class FeatureAdapter(nn.Module):
    """Feature map (B, C_f, h, w) / (B, h, w, C_f) / (B, 1+h*w, C_f) -> hint (B, out_channels, grid, grid)."""

    def __init__(self, cfg: AdapterConfig, out_channels: int):
        super().__init__()
        self.cfg = cfg
        self.block = nn.Sequential(
            nn.Upsample(size=(cfg.grid, cfg.grid), mode="bilinear", align_corners=False),
            nn.Conv2d(cfg.in_channels, cfg.width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(cfg.width, cfg.width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(cfg.width, out_channels, 3, padding=1),
        )
        nn.init.zeros_(self.block[5].weight)
        nn.init.zeros_(self.block[5].bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = to_nchw(feats, self.cfg.in_channels)  # (B, C_f, h, w)
        if self.cfg.pooled:
            x = x.mean(dim=(2, 3), keepdim=True).expand_as(x)  # (B, C_f, h, w), constant over (h, w)
        return self.block(x)
