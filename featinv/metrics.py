"""What reconstructions are scored by: feature cosine similarity (pooled, spatial), top-k agreement,
the Fréchet distance (FID), and what the backbone reads in images (:func:`to_backbone` brings any image to its
input size, :func:`read_back` returns its feature maps and logits). Used by feature guidance, the jobs, the
analyses, the demo and the app alike."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from featinv.nets.backbone import FeatureExtractor

FID_NEEDS = ("torchmetrics' FrechetInceptionDistance needs the torch-fidelity package "
             "(pip install torch-fidelity) and its Inception weights (downloaded on first use, "
             "or pass --fid-weights PATH to a local pt_inception-2015-12-05 file)")


def cosine_similarity_pooled(f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
    """f1, f2: (B, C, h, w) -> (B,) cosine of the global-average-pooled feature vectors."""
    return F.cosine_similarity(f1.float().mean(dim=(2, 3)), f2.float().mean(dim=(2, 3)), dim=1)


def cosine_similarity_spatial(f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
    """f1, f2: (B, C, h, w) -> (B,) cosine over channels at each position, averaged over positions."""
    return F.cosine_similarity(f1.float(), f2.float(), dim=1).mean(dim=(1, 2))


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, torch.Tensor]:
    """logits: (B, N), labels: (B,) int -> {k: (B,) bool, label among the k highest logits}."""
    top = logits.topk(max(ks), dim=1).indices
    hits = top == labels[:, None]
    return {k: hits[:, :k].any(dim=1) for k in ks}


def compare_outputs(f_orig: torch.Tensor, l_orig: torch.Tensor, f_rec: torch.Tensor,
                    l_rec: torch.Tensor) -> dict[str, torch.Tensor]:
    """The per-reconstruction metrics of evaluation, the demo and the analyses, row by row.

    f_*: (B, C, h, w) feature maps, l_*: (B, N) logits of B originals and their B reconstructions (the
    caller repeats an original's row once per reconstruction) -> {"cos_pooled", "cos_spatial": (B,) float32,
    "pred_original", "pred_reconstruction": (B,) int64 top-1 classes, "agree": (B,) bool, same top-1}."""
    pred_o, pred_r = l_orig.argmax(dim=1), l_rec.argmax(dim=1)
    return {"cos_pooled": cosine_similarity_pooled(f_orig, f_rec),
            "cos_spatial": cosine_similarity_spatial(f_orig, f_rec),
            "pred_original": pred_o, "pred_reconstruction": pred_r, "agree": pred_o == pred_r}


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """||μ1−μ2||² + tr(Σ1) + tr(Σ2) − 2·tr((Σ1 Σ2)^½) between two Gaussians; (D,), (D, D) each.

    tr((Σ1 Σ2)^½) = tr((Σ1^½ Σ2 Σ1^½)^½): the inner matrix is symmetric PSD, so eigh suffices (float64)."""
    mu1, mu2, sigma1, sigma2 = (x.double() for x in (mu1, mu2, sigma1, sigma2))
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.numel(), mu1.numel()) or mu1.shape != mu2.shape:
        raise ValueError(f"frechet_distance: shapes mu1 {tuple(mu1.shape)}, sigma1 {tuple(sigma1.shape)}, "
                         f"mu2 {tuple(mu2.shape)}, sigma2 {tuple(sigma2.shape)} do not fit (D,), (D, D)")
    root = _sqrtm_psd(sigma1)
    inner = root @ sigma2 @ root
    tr_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * tr_sqrt).item()


def gaussian_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (N, D) -> mean (D,) and covariance (D, D), float64."""
    x = x.double()
    return x.mean(dim=0), torch.cov(x.T, correction=1).reshape(x.shape[1], x.shape[1])


def make_fid(device: torch.device | str = "cpu", weights: str | None = None):
    """(torchmetrics FrechetInceptionDistance, None), or (None, message saying what is missing)."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        return FrechetInceptionDistance(feature=2048, normalize=True,
                                        feature_extractor_weights_path=weights).to(device), None
    except Exception as e:  # any failure (package, download, file) means: no FID, never a made-up one
        return None, f"FID unavailable: {FID_NEEDS}. Error: {type(e).__name__}: {e}"


def to_backbone(images01: torch.Tensor, size: int, clamp: bool = False) -> torch.Tensor:
    """(..., 3, H, W) in [0, 1] -> (N, 3, size, size) float32: the images at the backbone's input size.

    Bilinear and antialiased (a no-op at that size), so that reconstructions at the model's output size and
    originals at the saved size are classified on equal terms. clamp: cut the resampling's overshoot back to
    [0, 1]; off where gradients must pass (feature guidance), off in evaluation. Differentiable."""
    x = images01.reshape(-1, *images01.shape[-3:]).float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        if clamp:
            x = x.clamp(0, 1)
    return x


@torch.no_grad()
def read_back(extractor: FeatureExtractor, images01: torch.Tensor, clamp: bool = False,
              chunk: int | None = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (..., 3, H, W) in [0, 1] -> what the classifier reads in them: feature maps (..., C, h, w) and
    logits (..., classes), float32 on the extractor's device.

    Resized by :func:`to_backbone` (``clamp`` as there); the backbone runs on ``chunk`` images at a time
    (None: all at once)."""
    lead = images01.shape[:-3]
    x = to_backbone(images01.to(extractor.mean.device), extractor.image_size, clamp)
    feats, logits = [], []
    for part in x.split(chunk) if chunk else (x,):
        feats.append(extractor(part).float())
        logits.append(extractor.classify(part).float())
    feats, logits = torch.cat(feats), torch.cat(logits)
    return feats.view(*lead, *feats.shape[1:]), logits.view(*lead, -1)


def backbone_outputs(extractor: FeatureExtractor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """images (N, 3, H, W) in [0, 1] -> feature maps (N, C, h, w) and logits (N, classes), float32 on CPU:
    :func:`read_back` in one batch (the caller sizes its batches), unclamped, as evaluation scores."""
    feats, logits = read_back(extractor, images, chunk=None)
    return feats.cpu(), logits.cpu()
