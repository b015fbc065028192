"""Guidance as ε-callables for any sampler: classifier-free guidance (the conditional and unconditional
passes batched into one call) and training-free feature guidance (a gradient step on the classifier's
feature distance of the decoded prediction)."""
from __future__ import annotations

from typing import Callable

import torch

from featinv.config import FeatureGuidanceConfig
from featinv.diffusion.samplers import EpsFn
from featinv.diffusion.schedule import pred_x0


def relative_feature_distance(feats: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||φ - φ*||² / ||φ*||² per row, in float32: (B, ...) and (B, ...) -> (B,). The normalised Euclidean
    loss of Mahendran & Vedaldi 2015 (Sec. 2), which feature guidance and pixel inversion descend."""
    target = target.float()
    return (feats.float() - target).flatten(1).square().sum(1) / target.flatten(1).square().sum(1).clamp_min(1e-12)


def guided_eps_fn(model_fn: Callable[..., torch.Tensor], cond: dict, uncond: dict, scale: float) -> EpsFn:
    """Classifier-free guidance as one ε-callable: ε = ε_u + s·(ε_c − ε_u).

    model_fn(x, t, **kwargs) -> ε. ``cond`` and ``uncond`` hold the keyword tensors (batched along
    dim 0) of the two branches; both branches run as ONE batched forward of size 2B. A value of
    None in both dicts is passed through as None. With scale 1 only the conditional branch runs,
    with scale 0 only the unconditional one."""
    if scale == 1.0:
        return lambda x, t: model_fn(x, t, **cond)
    if scale == 0.0:
        return lambda x, t: model_fn(x, t, **uncond)
    both = {k: None if cond[k] is None else torch.cat([uncond[k], cond[k]]) for k in cond}

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps_u, eps_c = model_fn(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)
        return eps_u + scale * (eps_c - eps_u)

    return eps_fn


def feature_guided_eps_fn(eps_fn: EpsFn, decode_fn: Callable[[torch.Tensor], torch.Tensor],
                          feature_fn: Callable[[torch.Tensor], torch.Tensor], target: torch.Tensor,
                          alphas_cumprod: torch.Tensor, guidance: FeatureGuidanceConfig) -> EpsFn:
    """Training-free feature guidance as one ε-callable: steer any ε-model towards a target feature map.

    The guidance of Shirahama et al. 2025 (arXiv 2509.07936) for feature inversion, in the form of
    universal guidance's forward guidance (Bansal et al. 2023, arXiv 2302.07121), which is classifier
    guidance in ε form (Dhariwal & Nichol 2021, Sec. 4.2) with the loss taken on the predicted clean
    sample. At a guided step with x = x_t and ᾱ = ᾱ_t:

        x̂0 = (x - √(1-ᾱ)·ε(x, t)) / √ᾱ                      (predicted clean latent)
        L(x) = ||φ(D(x̂0)) - φ*||² / ||φ*||²                  (feature distance, per sample)
        ε̂ = ε(x, t) + s·√(1-ᾱ)·∇_x L(x)                      (the step then uses ε̂)

    D = decode_fn, φ = feature_fn, φ* = target, s = ``guidance.scale``. The gradient flows through
    ε as well (one backward pass of the model and of the classifier per guided step). L is relative
    to the target's squared norm, so one scale suits feature maps of any size and magnitude.

    eps_fn(x, t): x (B, ...) latents, t (B,) int64 -> ε (B, ...); decode_fn: latents (B, ...) ->
    images (B, 3, H, W); feature_fn: those images -> features shaped like ``target`` (B, C, h, w),
    differentiable (a frozen classifier is fine; one under torch.no_grad() is not). Only the steps
    whose t lies in [t_min, t_max] are guided; ``scale == 0`` returns ``eps_fn`` itself (the plain
    sampler, bit for bit). The samplers run under torch.no_grad(); this callable re-enables it."""
    if guidance.scale == 0:
        return eps_fn
    target = target.detach().float()

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        on = (t >= guidance.t_min) & (t <= guidance.t_max)  # (B,)
        if not bool(on.any()):
            return eps_fn(x, t)
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            eps = eps_fn(x_in, t)
            a_t = alphas_cumprod.to(x.device)[t].view(-1, *([1] * (x.ndim - 1))).to(eps.dtype)
            feats = feature_fn(decode_fn(pred_x0(x_in, eps, a_t)))
            if not feats.requires_grad:
                raise ValueError("feature guidance: the feature function's output has no gradient with respect to "
                                 "the image (is it run under torch.no_grad() or detached?)")
            if feats.shape != target.shape:
                raise ValueError(f"feature guidance: features of shape {tuple(feats.shape)} for a target of shape "
                                 f"{tuple(target.shape)}")
            dist = relative_feature_distance(feats, target)  # (B,)
            (grad,) = torch.autograd.grad(dist.sum(), x_in)  # rows are independent: each its own gradient
        weight = guidance.scale * (1.0 - a_t).sqrt() * on.view(a_t.shape).to(a_t.dtype)
        return (eps.detach() + weight * grad.to(eps.dtype)).to(x.dtype)

    return guided
