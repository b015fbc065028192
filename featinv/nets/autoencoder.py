"""KL autoencoder of Stable Diffusion 1.x (the LDM ``AutoencoderKL``, f=8 for 4 levels).

Attribute names mirror the LDM module tree (``encoder.down.0.block.0.norm1`` ...), so a
reference ``first_stage_model.*`` state dict loads after stripping that prefix. Latents here
are UNSCALED: the caller multiplies by ``VAEConfig.scale_factor`` (0.18215) after encoding and
divides by it before decoding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from featinv.config import VAEConfig
from featinv.nets.unet import Upsample  # same layer and key (`conv`) as the UNet's


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the VAE's settings: 32 groups, eps 1e-6 (the UNet uses 1e-5)."""
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """Pre-activation residual block without a time embedding: (B, C_in, H, W) -> (B, C_out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # A 1x1 projection only where the channel count changes (LDM key: nin_shortcut);
        # Identity has no parameters, so it adds no state_dict keys.
        self.nin_shortcut = (nn.Conv2d(in_channels, out_channels, 1)
                             if in_channels != out_channels else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, 1x1-conv projections: (B, C, H, W) -> same."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        b, c, height, width = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1, H*W, C): one head whose dim is the full channel count,
        # so SDPA's default scale C^-0.5 is the reference's.
        q, k, v = (p(h).flatten(2).transpose(1, 2).unsqueeze(1) for p in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.squeeze(1).transpose(1, 2).reshape(b, c, height, width)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Halve H and W: asymmetric pad (right/bottom by 1), then conv3x3 stride 2 without padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2)) (exactly H/2 for even H)."""
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Level(nn.Module):
    """One resolution level: res blocks ``block.{j}``, then ``downsample`` / ``upsample`` or neither.

    ``channels`` lists the widths along the level: block j maps channels[j] -> channels[j+1].
    """

    def __init__(self, channels: list[int], resample: str | None = None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(a, b) for a, b in zip(channels[:-1], channels[1:]))
        # The attribute name is part of the checkpoint key (down.{i}.downsample.conv).
        self.resample_name = {None: None, "down": "downsample", "up": "upsample"}[resample]
        if resample is not None:
            cls = Downsample if resample == "down" else Upsample
            self.add_module(self.resample_name, cls(channels[-1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, H', W') with H' = H/2, H or 2H."""
        for block in self.block:
            x = block(x)
        if self.resample_name is not None:
            x = getattr(self, self.resample_name)(x)
        return x


class MidBlock(nn.Module):
    """ResnetBlock -> AttnBlock -> ResnetBlock at the lowest resolution: (B, C, h, w) -> same."""

    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, h, w) -> (B, C, h, w)."""
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image -> latent moments: (B, 3, H, W) -> (B, 2*z_channels, H/f, W/f), f = 2**(levels-1)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        levels, c = [], cfg.ch
        for i, w in enumerate(widths):
            last = i == len(widths) - 1
            levels.append(Level([c] + [w] * cfg.num_res_blocks, None if last else "down"))
            c = w
        self.down = nn.ModuleList(levels)
        self.mid = MidBlock(c)
        self.norm_out = _norm(c)
        # double_z: mean and log-variance, stacked on the channel axis.
        self.conv_out = nn.Conv2d(c, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) in [-1, 1] -> (B, 2*z_channels, H/f, W/f)."""
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent -> image: (B, z_channels, h, w) -> (B, 3, h*f, w*f)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        c = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = MidBlock(c)
        # Built from the lowest resolution up, but stored so that up[i] is level i of the
        # encoder (up.0 is the full-resolution level), as in the LDM checkpoint.
        levels = {}
        for i in reversed(range(len(widths))):
            w = widths[i]
            levels[i] = Level([c] + [w] * (cfg.num_res_blocks + 1), "up" if i > 0 else None)
            c = w
        self.up = nn.ModuleList(levels[i] for i in range(len(widths)))
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, z_channels, h, w) -> (B, 3, h*f, w*f), roughly in [-1, 1] (not clamped)."""
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """SD-1.x KL autoencoder; keys equal the reference's ``first_stage_model.*`` minus the prefix."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, 3, H, W) in [-1, 1] -> (mean, logvar), each (B, embed_dim, H/f, W/f), unscaled."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, embed_dim, h, w) UNSCALED latents -> (B, 3, h*f, w*f) images, roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))
