"""Concept steering in the feature map's channel space, visualised by reconstruction (paper: "FeatInv-Viz").

A direction is a unit vector d (C,) in the channel space of the classifier's feature map. Steering adds
α · s · d at every location (or only inside a spatial mask), where s is the input's mean per-location
feature norm (:func:`feature_scale`): α = 1 moves each location by one typical feature vector's length,
so α means the same for any backbone. Every α is reconstructed with the same noise (same keys), so
differences between reconstructions come from the steering alone; α = 0 is the plain reconstruction,
bit for bit.

Edited features can leave the range the backbone ever produces (e.g. negative values after a ReLU);
``clamp=(lo, hi)`` (from :func:`feature_range` of reference features) keeps the edited entries inside it.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from featinv.nets.backbone import check_index

Clamp = tuple["Tensor | float", "Tensor | float"]


def _unit(v: Tensor, what: str) -> Tensor:
    v = v.detach().float()
    norm = v.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError(f"{what}: direction has zero (or non-finite) length; the two feature sets do not differ")
    return v / norm


def _channel_vectors(feats: Tensor, pooled: bool = False) -> Tensor:
    """(N, C, h, w) -> (N·h·w, C) per-location vectors, or (N, C) pooled; (N, C) passes through."""
    if feats.ndim == 2:
        return feats.float()
    if feats.ndim != 4:
        raise ValueError(f"features must be (N, C, h, w) maps or (N, C) vectors, got shape {tuple(feats.shape)}")
    return feats.float().mean(dim=(2, 3)) if pooled else feats.float().permute(0, 2, 3, 1).flatten(0, 2)


def class_direction(extractor, cls: int) -> Tensor:
    """The head's weight vector of class ``cls``, normalised -> (C,) unit vector."""
    weight = extractor.head_weight()
    check_index(cls, weight.shape[0], "class index", "the classifier's classes:")
    return _unit(weight[cls], f"class {cls}")


def channel_direction(num_channels: int, index: int) -> Tensor:
    """The unit vector of one channel -> (C,)."""
    check_index(index, num_channels, "channel index", "the feature map's channels:")
    d = torch.zeros(num_channels)
    d[index] = 1.0
    return d


def mean_difference_direction(feats_concept: Tensor, feats_other: Tensor) -> Tensor:
    """Normalised difference of the mean channel vectors: concept minus other -> (C,) unit vector.

    feats_*: (N, C, h, w) maps (all locations count) or (N, C) vectors."""
    a, b = _channel_vectors(feats_concept), _channel_vectors(feats_other)
    return _unit(a.mean(dim=0) - b.mean(dim=0), "mean difference")


