"""The SD-1.x UNet in the LDM module layout (``input_blocks.N.M``, ``middle_block``, ``output_blocks``).

The encoder half (time embedding, input blocks, middle block) is built by :func:`build_encoder`,
which the ControlNet branch reuses, so the two stay the same shape by construction.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from featinv.config import UNetConfig
from featinv.nets.attention import SpatialTransformer


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32, eps 1e-5) computed in float32 (an fp32 island under bf16)."""

    def __init__(self, channels: int):
        super().__init__(32, channels, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding, cos first. t: (B,) int or float timesteps -> (B, dim) float32."""
    half = dim // 2
    # fp32 island: arguments up to ~1000 need full precision
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, plus the time embedding, GroupNorm-SiLU-conv; 1x1 skip if channels change."""

    def __init__(self, channels: int, out_channels: int, emb_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        # Dropout(0.0) does nothing; it only holds index 2, so the conv keeps its checkpoint key out_layers.3.
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """conv3x3, stride 2 (key ``op``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """nearest x2, then conv3x3 (key ``conv``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Block(nn.ModuleList):
    """One LDM ``TimestepEmbedSequential``: layers that take (h), (h, emb) or (h, context)."""

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context)
            else:
                h = layer(h)
        return h


def run_block(block: Block, h, emb, context, use_checkpoint: bool) -> torch.Tensor:
    """Run a block, optionally under non-reentrant gradient checkpointing (training memory)."""
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(block, h, emb, context, use_reentrant=False)
    return block(h, emb, context)


def build_encoder(cfg: UNetConfig) -> tuple[nn.Sequential, nn.ModuleList, Block, list[int]]:
    """Time embedding, input blocks and middle block; also the channel count after each input block."""
    mc = cfg.model_channels
    emb_dim = 4 * mc
    time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
    blocks = [Block([nn.Conv2d(cfg.in_channels, mc, 3, padding=1)])]
    chans, ch, ds = [mc], mc, 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers: list[nn.Module] = [ResBlock(ch, mult * mc, emb_dim)]
            ch = mult * mc
            if ds in cfg.attention_resolutions:
                layers.append(SpatialTransformer(ch, cfg.num_heads, cfg.context_dim))
            blocks.append(Block(layers))
            chans.append(ch)
        if level != len(cfg.channel_mult) - 1:
            blocks.append(Block([Downsample(ch)]))
            chans.append(ch)
            ds *= 2
    middle = Block([ResBlock(ch, ch, emb_dim), SpatialTransformer(ch, cfg.num_heads, cfg.context_dim),
                    ResBlock(ch, ch, emb_dim)])
    return time_embed, nn.ModuleList(blocks), middle, chans


class UNet(nn.Module):
    """SD-1.x ε-prediction UNet with optional additive control residuals."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.time_embed, self.input_blocks, self.middle_block, chans = build_encoder(cfg)
        mc, emb_dim = cfg.model_channels, 4 * cfg.model_channels
        ch, ds = chans[-1], 2 ** (len(cfg.channel_mult) - 1)
        out_blocks = []
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers: list[nn.Module] = [ResBlock(ch + chans.pop(), mult * mc, emb_dim)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(SpatialTransformer(ch, cfg.num_heads, cfg.context_dim))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                out_blocks.append(Block(layers))
        self.output_blocks = nn.ModuleList(out_blocks)
        self.out = nn.Sequential(GroupNorm32(mc), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    @property
    def num_control(self) -> int:
        """Number of control residuals this UNet accepts (input blocks + middle)."""
        return len(self.input_blocks) + 1

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                control: list[torch.Tensor] | None = None) -> torch.Tensor:
        """x: (B, C, h, w) latents; t: (B,) timesteps in [0, 1000); context: (B, 77, D);
        control: ``num_control`` residuals (input blocks in order, then middle), already scaled.
        Returns ε: (B, out_channels, h, w)."""
        ckpt = self.cfg.gradient_checkpointing
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(x.dtype))
        skips, h = [], x
        for block in self.input_blocks:
            h = run_block(block, h, emb, context, ckpt)
            skips.append(h)
        h = run_block(self.middle_block, h, emb, context, ckpt)
        if control is not None:
            h = h + control[-1]
            # control is added to the skip connections, deepest first (ctrl_0 meets the last block)
            skips = [s + c for s, c in zip(skips, control[:-1])]
        for block in self.output_blocks:
            h = run_block(block, torch.cat([h, skips.pop()], dim=1), emb, context, ckpt)
        return self.out(h)
