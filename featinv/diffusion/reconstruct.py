"""Reconstruction: classifier feature map -> K images through a guided sampler (a library; no I/O).

:class:`Reconstructor` runs every (image, sample) pair of a call through ONE sampler run with both
guidance branches in one batched forward, computes the adapter output (hint) and the prompt
contexts once, and seeds each (key, k) with its own generator, so a sample's pixels do not depend
on the batch it was generated in. Sampling is ``SampleConfig.sampler`` (by default DDIM, Song et al. 2021,
"Denoising Diffusion Implicit Models", eq. 12) with classifier-free guidance (Ho & Salimans 2022), as in
FeatInv (arXiv 2505.21032).
Optionally, training-free feature guidance (:func:`featinv.diffusion.guidance.feature_guided_eps_fn`) steers the
samples towards the feature maps they are reconstructed from, through the backbone's gradient.
The ImageNet-val folder job built on it is :mod:`featinv.jobs.reconstruct`.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from featinv.config import FeatureGuidanceConfig, SampleConfig
from featinv.diffusion.guidance import feature_guided_eps_fn, guided_eps_fn
from featinv.diffusion.samplers import EpsFn, ddim_timesteps
from featinv.diffusion.samplers import sample as run_sampler
from featinv.diffusion.schedule import alphas_cumprod
from featinv.metrics import to_backbone
from featinv.nets.backbone import FeatureExtractor
from featinv.nets.model import FeatInv, guess_mode_scales

RANGE_TOLERANCE = 1e-2  # resampling overshoot allowed outside [0, 1]


def sample_seed(seed: int, key: str, k: int) -> int:
    """A stable 63-bit seed for sample k of the image named ``key`` (same in every process and run)."""
    digest = hashlib.blake2b(f"{seed}\0{key}\0{k}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def uncertainty(samples: torch.Tensor) -> torch.Tensor:
    """samples: (B, K, 3, H, W) -> (B, H, W) per-pixel std over K (population std, channel mean).

    What the feature map leaves undetermined; all zeros for K = 1."""
    if samples.ndim != 5:
        raise ValueError(f"uncertainty expects samples (B, K, 3, H, W), got shape {tuple(samples.shape)}")
    return samples.float().std(dim=1, correction=0).mean(dim=1)


class Reconstructor:
    """Feature maps (or images) -> K reconstructions each, in [0, 1].

    fixed_batch: run every call in chunks of exactly this many images, zero-padding the last one.
    CPU (and GPU) kernels pick batch-size-dependent algorithms whose float sums differ in the last
    bits (e.g. the time-embedding GEMM at batch 1 vs 8, 32-channel convs), which flips a few uint8
    pixels; at one fixed shape a row's result does not depend on its neighbours, so with a fixed
    batch a sample's pixels are bitwise the same in any batch, order, resume or rank split.

    guidance: training-free feature guidance towards the feature maps being inverted (needs the
    backbone). With ``cfg.guidance_scale=0`` and ``cfg.uncond="features"`` the sampler runs the
    unconditional model (feature map dropped) alone: guidance then inverts without the control branch."""

    def __init__(self, model: FeatInv, backbone: FeatureExtractor | None = None,
                 cfg: SampleConfig = SampleConfig(), bf16: bool = False, fixed_batch: int | None = None,
                 guidance: FeatureGuidanceConfig | None = None):
        self.model = model.eval()
        self.backbone = backbone.eval() if backbone is not None else None
        self.cfg = cfg
        self.guidance = guidance or FeatureGuidanceConfig()
        if self.guidance.scale and backbone is None:
            raise ValueError("feature guidance needs the backbone: pass it to Reconstructor(model, backbone, ...)")
        self.bf16 = bf16  # own autocast; leave False when the caller (e.g. Lightning) autocasts
        self.fixed_batch = fixed_batch

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    @torch.no_grad()
    def features(self, images01: torch.Tensor) -> torch.Tensor:
        """images01: (B, 3, S, S) in [0, 1] at the backbone's size -> feature map (B, C, h, w) float32."""
        if self.backbone is None:
            raise ValueError("this Reconstructor has no backbone: call from_features(feats, keys)")
        lo, hi = images01.aminmax()
        if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:  # e.g. uint8 values, or [-1, 1]
            raise ValueError(f"Reconstructor.features expects images in [0, 1] (the backbone applies its own "
                             f"mean/std), got values in [{float(lo):.3g}, {float(hi):.3g}]; divide 0-255 images by 255")
        with self._autocast():
            return self.backbone(images01.to(self.device)).float()

    def __call__(self, images01: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        """images01: (B, 3, S, S) in [0, 1]; keys: B stable names -> (B, K, 3, H, W) in [0, 1]."""
        return self._chunked(lambda x, ks: self._sample(self.features(x), ks), images01, keys)

    def from_features(self, feats: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        """feats: (B, C, h, w) classifier maps; keys: B names seeding the noise -> (B, K, 3, H, W) in [0, 1]."""
        return self._chunked(self._sample, feats, keys)

    def _chunked(self, fn, x: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        """fn(x, keys) over chunks of ``fixed_batch`` rows, zero-padded (or all at once without it)."""
        if len(keys) != x.shape[0]:
            raise ValueError(f"{len(keys)} keys for a batch of {x.shape[0]}")
        n = self.fixed_batch
        if not n:
            return fn(x, list(keys))
        outs = []
        for start in range(0, len(keys), n):
            chunk, ks = x[start:start + n], list(keys[start:start + n])
            pad = n - len(ks)
            if pad:
                chunk = torch.cat([chunk, chunk.new_zeros(pad, *chunk.shape[1:])])
                ks += [f"\0padding/{i}" for i in range(pad)]
            outs.append(fn(chunk, ks)[:n - pad])
        return torch.cat(outs)

    def _branches(self, feats: torch.Tensor) -> tuple[dict, dict]:
        """Keyword tensors (B·K rows) of the conditional and unconditional branch, built once per call."""
        cfg, model, k = self.cfg, self.model, self.cfg.num_samples
        hint = model.hint(feats).repeat_interleave(k, dim=0)  # once per image, not per step
        n = hint.shape[0]
        ctx_c, ctx_u = model.text_context([cfg.prompt, ""]).to(self.device).chunk(2)
        cond = dict(context=ctx_c.expand(n, -1, -1), hint=hint, control_scales=None)
        uncond = dict(context=ctx_u.expand(n, -1, -1), hint=hint, control_scales=None)
        if cfg.guess_mode:
            # Per-sample scales: the ramp on the cond half, 0 (control off) on the uncond half, so both
            # halves still run as one batched forward.
            ramp = torch.tensor(guess_mode_scales(model.num_control), device=self.device)
            cond["control_scales"] = ramp.expand(n, -1)
            uncond["control_scales"] = torch.zeros_like(cond["control_scales"])
        elif cfg.uncond == "features":
            # What training's joint dropout taught: zero feature map AND empty prompt.
            uncond["hint"] = model.hint(torch.zeros_like(feats[:1])).expand_as(hint)
        return cond, uncond

    def start_noise(self, keys: list[str]) -> tuple[torch.Tensor, list[torch.Generator]]:
        """x_T (B·K, C, h, w) float32 on the device, one CPU generator per (key, k) (the same noise on
        every device), and those generators (they go on to draw a stochastic sampler's η noise)."""
        generators = [torch.Generator().manual_seed(sample_seed(self.cfg.seed, key, k))
                      for key in keys for k in range(self.cfg.num_samples)]
        size, channels = self.model.cfg.latent_size, self.model.cfg.unet.in_channels
        x_T = torch.stack([torch.randn(channels, size, size, generator=g) for g in generators])
        return x_T.to(self.device), generators

    def eps_fn(self, feats: torch.Tensor) -> EpsFn:
        """The guided ε-callable the sampler runs for feature maps (B, C, h, w): x (B·K, ...), t (B·K,) -> ε."""
        feats = feats.to(self.device)
        cond, uncond = self._branches(feats)
        eps_fn = guided_eps_fn(self.model, cond, uncond, self.cfg.guidance_scale)
        if not self.guidance.scale:
            return eps_fn
        target = feats.float().repeat_interleave(self.cfg.num_samples, dim=0)  # (B·K, C, h, w)
        return feature_guided_eps_fn(eps_fn, self.model.decode_latents, self._guidance_features, target,
                                     alphas_cumprod(self.model.cfg.diffusion), self.guidance)

    def _guidance_features(self, images: torch.Tensor) -> torch.Tensor:
        """Decoded images (N, 3, H, W) in [-1, 1] -> the backbone's features, differentiable (no clamp:
        it would zero the gradient of pixels outside the range)."""
        return self.backbone(to_backbone((images.float() + 1) / 2, self.backbone.image_size)).float()

    @torch.no_grad()
    def _sample(self, feats: torch.Tensor, keys: list[str]) -> torch.Tensor:
        """One sampler run for all B·K samples: (B, C, h, w), B keys -> (B, K, 3, H, W) in [0, 1]."""
        cfg, model = self.cfg, self.model
        x_T, generators = self.start_noise(keys)
        timesteps = ddim_timesteps(cfg.steps, model.cfg.diffusion.timesteps, cfg.spacing)
        with self._autocast():
            latents = run_sampler(cfg.sampler, self.eps_fn(feats), x_T, alphas_cumprod(model.cfg.diffusion), timesteps,
                                  eta=cfg.eta, generator=generators)
            images = model.decode_latents(latents)
        images = ((images.float() + 1) / 2).clamp(0, 1)
        return images.view(len(keys), cfg.num_samples, *images.shape[1:])
