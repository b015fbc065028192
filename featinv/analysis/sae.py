"""Sparse autoencoders on channel vectors: streamed training and held-out metrics (reading vectors from .npy
shards on disk: :mod:`featinv.analysis.shards`).

The network is :class:`featinv.nets.sae.SparseAutoencoder`. Training follows Gao et al. 2024 ("Scaling and
evaluating sparse autoencoders"): Adam; unit-norm decoder rows (the gradient component parallel to each row is
removed before the step and the rows are renormalised after it); the encoder tied to the decoder at
initialisation; b_pre initialised to the mean of the first batch (not the geometric median: one pass, no
iterations); the AuxK loss on dead latents. The BatchTopK inference threshold follows Bussmann et al. 2024.

Units: the data are divided by one scalar, the first batch's per-coordinate standard deviation around its mean,
so the learning rate means the same for any feature scale; the returned SAE works in the data's own units (the
scalar is folded back into b_pre, b_enc and the threshold: TopK codes scale with their input).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from featinv.nets.sae import TRAINED_KINDS, SparseAutoencoder

Progress = Callable[[int, "int | None"], None]   # (vectors processed, total or None when not known yet)
DEAD_TOKENS = 10_000_000    # Gao et al.: a latent is dead after 10M tokens without firing
DEAD_INTERVALS = 100        # ... scaled down: 100 times the mean firing interval latents / top_k
THRESHOLD_WINDOW = 20       # BatchTopK threshold: running mean of 20 steps, then an EMA over ~20 (follows the drift)


def default_lr(latents: int) -> float:
    """Adam learning rate from Gao et al.'s scaling law fit: 2e-4 / sqrt(latents / 2**14)."""
    return 2e-4 / math.sqrt(latents / 2 ** 14)


