"""The ControlNet branch: a trainable copy of the UNet encoder + middle block with zero convs.

ControlNet (Zhang et al. 2023, arXiv 2302.05543) branch, as FeatInv (arXiv 2505.21032) uses it: after each input block and after the middle block a
zero-initialised 1x1 conv emits a residual (13 for SD-1.x). The FeatInv adapter's hint is added
to the hidden state after the first input block (conv_in), and only there.
"""
from __future__ import annotations

import torch
from torch import nn

from featinv.config import AdapterConfig, UNetConfig
from featinv.nets.adapter import FeatureAdapter
from featinv.nets.unet import UNet, build_encoder, run_block, timestep_embedding


def zero_conv(channels: int) -> nn.Sequential:
    """1x1 conv initialised to zero, wrapped so its key reads ``N.0.weight`` as in the reference."""
    conv = nn.Conv2d(channels, channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(conv)


class ControlNet(nn.Module):
    """Encoder copy + feature adapter -> control residuals for the UNet's skips and middle."""

    def __init__(self, cfg: UNetConfig, adapter: AdapterConfig):
        super().__init__()
        self.cfg = cfg
        # registration order = the reference state-dict order
        self.time_embed, self.input_blocks, middle, chans = build_encoder(cfg)
        self.zero_convs = nn.ModuleList([zero_conv(c) for c in chans])
        self.input_hint_block = FeatureAdapter(adapter, cfg.model_channels)
        self.middle_block = middle
        self.middle_block_out = zero_conv(chans[-1])

    @classmethod
    def from_unet(cls, unet: UNet, adapter: AdapterConfig) -> "ControlNet":
        """A ControlNet whose encoder is a copy of ``unet``'s; adapter and zero convs fresh.

        The source UNet is not modified."""
        net = cls(unet.cfg, adapter)
        for name in ("time_embed", "input_blocks", "middle_block"):
            getattr(net, name).load_state_dict(getattr(unet, name).state_dict())
        return net

    def forward(self, x: torch.Tensor, hint: torch.Tensor, t: torch.Tensor,
                context: torch.Tensor) -> list[torch.Tensor]:
        """x: (B, 4, h, w) latents; hint: (B, model_channels, h, w) adapter output;
        t: (B,); context: (B, 77, D). Returns the unscaled residuals, input blocks then middle."""
        ckpt = self.cfg.gradient_checkpointing
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(x.dtype))
        if hint.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"hint grid {tuple(hint.shape[-2:])} does not match the latent grid "
                             f"{tuple(x.shape[-2:])}: set adapter.grid to the latent size")
        out, h = [], x
        for i, (block, zc) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = run_block(block, h, emb, context, ckpt)
            if i == 0:
                h = h + hint
            out.append(zc(h))
        h = run_block(self.middle_block, h, emb, context, ckpt)
        out.append(self.middle_block_out(h))
        return out
