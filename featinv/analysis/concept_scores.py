"""How much a concept basis matters: each concept's importance for each class (removal and gradient × code)
and the basis's completeness (variance explained, the classifier's agreement on decoded maps)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from featinv.analysis.concept_edits import remove
from featinv.analysis.concepts import ConceptBasis


def concept_importance(basis: ConceptBasis, extractor, feats: Tensor, labels: Tensor, codes: Tensor | None = None,
                       num_classes: int | None = None, chunk: int = 256) -> dict[str, Tensor]:
    """How much each class's logit needs each concept -> {'removal', 'gradient', 'count'}.

    removal (k, classes): mean over the class's images of logit_c(feats) - logit_c(feats without concept i)
    (:func:`remove`); gradient (k, classes): the first-order estimate, Σ over locations of
    ⟨∂logit_c/∂feats, atom_i⟩ · code_i (exact for a head linear in the map); count (classes,): images
    per class (a class without images gets NaN). feats (N, C, h, w); labels (N,) int64 class indices."""
    if labels.shape != (feats.shape[0],):
        raise ValueError(f"labels have shape {tuple(labels.shape)}, expected ({feats.shape[0]},): one per map")
    codes = basis.encode(feats) if codes is None else codes
    labels = labels.to(feats.device).long()
    rem = []
    with torch.no_grad():
        for f, c, y in zip(feats.split(chunk), codes.split(chunk), labels.split(chunk)):
            logits = extractor.logits_from_features(f).float()
            num_classes = num_classes or logits.shape[1]
            own = y[:, None]                                               # each image's own class
            base = logits.gather(1, own)[:, 0]
            rem.append(torch.stack([base - extractor.logits_from_features(remove(f, basis, i, c)).float()
                                    .gather(1, own)[:, 0] for i in range(basis.k)], dim=1))
    grads = []
    with torch.enable_grad():
        for f, y in zip(feats.split(chunk), labels.split(chunk)):
            f = f.detach().float().requires_grad_(True)
            logits = extractor.logits_from_features(f)
            (g,) = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), f)
            grads.append(g)
    along = torch.einsum("nchw,kc->nkhw", torch.cat(grads), basis.atoms.to(feats.device))
    est = (along * codes.to(along)).sum(dim=(2, 3))                       # (N, k)
    onehot = F.one_hot(labels, num_classes).float()                        # (N, classes)
    count = onehot.sum(dim=0)
    mean = lambda per_image: (per_image.T @ onehot) / count               # noqa: E731 -- (N, k) -> (k, classes)
    return {"removal": mean(torch.cat(rem)).cpu(), "gradient": mean(est).cpu(), "count": count.cpu()}


@torch.no_grad()
def completeness(basis: ConceptBasis, feats: Tensor, extractor=None, codes: Tensor | None = None) -> dict[str, float]:
    """How much of the maps the basis holds, and how sparsely -> {'variance_explained', 'fvu', 'l0', 'dead',
    'dead_share', 'agreement'}.

    fvu (fraction of variance unexplained): ||feats - decode(encode(feats))||² / ||feats - channel mean||², and
    variance_explained = 1 - fvu; l0: mean non-zero codes per location; dead: concepts never active on these
    maps; agreement (with an extractor): the share of maps whose decoded map gets the same top-1 class as the
    map itself."""
    codes = basis.encode(feats) if codes is None else codes
    rec = basis.decode(codes).to(feats.device)
    f = feats.float()
    total = (f - f.mean(dim=(0, 2, 3), keepdim=True)).square().sum()
    fvu = float((f - rec).square().sum() / total.clamp(min=1e-12))
    active = codes != 0
    dead = int((~active.any(dim=(0, 2, 3))).sum())
    out = {"variance_explained": 1 - fvu, "fvu": fvu, "l0": float(active.sum(1).float().mean()), "dead": dead,
           "dead_share": dead / basis.k}
    if extractor is not None:
        top = torch.cat([extractor.logits_from_features(c).argmax(1) for c in f.split(256)])
        top_rec = torch.cat([extractor.logits_from_features(c).argmax(1) for c in rec.split(256)])
        out["agreement"] = float((top == top_rec).float().mean())
    return out