def default_dead_after(latents: int, top_k: int) -> int:
    """Vectors without firing after which a latent counts as dead: Gao et al.'s 10M tokens, capped at 100 mean
    firing intervals (a latent fires once every latents / top_k vectors on average), so small SAEs on small data
    sets notice dead latents within an epoch (256 latents, k = 8: 3,200 vectors; 4,096 latents, k = 32: 12,800)."""
    return min(DEAD_TOKENS, DEAD_INTERVALS * latents // top_k)


def fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained of a batch: Σ‖x − x_hat‖² / Σ‖x − mean(x)‖² (Gao et al.'s normalised MSE)."""
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(torch.finfo(torch.float32).tiny)


@torch.no_grad()
def _rescale(sae: SparseAutoencoder, factor: float) -> None:
    """Change the data units by ``factor``: TopK codes are positively homogeneous in (x, b_pre, b_enc)."""
    for t in (sae.b_pre, sae.b_enc, sae.threshold):
        t.mul_(factor)


def _auxk_loss(sae: SparseAutoencoder, x: Tensor, x_hat: Tensor, pre: Tensor, dead: Tensor, aux_k: int) -> Tensor:
    """AuxK (Gao et al. 2024): each row's top aux_k dead latents (by pre-activation) reconstruct the residual
    x − x_hat, scored as an FVU of the residual. x, x_hat: (n, d); pre: (n, latents) detached; dead: int64 ids of
    the dead latents, at least aux_k of them."""
    n = x.shape[0]
    cols = dead[pre[:, dead].topk(aux_k, dim=1, sorted=False).indices].flatten()
    rows = torch.arange(n, device=x.device).repeat_interleave(aux_k)
    values = F.relu(sae.gather((x - sae.b_pre).detach(), pre, rows, cols))  # the centring is the main loss's
    return fvu((x - x_hat).detach(), sae.atoms_sum(values, rows, cols, n))


@torch.no_grad()
def _constrain_decoder(W_dec: torch.nn.Parameter, before_step: bool) -> None:
    """Unit-norm decoder rows: before the step, remove each row's gradient component along the row; after it,
    renormalise the rows (Gao et al. 2024)."""
    if before_step:
        if W_dec.grad is not None:
            W_dec.grad.sub_((W_dec.grad * W_dec).sum(1, keepdim=True) * W_dec)
    else:
        W_dec.div_(W_dec.norm(dim=1, keepdim=True))


def train_sae(batches: Callable[[int], Iterable[Tensor]], d: int, latents: int, top_k: int, kind: str = "topk", *,
              epochs: int = 1, lr: float | None = None, aux_k: int | None = None, aux_coef: float = 1 / 32,
              dead_after: int | None = None, device: str = "cpu", seed: int = 0, progress: Progress | None = None,
              vectors: int | None = None, clip_grad: float | None = None,
              init: SparseAutoencoder | None = None) -> tuple[SparseAutoencoder, dict]:
    """Train a TopK or BatchTopK SAE on streamed (B, d) batches.

    batches: epoch -> iterable of (B, d) float tensors (each epoch shuffled by the caller's seed), so a data set
    larger than RAM streams. lr: Adam's, default :func:`default_lr`. aux_k: dead latents in the AuxK loss, default
    d // 2 (capped at the dead count each step), 0 turns AuxK off; aux_coef: its weight (Gao et al.: 1/32).
    dead_after: vectors without firing that make a latent dead, default :func:`default_dead_after`. device: 'cpu'
    or 'cuda' (bf16 autocast on CUDA, fp32 on the CPU). seed: the initialisation (torch.Generator); the same seed
    and batches give bitwise equal weights on the CPU. progress(done_vectors, total or None) after each step;
    vectors: vectors per epoch, for that total (else known after the first epoch). clip_grad: max gradient norm
    (None: no clipping). init: an SAE to continue from (copied; its b_pre is kept, not reset to the first mean).

    Returns the SAE (eval mode, CPU, fp32) and stats: steps, vectors, seconds, loss (the last batch's FVU),
    aux_loss (the last AuxK FVU or None), dead (latents not fired in the last min(dead_after, vectors seen)
    vectors), dead_after, aux_k, lr, scale (the unit divided out), epochs."""
    if kind not in TRAINED_KINDS:
        raise ValueError(f"train_sae trains {' and '.join(TRAINED_KINDS)} SAEs, not {kind!r} (a jumprelu SAE is "
                         "imported: featinv.checkpoint.overcomplete)")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    dev = torch.device(device)
    if init is not None:
        if (init.d, init.latents, init.top_k, init.kind) != (d, latents, top_k, kind):
            raise ValueError(f"init SAE is {init!r}; expected d={d}, latents={latents}, top_k={top_k}, kind={kind}")
        sae = SparseAutoencoder.from_tensors(init.state_dict(), top_k, kind)
    else:
        sae = SparseAutoencoder(d, latents, top_k, kind, generator=torch.Generator().manual_seed(seed))
    sae.to(dev).train()
    lr = default_lr(latents) if lr is None else lr
    aux_k = d // 2 if aux_k is None else aux_k
    dead_after = default_dead_after(latents, top_k) if dead_after is None else dead_after
    opt = torch.optim.Adam(sae.parameters(), lr=lr, fused=True)  # one pass per tensor (CPU: ~5x faster than foreach)
    since_fired = torch.zeros(latents, dtype=torch.int64, device=dev)   # vectors since each latent last fired
    scale, steps, seen, losses = None, 0, 0, (None, None)
    total = None if vectors is None else vectors * epochs
    start = time.perf_counter()
    for epoch in range(epochs):
        for batch in batches(epoch):
            x = batch.to(dev, torch.float32, non_blocking=True)
            if x.ndim != 2 or x.shape[1] != d:
                raise ValueError(f"batch of shape {tuple(x.shape)}; expected (B, {d})")
            if scale is None:
                scale = _set_units(sae, x, centre=init is None)
            losses = _step(sae, opt, x / scale, since_fired, dead_after, aux_k, aux_coef, clip_grad)
            steps, seen = steps + 1, seen + x.shape[0]
            if kind == "batchtopk":
                _update_threshold(sae.threshold, losses[2], steps)
            if progress is not None:
                progress(seen, total)
        if total is None:
            total = seen * epochs
    if scale is None:
        raise ValueError("batches(0) yielded no batch")
    _rescale(sae, scale)
    loss, aux = losses[:2]
    stats = {"steps": steps, "vectors": seen, "seconds": time.perf_counter() - start, "loss": loss.item(),
             "aux_loss": None if aux is None else aux.item(),
             "dead": int((since_fired >= min(dead_after, seen)).sum()), "dead_after": dead_after, "aux_k": aux_k,
             "lr": lr, "scale": scale, "epochs": epochs}
    return sae.float().cpu().eval(), stats


def _set_units(sae: SparseAutoencoder, x: Tensor, centre: bool) -> float:
    """From the first batch x (B, d): the unit (per-coordinate standard deviation around the mean), divided out of
    the SAE's biases, and b_pre set to the batch mean (if ``centre``). Returns the unit."""
    scale = x.std(0, correction=0).pow(2).mean().sqrt().item() or 1.0
    _rescale(sae, 1 / scale)
    if centre:
        with torch.no_grad():
            sae.b_pre.copy_(x.mean(0) / scale)
    return scale


def _step(sae: SparseAutoencoder, opt: torch.optim.Optimizer, x: Tensor, since_fired: Tensor, dead_after: int,
          aux_k: int, aux_coef: float, clip_grad: float | None) -> tuple[Tensor, Tensor | None, Tensor]:
    """One Adam step on x (B, d) in training units; updates since_fired (latents,) in place. Returns the batch's
    FVU, its AuxK FVU (None without dead latents or with aux_k = 0) and the kept code values (nnz,)."""
    with torch.autocast("cuda", torch.bfloat16, enabled=x.device.type == "cuda"):
        active = sae.select(x)
        x_hat = sae.atoms_sum(active.values, active.rows, active.cols, x.shape[0]) + sae.b_pre
        loss = fvu(x, x_hat)
        since_fired.add_(x.shape[0]).index_fill_(0, active.cols[active.values > 0], 0)
        dead = (since_fired >= dead_after).nonzero().squeeze(1)
        k_aux = min(aux_k, len(dead))
        aux = _auxk_loss(sae, x, x_hat, active.pre, dead, k_aux) if k_aux else None
        objective = loss if aux is None else loss + aux_coef * aux
    opt.zero_grad(set_to_none=True)
    objective.backward()
    _constrain_decoder(sae.W_dec, before_step=True)
    if clip_grad is not None:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), clip_grad)
    opt.step()
    _constrain_decoder(sae.W_dec, before_step=False)
    return loss.detach(), None if aux is None else aux.detach(), active.values.detach()


