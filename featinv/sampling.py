"""DDIM sampling and classifier-free guidance as plain functions over an ε-callable.

Conventions pinned by the reference fixtures (DDIM: Song et al. 2021, eq. 12; CFG: Ho & Salimans 2022): uniform spacing
``arange(0, T, T // S) + 1``; the last step's ᾱ_prev is ᾱ[0] (not 1); the sample returned is
x_prev of the last step.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from featinv.diffusion import pred_x0

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Uniformly spaced DDIM timesteps, ascending: (S,) int64, e.g. S=50 -> [1, 21, ..., 981].

    The reference's ``arange(0, T, T // S) + 1``; for S that does not divide T it yields more than
    S steps (and T itself for S=3), so only the first S are kept."""
    if not 0 < num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    steps = torch.arange(0, num_train_timesteps, num_train_timesteps // num_steps, dtype=torch.int64) + 1
    return steps[:num_steps]


def ddim_schedule(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, eta: float):
    """(ᾱ_t, ᾱ_prev, σ) per DDIM index, float32, each (S,) in index (ascending) order."""
    ac = alphas_cumprod.double()
    alphas = ac[timesteps]
    alphas_prev = torch.cat([ac[:1], ac[timesteps[:-1]]])
    sigmas = eta * ((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev)).sqrt()
    return alphas.float(), alphas_prev.float(), sigmas.float()


def randn_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Gaussian noise shaped like x: one generator for the batch, or one per sample.

    With a generator per sample, each sample's noise depends on its own generator only, so a
    sample is reproducible from its seed whatever batch it is in."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=generator.device if generator else x.device,
                           dtype=torch.float32).to(x)
    if len(generator) != x.shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
    return torch.stack([torch.randn(x.shape[1:], generator=g, device=g.device, dtype=torch.float32)
                        for g in generator]).to(x)


@torch.no_grad()
def ddim_sample(eps_fn: EpsFn, x_T: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor,
                eta: float = 0.0, generator: Generators = None,
                callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Run DDIM from x_T down the given timesteps.

    eps_fn(x, t): x (B, ...) like x_T, t (B,) int64 -> ε (B, ...). Any callable works.
    x_T: (B, ...) starting noise; device and dtype of the run come from it.
    alphas_cumprod: (T,) training ᾱ; timesteps: (S,) ascending, from :func:`ddim_timesteps`.
    eta: 0 is deterministic DDIM; noise for η>0 comes from ``generator`` (see :func:`randn_like`).
    callback(i, x_prev, pred_x0) is called after each step, i counting from 0.
    Returns the final latent (x_prev of the last step)."""
    alphas, alphas_prev, sigmas = (v.to(x_T.device) for v in ddim_schedule(alphas_cumprod.cpu(), timesteps.cpu(), eta))
    x = x_T
    steps = len(timesteps)
    for i, index in enumerate(reversed(range(steps))):
        t = torch.full((x.shape[0],), int(timesteps[index]), device=x.device, dtype=torch.int64)
        eps = eps_fn(x, t).to(x.dtype)
        a_t, a_prev, sigma = alphas[index], alphas_prev[index], sigmas[index]
        x0 = pred_x0(x, eps, a_t)
        x = a_prev.sqrt() * x0 + (1.0 - a_prev - sigma ** 2).sqrt() * eps
        if eta > 0:
            x = x + sigma * randn_like(x, generator)
        if callback is not None:
            callback(i, x, x0)
    return x


def guided_eps_fn(model_fn: Callable[..., torch.Tensor], cond: dict, uncond: dict, scale: float) -> EpsFn:
    """Classifier-free guidance as one ε-callable: ε = ε_u + s·(ε_c − ε_u).

    model_fn(x, t, **kwargs) -> ε. ``cond`` and ``uncond`` hold the keyword tensors (batched along
    dim 0) of the two branches; both branches run as ONE batched forward of size 2B. A value of
    None in both dicts is passed through as None. With scale 1 only the conditional branch runs."""
    if scale == 1.0:
        return lambda x, t: model_fn(x, t, **cond)
    both = {k: None if cond[k] is None else torch.cat([uncond[k], cond[k]]) for k in cond}

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps_u, eps_c = model_fn(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)
        return eps_u + scale * (eps_c - eps_u)

    return eps_fn
