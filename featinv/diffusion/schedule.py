"""Diffusion math: the SD-1.x scaled-linear schedule, q_sample, ε <-> x0 conversions, the ε loss.

Pure functions over tensors; the schedule is computed in float64 and stored in float32, as in the
reference, so that its buffers match checkpoints bit for bit. The schedule is SD-1.x's "scaled linear"
one (Rombach et al. 2022, Stable Diffusion; LDM calls it "linear"); q_sample is Ho et al. 2020, eq. 4.
"""
from __future__ import annotations

from typing import Callable

import torch

from featinv.config import DiffusionConfig


def betas(cfg: DiffusionConfig) -> torch.Tensor:
    """β_t = linspace(√β_start, √β_end, T)², float64 (LDM calls this schedule "linear")."""
    return torch.linspace(cfg.linear_start ** 0.5, cfg.linear_end ** 0.5, cfg.timesteps, dtype=torch.float64) ** 2


def alphas_cumprod(cfg: DiffusionConfig) -> torch.Tensor:
    """ᾱ_t = Π_{s<=t} (1 - β_s): (T,) float32."""
    return torch.cumprod(1.0 - betas(cfg), dim=0).float()


# The 13 schedule buffers at the top level of an LDM/FeatInv checkpoint, in the file's order: names
# only, so that key tables need not compute a schedule (schedule_buffers asserts the same names).
SCHEDULE_KEYS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                 "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                 "posterior_mean_coef1", "posterior_mean_coef2", "logvar")


def schedule_buffers(cfg: DiffusionConfig) -> dict[str, torch.Tensor]:
    """The 13 top-level schedule buffers of an LDM/FeatInv checkpoint, float32, (T,) each."""
    b = betas(cfg)
    a = 1.0 - b
    ac = torch.cumprod(a, dim=0)
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
    post_var = b * (1.0 - ac_prev) / (1.0 - ac)
    buffers = {
        "betas": b,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1.0).sqrt(),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
        "posterior_mean_coef1": b * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * a.sqrt() / (1.0 - ac),
        "logvar": torch.zeros_like(b),
    }
    assert tuple(buffers) == SCHEDULE_KEYS
    return {k: v.float() for k, v in buffers.items()}


def _gather(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] reshaped to broadcast against ``like`` (B, ...)."""
    return values.to(like.device)[t].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t·x0 + √(1-ᾱ_t)·ε. x0, noise: (B, ...); t: (B,) int64 in [0, T)."""
    sqrt_ac = alphas_cumprod.sqrt()
    sqrt_1m = (1.0 - alphas_cumprod).sqrt()
    return _gather(sqrt_ac, t, x0) * x0 + _gather(sqrt_1m, t, x0) * noise


def pred_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_t: torch.Tensor) -> torch.Tensor:
    """x0 = (x_t - √(1-ᾱ)·ε)/√ᾱ for a scalar or broadcastable ᾱ."""
    return (x_t - (1.0 - alpha_t).sqrt() * eps) / alpha_t.sqrt()


def log_snr(alpha_t: torch.Tensor) -> torch.Tensor:
    """λ = log(√ᾱ/√(1-ᾱ)), the half log-SNR that DPM-Solver steps in (Lu et al. 2022, arXiv 2206.00927)."""
    return 0.5 * (alpha_t.log() - torch.log1p(-alpha_t))


def eps_loss(eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor, t: torch.Tensor,
             noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """ε-prediction MSE (the reference ``loss_simple``; Ho et al. 2020, eq. 14): mean of (ε̂-ε)²."""
    eps = eps_fn(q_sample(x0, t, noise, alphas_cumprod), t)
    return (eps.float() - noise.float()).pow(2).mean()
