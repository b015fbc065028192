"""The composed FeatInv model: frozen miniSD (UNet, KL autoencoder, CLIP text encoder) + ControlNet.

``FeatInv.forward`` is the ε-prediction ``apply_model`` of the reference: the ControlNet turns
(latents, t, context, feature map) into residuals that are scaled and added to the UNet's skips.
Attribute names map to checkpoint prefixes in :mod:`featinv.checkpoint.layout` only. The diffusion
schedule is not the network's: samplers and the loss take it from :func:`featinv.diffusion.schedule.alphas_cumprod`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from featinv.config import ModelConfig
from featinv.nets.autoencoder import AutoencoderKL
from featinv.nets.controlnet import ControlNet
from featinv.nets.text import CLIPTextEncoder, tokenize
from featinv.nets.unet import UNet

ControlScales = Sequence[float] | torch.Tensor | None


def guess_mode_scales(n: int = 13) -> list[float]:
    """The reference "guess mode" ramp 0.825**(12-i); a shorter model uses the first entries."""
    return [0.825 ** (12 - i) for i in range(13)][:n] if n <= 13 else [0.825 ** (n - 1 - i) for i in range(n)]


class PromptCache:
    """Text context per prompt, computed once: FeatInv only ever uses a handful of prompts."""

    def __init__(self, encoder: CLIPTextEncoder):
        self.encoder = encoder
        self._cache: dict[tuple[str, torch.device], torch.Tensor] = {}

    def clear(self) -> None:
        self._cache.clear()

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        """prompts: B strings -> (B, 77, D) context on the encoder's device, float32."""
        device = next(self.encoder.parameters()).device
        missing = sorted({p for p in prompts if (p, device) not in self._cache})
        if missing:
            with torch.no_grad():  # the text encoder is frozen: the cache holds no graph
                ctx = self.encoder(tokenize(missing, self.encoder.cfg.context_length).to(device)).float()
            self._cache.update({(p, device): c for p, c in zip(missing, ctx)})
        return torch.stack([self._cache[(p, device)] for p in prompts])


class FeatInv(nn.Module):
    """miniSD + FeatInv ControlNet. Sub-modules: ``unet``, ``control``, ``vae``, ``text_encoder``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.unet = UNet(cfg.unet)
        self.vae = AutoencoderKL(cfg.vae)
        self.text_encoder = CLIPTextEncoder(cfg.text)
        self.control = ControlNet(cfg.unet, cfg.adapter)
        self.text_context = PromptCache(self.text_encoder)
        self.register_load_state_dict_post_hook(lambda module, _: module.text_context.clear())

    @property
    def num_control(self) -> int:
        return self.unet.num_control

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None,
                      sample: bool = True) -> torch.Tensor:
        """images: (B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/8, W/8).

        As in training, a posterior *sample* (``sample=False``: the mean) times the scale factor."""
        mean, logvar = self.vae.encode(images)
        if sample:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            mean = mean + (0.5 * logvar).exp() * noise
        return self.cfg.vae.scale_factor * mean

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 4, h, w) -> images (B, 3, 8h, 8w), nominally in [-1, 1]."""
        return self.vae.decode(latents / self.cfg.vae.scale_factor)

    def hint(self, feats: torch.Tensor) -> torch.Tensor:
        """Feature map (NCHW, NHWC or tokens) -> adapter output (B, model_channels, grid, grid).

        It does not depend on t: a sampler computes it once per image, not once per step."""
        return self.control.input_hint_block(feats)

    def control_residuals(self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                          feats: torch.Tensor | None = None, hint: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The ControlNet's unscaled residuals (input blocks, then middle)."""
        self._check_latents(latents)
        return self.control(latents, self.hint(feats) if hint is None else hint, t, context)

    def forward(self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                feats: torch.Tensor | None = None, hint: torch.Tensor | None = None,
                control_scales: ControlScales = None) -> torch.Tensor:
        """ε-prediction. latents: (B, 4, h, w); t: (B,) int64 in [0, 1000); context: (B, 77, D);
        feats: classifier feature map (B, C_f, h', w') or ``hint`` precomputed by :meth:`hint`;
        neither: the plain UNet. control_scales: per residual (first N of the list are used, as
        in the reference) or a (B, N) tensor of per-sample scales (0 switches control off)."""
        if feats is None and hint is None:
            self._check_latents(latents)
            return self.unet(latents, t, context)
        control = self.control_residuals(latents, t, context, feats, hint)
        if control_scales is not None:
            if isinstance(control_scales, torch.Tensor) and control_scales.ndim == 2:
                control = [c * control_scales[:, i, None, None, None].to(c) for i, c in enumerate(control)]
            else:
                control = [c * float(s) for c, s in zip(control, control_scales)]
        return self.unet(latents, t, context, control)

    def _check_latents(self, latents: torch.Tensor) -> None:
        c, size = self.cfg.unet.in_channels, self.cfg.adapter.grid
        if latents.ndim != 4 or latents.shape[1] != c or latents.shape[-2:] != (size, size):
            raise ValueError(f"latents of shape {tuple(latents.shape)}: this model expects (B, {c}, {size}, {size}) "
                             f"(adapter.grid = latent_size = {size})")