def probe_direction(feats_concept: Tensor, feats_other: Tensor, steps: int = 100, l2: float = 1e-3,
                    pooled: bool = False) -> Tensor:
    """Concept activation vector: weight of a logistic regression concept vs. other -> (C,) unit vector.

    feats_*: (N, C, h, w) (per-location vectors, or pooled with ``pooled=True``) or (N, C). Inputs are
    standardised per channel for conditioning; the weight is mapped back to the raw feature space
    (w / σ), so the direction is that of the raw-space decision boundary's normal. Full-batch L-BFGS,
    deterministic (Kim et al. 2018, TCAV, use a linear classifier the same way)."""
    a, b = _channel_vectors(feats_concept, pooled), _channel_vectors(feats_other, pooled)
    if not len(a) or not len(b):
        raise ValueError(f"probe_direction needs examples of both sets, got {len(a)} concept and {len(b)} other")
    x = torch.cat([a, b])
    y = torch.cat([torch.ones(len(a)), torch.zeros(len(b))])
    mu, sigma = x.mean(dim=0), x.std(dim=0).clamp(min=1e-6)
    xs = (x - mu) / sigma
    # Balanced classes: each set weighs half, whatever its size.
    weights = torch.cat([torch.full((len(a),), 0.5 / len(a)), torch.full((len(b),), 0.5 / len(b))])
    w = torch.zeros(x.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (F.binary_cross_entropy_with_logits(xs @ w + bias, y, reduction="none") * weights).sum()
        loss = loss + l2 * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return _unit(w.detach() / sigma, "probe")


def feature_scale(feats: Tensor) -> Tensor:
    """(B, C, h, w) -> (B,) mean over locations of the channel vector's L2 norm (the unit of α)."""
    return feats.float().norm(dim=1).mean(dim=(1, 2))


def feature_range(feats_reference: Tensor, per_location: bool = False) -> tuple[Tensor, Tensor]:
    """Features the backbone produced (N, C, h, w) -> (lo, hi): per channel (C,) over N and locations, or
    with ``per_location`` per channel and location (C, h, w) over N (tighter; needs many reference maps)."""
    if per_location:
        if feats_reference.ndim != 4:
            raise ValueError(f"per-location ranges need (N, C, h, w) maps, got {tuple(feats_reference.shape)}")
        f = feats_reference.float()
        return f.min(dim=0).values, f.max(dim=0).values
    v = _channel_vectors(feats_reference)
    return v.min(dim=0).values, v.max(dim=0).values


def box_mask(box_xyxy: Sequence[float], image_size: int | tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """A box (x0, y0, x1, y1) in image pixels -> (h, w) float in [0, 1]: the share of each cell it covers.

    image_size: S or (H, W) of the image the box refers to; grid: (h, w) of the feature map."""
    H, W = (image_size, image_size) if isinstance(image_size, int) else image_size
    x0, y0, x1, y1 = map(float, box_xyxy)
    if not (0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H):
        raise ValueError(f"mask box {tuple(box_xyxy)} must satisfy 0 <= x0 < x1 <= {W}, 0 <= y0 < y1 <= {H} "
                         f"(image {W}x{H})")
    h, w = grid

    def cover(lo: float, hi: float, size: int, n: int) -> Tensor:
        edges = torch.arange(n + 1, dtype=torch.float64) * size / n
        return ((torch.minimum(edges[1:], torch.tensor(hi)) - torch.maximum(edges[:-1], torch.tensor(lo)))
                .clamp(min=0) / (size / n))

    return (cover(y0, y1, H, h)[:, None] * cover(x0, x1, W, w)[None, :]).float()


def mask_from_image(mask_image: Tensor, grid: tuple[int, int]) -> Tensor:
    """(H, W) or (1, H, W) mask in [0, 1] (image resolution) -> (h, w): the mask's mean over each cell."""
    m = mask_image.float()
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2:
        raise ValueError(f"mask image must be (H, W) or (1, H, W), got shape {tuple(mask_image.shape)}")
    if m.shape[0] < grid[0] or m.shape[1] < grid[1]:
        raise ValueError(f"mask image {tuple(m.shape)} is smaller than the feature grid {tuple(grid)}")
    return F.adaptive_avg_pool2d(m[None, None], grid)[0, 0].clamp(0, 1)


def _clamp_bounds(clamp: Clamp, feats: Tensor) -> tuple[Tensor, Tensor]:
    lo, hi = (torch.as_tensor(v, dtype=feats.dtype, device=feats.device) for v in clamp)
    return (lo.view(-1, 1, 1) if lo.ndim == 1 else lo), (hi.view(-1, 1, 1) if hi.ndim == 1 else hi)


def clamp_changed(edited: Tensor, feats: Tensor, clamp: Clamp) -> Tensor:
    """The entries an edit changed (edited != feats, both (..., C, h, w)) clamped into ``clamp``'s (lo, hi), as
    :func:`steer` clamps; the others stay bit-identical (code edits, :mod:`featinv.analysis.directions`)."""
    lo, hi = _clamp_bounds(clamp, feats)
    return torch.where(edited != feats, torch.maximum(torch.minimum(edited, hi), lo), feats)


def steer(feats: Tensor, direction: Tensor, alphas: Sequence[float], mask: Tensor | None = None,
          clamp: Clamp | None = None) -> Tensor:
    """feats (B, C, h, w) + α · feature_scale · direction for each α -> (B, A, C, h, w).

    mask: (h, w) weights in [0, 1] (the edit is scaled by them; 0 leaves a location untouched, bitwise).
    clamp: (lo, hi), scalars, (C,) per channel or (C, h, w) (:func:`feature_range`): edited entries are
    clamped into the range (a ReLU backbone's map has no negative entries, say); entries the
    edit does not change (α = 0, outside the mask, zero components of the direction) stay bit-identical."""
    if feats.ndim != 4:
        raise ValueError(f"feats must be (B, C, h, w), got shape {tuple(feats.shape)}")
    b, c, h, w = feats.shape
    if direction.shape != (c,):
        raise ValueError(f"direction has shape {tuple(direction.shape)}, the feature map has {c} channels")
    if mask is not None and mask.shape != (h, w):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, the feature grid is ({h}, {w})")
    alpha = torch.as_tensor(list(alphas), dtype=feats.dtype, device=feats.device)
    scale = feature_scale(feats).to(feats.dtype)
    d = direction.to(feats)
    delta = alpha.view(1, -1, 1, 1, 1) * scale.view(-1, 1, 1, 1, 1) * d.view(1, 1, c, 1, 1)
    if mask is not None:
        delta = delta * mask.to(feats).view(1, 1, 1, h, w)
    delta = delta.expand(b, len(alpha), c, h, w)
    base = feats[:, None].expand_as(delta)
    edited = base + delta
    if clamp is not None:
        lo, hi = _clamp_bounds(clamp, feats)
        edited = torch.maximum(torch.minimum(edited, hi), lo)
    return torch.where(delta != 0, edited, base)


@torch.no_grad()
def steer_and_reconstruct(reconstructor, feats: Tensor, direction: Tensor, alphas: Sequence[float],
                          keys: Sequence[str], mask: Tensor | None = None, clamp: Clamp | None = None,
                          steered: Tensor | None = None) -> Tensor:
    """Reconstruct every α of :func:`steer` with the same keys -> samples (B, A, K, 3, H, W) in [0, 1].

    Each α is one ``from_features`` call over the same B rows, so α = 0 equals ``from_features(feats,
    keys)`` bit for bit (same shapes, same noise). ``steered`` reuses an already computed steer()."""
    steered = steer(feats, direction, alphas, mask, clamp) if steered is None else steered
    return torch.stack([reconstructor.from_features(steered[:, a], keys) for a in range(steered.shape[1])], dim=1)