@torch.no_grad()
def _update_threshold(threshold: Tensor, values: Tensor, step: int) -> None:
    """Bussmann et al.'s inference threshold: the mean over batches of the smallest positive value kept (a running
    mean for THRESHOLD_WINDOW steps, then an exponential moving average with weight 1 / THRESHOLD_WINDOW)."""
    smallest = values.float().masked_fill(values <= 0, float("inf")).amin()
    update = threshold + (smallest - threshold) / min(step, THRESHOLD_WINDOW)
    threshold.copy_(torch.where(smallest.isfinite(), update, threshold))


def sae_metrics(sae: SparseAutoencoder, vectors: Tensor | Iterable[Tensor], batch_size: int = 4096) -> dict:
    """Held-out quality in eval mode (BatchTopK: the threshold), accumulated in float64 over batches.

    vectors: (N, d) or an iterable of (B, d) tensors. Returns fvu (Σ‖x − x_hat‖² / Σ‖x − mean(x)‖², the mean
    over all N vectors), l0 (mean active latents per vector), dead (latents never active), dead_share, vectors."""
    chunks = vectors.split(batch_size) if isinstance(vectors, Tensor) else vectors
    dev = sae.b_pre.device
    err = sq = 0.0
    n = nnz = 0
    total = torch.zeros(sae.d, dtype=torch.float64, device=dev)
    fired = torch.zeros(sae.latents, dtype=torch.bool, device=dev)
    was_training = sae.training
    sae.eval()
    try:
        with torch.inference_mode():
            for x in chunks:
                for xb in x.split(batch_size):
                    xb = xb.to(dev, torch.float32)
                    active = sae.select(xb)  # no dense (B, latents) codes
                    x_hat = sae.atoms_sum(active.values, active.rows, active.cols, len(xb)) + sae.b_pre
                    on = active.cols[active.values > 0]
                    err += (xb - x_hat).double().pow(2).sum().item()
                    sq += xb.double().pow(2).sum().item()
                    total += xb.double().sum(0)
                    n, nnz = n + len(xb), nnz + len(on)
                    fired[on] = True
    finally:
        sae.train(was_training)
    if n == 0:
        raise ValueError("sae_metrics: no vectors")
    variance = sq - total.pow(2).sum().item() / n
    dead = int((~fired).sum())
    return {"fvu": err / variance if variance > 0 else float("nan"), "l0": nnz / n, "dead": dead,
            "dead_share": dead / sae.latents, "vectors": n}


def sparse_mixture(n: int, d: int, features: int, active: int, noise: float = 0.05, seed: int = 0,
                   nonnegative: bool = False) -> tuple[Tensor, Tensor]:
    """Synthetic vectors with a known sparse structure: x = Σ_active m_j · atom_j + noise.

    atoms: (features, d) random unit directions (non-negative ones if ``nonnegative``), drawn from ``seed``; each
    vector sums ``active`` atoms drawn uniformly (with replacement) with Exp(1) magnitudes, plus Gaussian noise of
    norm ~``noise``; ``nonnegative`` also clamps x at 0 (like maps after a ReLU). Returns (x (n, d), atoms)."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(features, d, generator=g)
    atoms = F.normalize(atoms.abs() if nonnegative else atoms, dim=1)
    idx = torch.randint(features, (n, active), generator=g)
    mags = torch.empty(n, active).exponential_(generator=g)
    x = noise / math.sqrt(d) * torch.randn(n, d, generator=g)
    for j in range(active):  # one (n, d) term at a time: no (n, active, d) tensor
        x += mags[:, j, None] * atoms[idx[:, j]]
    return (x.clamp_min(0) if nonnegative else x), atoms
