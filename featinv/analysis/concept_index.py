"""The concept index: per concept of a basis, how often and how strongly it fires, where (its top activating
images with their codes over the grid) and which classes need it, in one streamed pass over feature maps.

Only one batch's codes (B, k, h, w) exist at a time, so k may run to thousands and the maps to tens of thousands:
the pass keeps running sums (active locations, summed codes, per-class importance) and a running top-T of images
per concept, merged batch by batch. Importance is the first-order estimate of the logit drop on removal,
⟨∂logit_c/∂feats, atom_i⟩ · code_i summed over the grid (the 'gradient' estimate of
:func:`featinv.analysis.concept_scores.concept_importance`; exact for a head linear in the map), averaged over
the class's maps; :func:`exact_removal` gives the true drop for a few concepts. With ``quality`` the pass also
streams the held-out quality that :func:`~featinv.analysis.concept_scores.completeness` computes on codes held
whole.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from featinv.analysis.concepts import ConceptBasis

SUMMARY_CLASSES = 3   # classes per concept in the summary (the basis file's stats["index"])


@dataclass(frozen=True, eq=False)
class ConceptIndex:
    """What :func:`concept_index` found, on the CPU. Images are numbered in the order the pass read them.

    frequency (k,): share of the locations where the code is non-zero; mean_code (k,): mean code over those
    locations (0 for a concept never active); top_images (k, T) int64: the images with the highest peak code
    over the grid, best first (ties: the earlier image; -1 where fewer than T images were read); top_peaks (k, T)
    their peak codes; top_grids (k, T, h, w) their codes over the grid; importance (k, classes): mean over the
    class's maps of the first-order logit drop on removal (NaN: a class without maps), None without an
    extractor; class_counts (classes,): maps per class; quality: the streamed completeness (``quality=True``)."""

    images: int
    grid: tuple[int, int]
    frequency: Tensor
    mean_code: Tensor
    top_images: Tensor
    top_peaks: Tensor
    top_grids: Tensor
    importance: Tensor | None = None
    class_counts: Tensor | None = None
    quality: dict | None = None

    @property
    def k(self) -> int:
        return len(self.frequency)

    @property
    def top_locations(self) -> Tensor:
        """(k, T) int64: where each top image's code peaks, as a row-major grid index y * w + x."""
        return self.top_grids.flatten(2).argmax(dim=2)

    def top_classes(self, n: int = SUMMARY_CLASSES) -> tuple[list[list[int]], list[list[float]]]:
        """Per concept the up to n classes whose logit falls most on its removal (a positive drop), largest
        first, and their drops -> (k lists of classes, k lists of drops)."""
        if self.importance is None or self.importance.shape[1] == 0:
            return [[] for _ in range(self.k)], [[] for _ in range(self.k)]
        drops = torch.nan_to_num(self.importance.float(), nan=float("-inf"))
        order = drops.argsort(dim=1, descending=True, stable=True)[:, :n]
        pairs = [[(c, v) for c, v in zip(o, vs) if v > 0] for o, vs in zip(order.tolist(), drops.gather(1, order)
                                                                              .tolist())]
        return [[c for c, _ in p] for p in pairs], [[v for _, v in p] for p in pairs]

    def summary(self, n: int = SUMMARY_CLASSES) -> dict:
        """The compact index a basis file keeps as stats["index"]: {"images": int, "frequency": [k floats],
        "mean_code": [k floats], "classes": [[up to n class ints per concept, largest logit drop first]],
        "importance": [k floats, the largest of those drops; 0.0 where no class's logit falls]}."""
        classes, drops = self.top_classes(n)
        return {"images": self.images, "frequency": _rounded(self.frequency), "mean_code": _rounded(self.mean_code),
                "classes": classes, "importance": _rounded(torch.tensor([d[0] if d else 0.0 for d in drops]))}

    def to_json(self, names: Sequence[str] | None = None, full: bool = False) -> dict:
        """The index as plain JSON values (floats to 4-6 significant digits, NaN as None): the summary, the drops of
        its classes, the top images, their peak codes and locations. ``names``: the images' names, in the order the
        pass read them. full: also each top image's grid of codes (k, T, h, w) and the importance of every class
        (k, classes), which run to millions of numbers for thousands of concepts and classes."""
        out = {"k": self.k, "grid": list(self.grid), **self.summary(),
               "drops": [_rounded(torch.tensor(d)) for d in self.top_classes()[1]],
               "top_images": self.top_images.tolist(), "top_peaks": _rounded(self.top_peaks),
               "top_locations": self.top_locations.tolist(),
               "class_counts": None if self.class_counts is None else self.class_counts.int().tolist(),
               "quality": self.quality}
        if full:
            out["top_grids"] = _rounded(self.top_grids, 4)
            out["importance_per_class"] = None if self.importance is None else _rounded(self.importance)
        if names is not None:
            if len(names) != self.images:
                raise ValueError(f"{len(names)} image names for an index of {self.images} images")
            out["image_names"] = list(names)
        return out


