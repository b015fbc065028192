"""Composite feature maps (paper: the composite nature of features): interpolation, pasting a region,
keeping or removing channels, feature arithmetic. Each returns a feature map to reconstruct with
``Reconstructor.from_features`` under fixed keys, and :func:`feature_cosine` measures how close the
reconstruction's features come to the composed target.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from featinv.metrics import cosine_similarity_pooled, cosine_similarity_spatial
from featinv.nets.backbone import check_index


def interpolate(fa: Tensor, fb: Tensor, ts: Sequence[float]) -> Tensor:
    """(1 − t)·fa + t·fb for each t: (C, h, w) -> (T, C, h, w), or (B, C, h, w) -> (B, T, C, h, w).

    t = 0 gives fa and t = 1 gives fb exactly (bitwise), so the path's ends reconstruct as the inputs do."""
    if fa.shape != fb.shape:
        raise ValueError(f"interpolate: feature maps differ in shape, {tuple(fa.shape)} vs {tuple(fb.shape)}")
    if fa.ndim not in (3, 4):
        raise ValueError(f"interpolate: feature maps must be (C, h, w) or (B, C, h, w), got {tuple(fa.shape)}")
    t = torch.as_tensor(list(ts), dtype=fa.dtype, device=fa.device)
    a, b = fa.unsqueeze(-4), fb.unsqueeze(-4)  # (1, C, h, w) or (B, 1, C, h, w)
    tt = t.view(-1, 1, 1, 1)                   # (T, 1, 1, 1), broadcast to (T, C, h, w) / (B, T, C, h, w)
    out = (1 - tt) * a + tt * b
    out = torch.where(tt == 0, a, torch.where(tt == 1, b, out))
    return out


def paste(dst: Tensor, src: Tensor, mask: Tensor) -> Tensor:
    """dst with src blended in where mask (h, w) in [0, 1] is > 0; (…, C, h, w) each -> dst's shape.

    Where mask is 0 the result is dst and where it is 1 it is src, bitwise."""
    if dst.shape != src.shape:
        raise ValueError(f"paste: feature maps differ in shape, {tuple(dst.shape)} vs {tuple(src.shape)}")
    if mask.shape != dst.shape[-2:]:
        raise ValueError(f"paste: mask has shape {tuple(mask.shape)}, the feature grid is {tuple(dst.shape[-2:])}")
    m = mask.to(dst)
    blend = dst + m * (src - dst)
    return torch.where(m == 0, dst, torch.where(m == 1, src, blend))


def _channel_index(idx: Sequence[int] | Tensor, num_channels: int) -> Tensor:
    idx = torch.as_tensor(idx, dtype=torch.long).flatten()
    if len(idx) and (idx.min() < 0 or idx.max() >= num_channels):
        raise ValueError(f"channel indices {idx.tolist()} out of range for {num_channels} channels")
    return idx


def keep_channels(feats: Tensor, idx: Sequence[int] | Tensor, fill: float | Tensor = 0.0) -> Tensor:
    """(B, C, h, w) with every channel not in ``idx`` set to ``fill`` (scalar or (C,), e.g. a dataset mean)."""
    keep = torch.zeros(feats.shape[1], dtype=torch.bool, device=feats.device)
    keep[_channel_index(idx, feats.shape[1]).to(feats.device)] = True
    return _fill_where(feats, ~keep, fill)


def remove_channels(feats: Tensor, idx: Sequence[int] | Tensor, fill: float | Tensor = 0.0) -> Tensor:
    """(B, C, h, w) with the channels in ``idx`` set to ``fill`` (0: switched off, as after a ReLU)."""
    drop = torch.zeros(feats.shape[1], dtype=torch.bool, device=feats.device)
    drop[_channel_index(idx, feats.shape[1]).to(feats.device)] = True
    return _fill_where(feats, drop, fill)


def _fill_where(feats: Tensor, channels: Tensor, fill: float | Tensor) -> Tensor:
    value = torch.as_tensor(fill, dtype=feats.dtype, device=feats.device)
    value = value.view(1, -1, 1, 1) if value.ndim == 1 else value
    return torch.where(channels.view(1, -1, 1, 1), value, feats)


def channel_contributions(extractor, feats: Tensor, cls: int) -> Tensor:
    """(B, C, h, w) -> (C,): head weight of class ``cls`` × pooled activation, averaged over the batch.

    For a pooling + linear head these add up to the class logit minus its bias."""
    weight = extractor.head_weight()
    check_index(cls, weight.shape[0], "class index", "the classifier's classes:")
    return (weight[cls].to(feats) * feats.mean(dim=(2, 3))).mean(dim=0)


def top_channels(extractor, feats: Tensor, cls: int, k: int) -> Tensor:
    """Indices (k,) of the channels contributing most to class ``cls`` through the head (largest first)."""
    contrib = channel_contributions(extractor, feats, cls)
    if not 1 <= k <= len(contrib):
        raise ValueError(f"k={k} channels requested, the feature map has {len(contrib)}")
    return contrib.topk(k).indices


def arithmetic(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """Feature arithmetic a − b + c (same shapes), e.g. "this digit's style, that digit's class"."""
    if not a.shape == b.shape == c.shape:
        raise ValueError(f"arithmetic: shapes differ, {tuple(a.shape)}, {tuple(b.shape)}, {tuple(c.shape)}")
    return a - b + c


def feature_cosine(f1: Tensor, f2: Tensor, pooled: bool = False) -> Tensor:
    """(B, C, h, w) twice -> (B,) cosine similarity (spatial by default; featinv.jobs.evaluate's metrics)."""
    return cosine_similarity_pooled(f1, f2) if pooled else cosine_similarity_spatial(f1, f2)
