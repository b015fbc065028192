"""How well a feature-space map does, on held-out images: in feature space, for the classifier, after decoding.

- :func:`feature_scores`: R² (1 − SSE / the targets' variance around their channel means), cosine (over channels
  at each position, averaged: the evaluation's ``cos_spatial``) and relative error |ŷ − y| / |y| per map;
- :func:`semantic_agreement`: the classifier's label on the mapped maps against its label on the targets;
- :func:`decoded_scores`: FeatInv reconstructions of the mapped maps, beside reconstructions of the targets' own
  maps with the same seeds: the classifier's label and feature cosine on each, and SSIM between the two
  (scikit-image; LPIPS, which FeatMap also reports, needs network weights that cannot be had offline);
- :func:`linear_geometry`: a linear map's effective rank (exp of the entropy of s_i²/Σs_j², FeatMap), the top
  singular direction's share of the energy, and the share of the output's norm from the bias;
- :func:`spectrum_plot`: linear maps' normalised singular spectra, one line each (PIL, no plotting library).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from featinv.analysis.feature_maps import to_grid
from featinv.metrics import cosine_similarity_spatial

SSIM_NEEDS = "SSIM needs scikit-image (pip install scikit-image)"


def feature_scores(pred: Tensor, target: Tensor) -> dict[str, float]:
    """pred, target: (B, C, h, w) -> {"r2", "cosine", "rel_error"} over the B maps."""
    pred, target = pred.float(), target.float()
    sst = (target - target.mean(dim=(0, 2, 3), keepdim=True)).square().sum()
    rel = (pred - target).flatten(1).norm(dim=1) / target.flatten(1).norm(dim=1).clamp_min(1e-12)
    return {"r2": float(1 - (pred - target).square().sum() / sst.clamp_min(1e-30)),
            "cosine": float(cosine_similarity_spatial(pred, target).mean()), "rel_error": float(rel.mean())}


@torch.no_grad()
def semantic_agreement(extractor, pred: Tensor, target: Tensor) -> float | None:
    """The share of maps whose top-1 class (the extractor's head on the map) is the target map's; None without a
    head (e.g. a feature-only backbone)."""
    try:
        a, b = extractor.logits_from_features(pred.float()), extractor.logits_from_features(target.float())
    except (ValueError, NotImplementedError, AttributeError):
        return None
    return float((a.argmax(1) == b.argmax(1)).float().mean())


def ssim(a: Tensor, b: Tensor) -> float | None:
    """Mean SSIM of image pairs a, b: (N, 3, H, W) in [0, 1] (scikit-image, 7-px window, or the image's side when
    smaller); None when scikit-image is missing (:data:`SSIM_NEEDS`)."""
    try:
        from skimage.metrics import structural_similarity
    except ImportError:
        return None
    a_np, b_np = (t.detach().float().cpu().permute(0, 2, 3, 1).numpy().astype(np.float64) for t in (a, b))
    side = min(a_np.shape[1:3])
    win = min(7, side if side % 2 else side - 1)
    return float(np.mean([structural_similarity(x, y, channel_axis=2, data_range=1.0, win_size=win)
                          for x, y in zip(a_np, b_np)]))


@torch.no_grad()
def decoded_scores(reconstructor, extractor, mapped: Tensor, own: Tensor, keys: Sequence[str],
                   own_samples: Tensor | None = None) -> tuple[dict[str, float | None], Tensor, Tensor]:
    """Reconstruct the mapped maps and the targets' own maps (same seeds, first of K samples) and score both.

    mapped, own: (N, C, h, w) maps in the decoder's space (own: the target images' maps, which the reconstructions
    are compared with); keys: N names seeding the noise. own_samples: reconstructions
    of ``own`` already made (reused across map types). -> (scores, reconstructions of mapped, of own), each
    (N, 3, H, W) in [0, 1]. Scores: agreement and cosine of each, SSIM(mapped's, own's)."""
    rec_m = reconstructor.from_features(mapped, keys)[:, 0]
    rec_o = reconstructor.from_features(own, keys)[:, 0] if own_samples is None else own_samples
    label = extractor.logits_from_features(own.float()).argmax(1)
    out = {}
    for name, rec in (("mapped", rec_m), ("own", rec_o)):
        feats = extractor(rec.to(extractor.mean.device)).float()
        out[f"decoded_agreement_{name}"] = float((extractor.logits_from_features(feats).argmax(1) == label)
                                                 .float().mean())
        out[f"decoded_cosine_{name}"] = float(cosine_similarity_spatial(feats, own).mean())
    out["ssim_to_own"] = ssim(rec_m, rec_o)
    return out, rec_m, rec_o


@torch.no_grad()
def linear_geometry(fmap, inputs: Tensor) -> dict:
    """A linear map (``.matrix`` W (C_out, C_in), ``.bias`` b) on its input maps (B, C_in, h, w) -> effective rank
    (exp of the entropy of p_i = s_i²/Σs_j²), the top singular value's energy share p_1, the bias share (mean over
    positions of |b| / (|W·x| + |b|): 0 = the map is all W·x, 1 = all offset) and the singular values (list)."""
    s = torch.linalg.svdvals(fmap.matrix.double())
    p = s.square() / s.square().sum().clamp_min(1e-300)
    entropy = -(p * p.clamp_min(1e-300).log()).sum()
    x = to_grid(inputs.float(), fmap.grid).flatten(2).transpose(1, 2).reshape(-1, fmap.in_channels)
    wx = (x @ fmap.matrix.T.float()).norm(dim=1)
    bn = fmap.bias.float().norm()
    return {"effective_rank": float(entropy.exp()), "energy_top1": float(p[0]),
            "bias_share": float((bn / (wx + bn).clamp_min(1e-12)).mean()), "singular_values": s.float().tolist()}


PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
           "#bcbd22"]


def spectrum_plot(spectra: dict[str, Sequence[float]], title: str, size: tuple[int, int] = (560, 340)) -> Image.Image:
    """Normalised singular spectra s_i / s_1 (log scale, 1e-4..1) of linear maps, one coloured line each, with a
    legend -> an RGB picture."""
    w, h = size
    left, right, top, bottom = 46, 150, 24, 30
    img = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    draw.text((left, 6), title, fill="black", font=font)
    x0, x1, y0, y1 = left, w - right, top, h - bottom
    draw.rectangle([x0, y0, x1, y1], outline="black")
    lo = -4.0
    for e in range(0, int(lo) - 1, -1):
        y = y0 + (y1 - y0) * (-e) / (-lo)
        draw.line([x0 - 3, y, x0, y], fill="black")
        draw.text((4, y - 5), f"1e{e}" if e else "1", fill="black", font=font)
    longest = max((len(s) for s in spectra.values()), default=1)
    draw.text((x0, y1 + 6), "1", fill="black", font=font)
    draw.text((x1 - 20, y1 + 6), str(longest), fill="black", font=font)
    draw.text(((x0 + x1) // 2 - 40, y1 + 14), "singular value index", fill="black", font=font)
    for i, (name, values) in enumerate(spectra.items()):
        s = np.asarray(values, dtype=np.float64)
        s = np.clip(s / max(s[0], 1e-300), 10 ** lo, 1.0)
        xs = x0 + (x1 - x0) * np.arange(len(s)) / max(longest - 1, 1)
        ys = y0 + (y1 - y0) * (-np.log10(s)) / (-lo)
        colour = PALETTE[i % len(PALETTE)]
        draw.line(list(zip(xs.tolist(), ys.tolist())), fill=colour, width=2)
        draw.line([x1 + 8, y0 + 6 + 12 * i, x1 + 24, y0 + 6 + 12 * i], fill=colour, width=2)
        draw.text((x1 + 28, y0 + 12 * i), name[:20], fill="black", font=font)
    return img

