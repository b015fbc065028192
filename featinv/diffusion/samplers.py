"""Samplers (DDIM, DPM-Solver++(2M)) as plain functions over an ε-callable, all with one signature:
``f(eps_fn, x_T, alphas_cumprod, timesteps, *, eta=0.0, generator=None, callback=None, **options)``
(k-diffusion's habit), registered by name in :data:`featinv.registry.SAMPLERS`.

Conventions pinned by the reference fixtures (DDIM: Song et al. 2021, eq. 12; CFG: Ho & Salimans 2022): uniform spacing
``arange(0, T, T // S) + 1``; the last step's ᾱ_prev is ᾱ[0] (not 1); the sample returned is
x_prev of the last step. Every sampler here visits the same grid: the model runs at each timestep of
the list, from the largest down, and the last step lands on ᾱ[0], so their outputs are comparable.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from featinv.config import SPACINGS, check_eta
from featinv.diffusion.schedule import log_snr, pred_x0
from featinv.registry import SAMPLERS

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None
Callback = Callable[[int, torch.Tensor, torch.Tensor], None]


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000, spacing: str = "reference") -> torch.Tensor:
    """Sampler timesteps, ascending, (n,) int64 in [0, T).

    "reference": the reference's ``arange(0, T, T // S) + 1``, e.g. S=50 -> [1, 21, ..., 981]. When S does
    not divide T this is ceil(T / (T // S)) steps, more than S (S=12 -> 13 steps, 1 ... 997), kept
    as they are so results equal the reference's. Where the list ends at T itself (T // S divides T - 1:
    S = 3, 9, 27, 37, 111, 333, ...) the reference indexes ᾱ[T] and crashes; that entry is clamped to
    T - 1: dropping it would start from pure noise at a timestep that expects signal (S=3 would start at
    667), while clamping keeps every other timestep and the start at the top of the schedule (for
    S > T/2 the list already holds T - 1, so the entry merges with it: 999 steps).
    "trailing": exactly S steps, round(T - k·T/S) - 1 for k < S, starting at T - 1 (S=50 -> [19, ..., 999])."""
    if not 0 < num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    if spacing == "reference":
        steps = torch.arange(0, num_train_timesteps, num_train_timesteps // num_steps, dtype=torch.int64) + 1
        return steps.clamp(max=num_train_timesteps - 1).unique()  # unique: T // S = 1 also lists T - 1 itself
    if spacing == "trailing":
        k = torch.arange(num_steps, dtype=torch.float64)
        return (torch.round(num_train_timesteps - k * num_train_timesteps / num_steps) - 1).long().flip(0)
    raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")


def ddim_schedule(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, eta: float,
                  dtype: torch.dtype = torch.float32):
    """(ᾱ_t, ᾱ_prev, σ) per DDIM index, computed in float64 and returned in ``dtype``, each (S,) in
    index (ascending) order."""
    ac = alphas_cumprod.double()
    alphas = ac[timesteps]
    alphas_prev = torch.cat([ac[:1], ac[timesteps[:-1]]])
    sigmas = eta * ((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev)).sqrt()
    return alphas.to(dtype), alphas_prev.to(dtype), sigmas.to(dtype)


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
def ddim_sample(eps_fn: EpsFn, x_T: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, *,
                eta: float = 0.0, generator: Generators = None, callback: Callback | None = None) -> torch.Tensor:
    """Run DDIM from x_T down the given timesteps.

    eps_fn(x, t): x (B, ...) like x_T, t (B,) int64 -> ε (B, ...). Any callable works.
    x_T: (B, ...) starting noise; device and dtype of the run come from it.
    alphas_cumprod: (T,) training ᾱ; timesteps: (n,) ascending, from :func:`ddim_timesteps`.
    eta: 0 is deterministic DDIM; noise for η>0 comes from ``generator`` (see :func:`randn_like`).
    callback(i, x_prev, pred_x0) is called after each step, i counting from 0.
    Returns the final latent (x_prev of the last step)."""
    dtype = torch.promote_types(x_T.dtype, torch.float32)  # float32 coefficients unless x_T is float64
    schedule = ddim_schedule(alphas_cumprod.cpu(), timesteps.cpu(), eta, dtype)
    alphas, alphas_prev, sigmas = (v.to(x_T.device) for v in schedule)
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


@torch.no_grad()
def dpmpp_2m_sample(eps_fn: EpsFn, x_T: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, *,
                    eta: float = 0.0, generator: Generators = None, callback: Callback | None = None,
                    lower_order_final: bool = False) -> torch.Tensor:
    """Run DPM-Solver++(2M), the multistep second-order solver of the probability-flow ODE in data
    prediction (Lu et al. 2022, arXiv 2211.01095, Algorithm 2), for an ε-prediction model.

    Same arguments, grid and output as :func:`ddim_sample` with η = 0: the model runs once at each of
    the (n,) ascending ``timesteps``, from the largest down, and the last step lands on ᾱ[0].
    Deterministic: η != 0 is a ValueError and ``generator`` is not used (per-sample reproducibility
    comes from x_T alone). The first step is first order (it equals DDIM); ``lower_order_final``
    makes the last one first order too. callback(i, x, pred_x0) is called after each step. Returns
    the final latent."""
    check_eta("dpmpp_2m", eta)
    ac = alphas_cumprod.detach().cpu().double()
    ts = timesteps.cpu().flip(0)  # descending: the order the model is called in
    grid = torch.cat([ac[ts], ac[:1]])  # ᾱ at t_0 > t_1 > ... > t_n, the last being ᾱ[0] like DDIM's last ᾱ_prev
    alpha, sigma, lam = grid.sqrt(), (1.0 - grid).sqrt(), log_snr(grid)
    dtype = torch.promote_types(x_T.dtype, torch.float32)
    coef = lambda v: torch.as_tensor(float(v), dtype=dtype, device=x_T.device)  # noqa: E731
    x, x0_prev, h_prev = x_T, None, None
    for i, t_int in enumerate(ts.tolist()):
        t = torch.full((x.shape[0],), t_int, device=x.device, dtype=torch.int64)
        x0 = pred_x0(x, eps_fn(x, t).to(x.dtype), coef(grid[i]))
        h = lam[i + 1] - lam[i]
        last = i == len(ts) - 1
        if x0_prev is None or (last and lower_order_final):
            # first order: the exact solution x_t = (σ_t/σ_s) x_s + σ_t ∫ e^λ x_θ dλ with x_θ held
            # constant over the step (DPM-Solver++1, which is DDIM)
            d = x0
        else:
            r = h_prev / h  # Algorithm 2: D_i = (1 + 1/(2r)) x_θ(t_{i-1}) - 1/(2r) x_θ(t_{i-2})
            d = coef(1 + 0.5 / r) * x0 - coef(0.5 / r) * x0_prev
        # Algorithm 2: x_{t_i} = (σ_{t_i}/σ_{t_{i-1}}) x_{t_{i-1}} - α_{t_i} (e^{-h_i} - 1) D_i
        x = coef(sigma[i + 1] / sigma[i]) * x - coef(alpha[i + 1] * torch.expm1(-h)) * d
        x0_prev, h_prev = x0, h
        if callback is not None:
            callback(i, x, x0)
    return x


def sample(sampler: str, eps_fn: EpsFn, x_T: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, *,
           eta: float = 0.0, generator: Generators = None, callback: Callback | None = None,
           **options) -> torch.Tensor:
    """Run the sampler named ``sampler`` (a key of :data:`featinv.registry.SAMPLERS`); the other
    arguments as :func:`ddim_sample`, ``options`` the sampler's own (e.g. dpmpp_2m's ``lower_order_final``).
    A deterministic sampler refuses η != 0 itself."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {tuple(SAMPLERS)}, got {sampler!r}")
    return SAMPLERS[sampler].load()(eps_fn, x_T, alphas_cumprod, timesteps, eta=eta, generator=generator,
                                    callback=callback, **options)