def _rounded(t: Tensor, digits: int = 6):
    """A tensor as nested lists of floats to ``digits`` significant digits (NaN / inf as None: strict JSON)."""
    def one(v: float):
        return float(f"{v:.{digits}g}") if v == v and abs(v) != float("inf") else None
    flat = [one(v) for v in t.detach().double().flatten().tolist()]
    if t.ndim <= 1:
        return flat if t.ndim else flat[0]
    return _nest(flat, list(t.shape))


def _nest(flat: list, shape: list[int]) -> list:
    """A flat list -> nested lists of ``shape`` (row-major)."""
    if len(shape) == 1 or shape[0] == 0:
        return flat if len(shape) == 1 else []
    step = len(flat) // shape[0]
    return [_nest(flat[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


class _Running:
    """The index's running sums and top-T while batches stream through (on the codes' device)."""

    def __init__(self, basis: ConceptBasis, extractor, top: int, quality: bool):
        if top < 1:
            raise ValueError(f"top={top}: the index keeps at least one image per concept")
        self.basis, self.extractor, self.top, self.quality = basis, extractor, top, quality
        self.seen, self.grid = 0, None

    def _start(self, codes: Tensor) -> None:
        k, dev = self.basis.k, codes.device
        self.grid = tuple(codes.shape[2:])
        dd = dict(device=dev, dtype=torch.float64)
        self.count, self.total = torch.zeros(k, **dd), torch.zeros(k, **dd)
        self.peaks = torch.zeros(k, 0, device=dev)
        self.images = torch.zeros(k, 0, dtype=torch.long, device=dev)
        self.grids = torch.zeros(k, 0, codes.shape[2] * codes.shape[3], device=dev)
        self.imp, self.counts = None, None
        c = self.basis.channels
        self.err, self.ch_sum, self.ch_sq, self.agree = 0.0, torch.zeros(c, **dd), torch.zeros(c, **dd), 0

    def add(self, feats: Tensor, labels: Tensor | None) -> None:
        codes = self.basis.encode(feats)                                    # (B, k, h, w): this batch only
        if self.grid is None:
            self._start(codes)
        elif tuple(codes.shape[2:]) != self.grid:
            raise ValueError(f"feature maps of shape {tuple(feats.shape)}: the index's earlier maps have a "
                             f"{self.grid[0]}x{self.grid[1]} grid")
        flat = codes.flatten(2)                                             # (B, k, L)
        self.count += (flat != 0).sum(dim=(0, 2))
        self.total += flat.sum(dim=(0, 2), dtype=torch.float64)             # inactive codes add 0
        self._merge(flat)
        logits = None
        if self.extractor is not None:
            logits = self._importance(feats, codes, labels)
        if self.quality:
            self._quality(feats, codes, logits)
        self.seen += len(feats)

    def _merge(self, flat: Tensor) -> None:
        """Merge this batch's peak codes into the running top-T per concept. A stable sort of [kept, new]
        (both in reading order) keeps ties with the earlier image, so the result never depends on the batch
        size (torch.topk's order among ties is unspecified)."""
        b, k, _ = flat.shape
        kept = self.peaks.shape[1]
        values = torch.cat([self.peaks, flat.amax(dim=2).T], dim=1)          # (k, kept + B)
        order = values.sort(dim=1, descending=True, stable=True).indices[:, :self.top]
        rows = torch.arange(k, device=flat.device)[:, None]
        new = flat[(order - kept).clamp(min=0), rows]                       # (k, T, L) from this batch
        if kept:
            new = torch.where((order < kept)[..., None], self.grids[rows, order.clamp(max=kept - 1)], new)
        numbers = torch.arange(self.seen, self.seen + b, device=flat.device).expand(k, b)
        self.images = torch.cat([self.images, numbers], dim=1).gather(1, order)
        self.peaks, self.grids = values.gather(1, order), new

    def _importance(self, feats: Tensor, codes: Tensor, labels: Tensor | None) -> Tensor:
        """Accumulate, per class, Σ over its maps of ⟨∂logit_y/∂feats, atom_i⟩ · code_i over the grid -> logits."""
        f = feats.detach().float().requires_grad_(True)
        with torch.enable_grad():
            logits = self.extractor.logits_from_features(f).float()
            classes = logits.shape[1]
            y = logits.argmax(dim=1) if labels is None else labels.to(logits.device).long()
            if len(y) and (y.min() < 0 or y.max() >= classes):
                raise ValueError(f"labels must be class indices in 0..{classes - 1} (the classifier's "
                                 f"{classes} classes), got {int(y.min())}..{int(y.max())}")
            (grad,) = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), f)
        along = torch.einsum("nchw,kc->nkhw", grad, self.basis.atoms.to(grad.device))
        est = (along * codes.to(along)).sum(dim=(2, 3)).double()              # (B, k) estimated drops
        onehot = F.one_hot(y, classes).double()                              # (B, classes)
        if self.imp is None:
            self.imp = torch.zeros(self.basis.k, classes, dtype=torch.float64, device=est.device)
            self.counts = torch.zeros(classes, dtype=torch.float64, device=est.device)
        self.imp += est.T @ onehot
        self.counts += onehot.sum(dim=0)
        return logits.detach()

    def _quality(self, feats: Tensor, codes: Tensor, logits: Tensor | None) -> None:
        """Accumulate what completeness() needs: squared error, per-channel sums, agreeing top-1s."""
        f = feats.detach().float()
        rec = self.basis.decode(codes).to(f.device)
        self.err += float((f - rec).double().square().sum())
        self.ch_sum += f.sum(dim=(0, 2, 3), dtype=torch.float64).to(self.ch_sum.device)
        self.ch_sq += f.double().square().sum(dim=(0, 2, 3)).to(self.ch_sq.device)
        if logits is not None:
            top_rec = self.extractor.logits_from_features(rec).argmax(dim=1)
            self.agree += int((logits.argmax(dim=1) == top_rec.to(logits.device)).sum())

    def finish(self) -> ConceptIndex:
        locations = self.seen * self.grid[0] * self.grid[1]
        mean = torch.where(self.count > 0, self.total / self.count.clamp(min=1), 0.0)
        importance = counts = quality = None
        if self.imp is not None:
            counts = self.counts.float().cpu()
            importance = (self.imp / self.counts).float().cpu()              # 0 / 0 = NaN: a class without maps
        if self.quality:
            quality = self._completeness(locations)
        return ConceptIndex(self.seen, self.grid, (self.count / locations).float().cpu(), mean.float().cpu(),
                            self.images.cpu(), self.peaks.cpu(), self.grids.view(*self.grids.shape[:2], *self.grid)
                            .cpu(), importance, counts, quality)

    def _completeness(self, locations: int) -> dict:
        """completeness()'s numbers from the sums (Σ_c (Σ f² − (Σ f)² / n): the spread about the channel mean)."""
        total = float((self.ch_sq - self.ch_sum.square() / locations).sum())
        fvu = self.err / max(total, 1e-12)
        dead = int((self.count == 0).sum())
        out = {"variance_explained": 1 - fvu, "fvu": fvu, "l0": float(self.count.sum()) / locations, "dead": dead,
               "dead_share": dead / self.basis.k}
        if self.extractor is not None:
            out["agreement"] = self.agree / self.seen
        return out


def concept_index(basis: ConceptBasis, extractor, batches: Tensor | Iterable[Tensor], labels: Tensor | None = None,
                  top: int = 5, batch_size: int = 256, quality: bool = False) -> ConceptIndex:
    """Index every concept of ``basis`` in one pass over feature maps -> :class:`ConceptIndex`.

    batches: (N, C, h, w) maps (read ``batch_size`` at a time) or an iterable of (B, C, h, w) batches (e.g.
    :func:`feature_batches`), read once. extractor: anything with ``logits_from_features`` (the importance; None
    leaves it out). labels: (N,) class indices of all maps in reading order (None: the classifier's top-1).
    top: images kept per concept. quality: also the held-out quality of :func:`completeness`."""
    if isinstance(batches, Tensor):
        basis.check(batches)
        if labels is not None and len(labels) != len(batches):
            raise ValueError(f"labels: {len(labels)} labels for {len(batches)} feature maps")
        batches = batches.split(batch_size)
    run = _Running(basis, extractor, top, quality)
    for feats in batches:
        basis.check(feats)
        y = None
        if labels is not None:
            y = labels[run.seen:run.seen + len(feats)]
            if len(y) != len(feats):
                raise ValueError(f"labels: {len(labels)} labels for more feature maps (at least "
                                 f"{run.seen + len(feats)})")
        run.add(feats, y)
    if run.seen == 0:
        raise ValueError("no feature maps to index (the set of batches is empty)")
    if labels is not None and len(labels) != run.seen:
        raise ValueError(f"labels: {len(labels)} labels for {run.seen} feature maps")
    return run.finish()


def feature_batches(extractor, images: Tensor, batch_size: int = 256) -> Iterator[Tensor]:
    """Images (N, 3, S, S) in [0, 1] -> their feature maps (B, C, h, w) float32, one batch at a time."""
    device = extractor.mean.device
    for chunk in images.split(batch_size):
        with torch.no_grad():  # entered per batch: a generator must not hold grad mode off across its yields
            feats = extractor(chunk.to(device)).float()
        yield feats


def exact_removal(basis: ConceptBasis, extractor, feats: Tensor, labels: Tensor, concepts: Sequence[int],
                  num_classes: int | None = None, chunk: int = 256) -> Tensor:
    """The true logit drop on removal for a few concepts -> (len(concepts), classes): mean over the class's maps
    of logit_y(feats) − logit_y(feats without concept i) (:func:`featinv.analysis.concept_edits.remove`'s edit,
    one concept at a time; NaN for a class without maps). feats (N, C, h, w), labels (N,) class indices."""
    basis.check(feats)
    if labels.shape != (feats.shape[0],):
        raise ValueError(f"labels have shape {tuple(labels.shape)}, expected ({feats.shape[0]},): one per map")
    bad = [i for i in concepts if not 0 <= i < basis.k]
    if bad:
        raise ValueError(f"concept index {bad[0]} out of range: the basis has {basis.k} concepts (0..{basis.k - 1})")
    drops, ys = [], []
    with torch.no_grad():
        for f, y in zip(feats.split(chunk), labels.to(feats.device).long().split(chunk)):
            codes = basis.encode(f)                                          # (B, k, h, w): this chunk only
            logits = extractor.logits_from_features(f).float()
            num_classes = num_classes or logits.shape[1]
            base = logits.gather(1, y[:, None])[:, 0]
            per = []
            for i in concepts:
                part = codes[:, i:i + 1].float() * basis.atoms[i].to(f.device).view(1, -1, 1, 1)
                edited = torch.where(part != 0, f - part.to(f.dtype), f)
                per.append(base - extractor.logits_from_features(edited).float().gather(1, y[:, None])[:, 0])
            drops.append(torch.stack(per, dim=1) if per else base.new_zeros(len(f), 0))
            ys.append(y)
    onehot = F.one_hot(torch.cat(ys), num_classes).double()
    return ((torch.cat(drops).double().T @ onehot) / onehot.sum(dim=0)).float().cpu()
