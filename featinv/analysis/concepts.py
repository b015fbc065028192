"""Concept discovery on spatial feature maps: a basis of channel-space atoms fitted on per-location vectors.

The feature map's per-location channel vectors x (C,) are factorised as x ≈ Σ_i code_i · atom_i + offset,
in the fit / encode / decode convention of scikit-learn and Overcomplete (CRAFT and ACE do the same on
spatial activations). scikit-learn does the factorisation, streamed through ``partial_fit``:

- ``nmf``    non-negative codes and atoms (maps after a ReLU); MiniBatchNMF.
- ``dict``   sparse dictionary learning, non-negative codes, signed atoms (signed maps such as ConvNeXt's or
             a ViT's: a concept still *adds* to a location); MiniBatchDictionaryLearning(positive_code=True).
- ``pca``    signed codes along orthonormal components, around the mean (the offset); IncrementalPCA.
- ``kmeans`` one-hot codes: each location is its nearest cluster centre; MiniBatchKMeans.

Atoms are unit vectors (k-means: the cluster centres), so a code is a length along its atom in feature
units and concept i's contribution to a map is code_i (N, 1, h, w) times atom_i. The edits by concept
(remove one, steer along its atom, see where it sits) are :mod:`featinv.analysis.concept_edits`; how much a
class's logit needs one is :mod:`featinv.analysis.concept_scores`.
"""
from __future__ import annotations

import contextlib
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from featinv.checkpoint.tensor_files import read_tensors
from featinv.registry import CONCEPT_METHODS

METHODS = tuple(CONCEPT_METHODS)
# Methods with at most one concept per channel (scikit-learn 1.9): MiniBatchNMF's 'nndsvda' initialisation needs
# k <= min(vectors, channels), IncrementalPCA k <= channels and k <= the vectors of its first batch. MiniBatchKMeans
# needs k <= vectors; MiniBatchDictionaryLearning pads its initial dictionary with zero atoms beyond the vectors,
# and fit_concepts asks k <= vectors of it too (the first batch holds k vectors, see _rebatch).
PER_CHANNEL = ("nmf", "pca")
FORMAT = "featinv-concepts/1"   # metadata["format"] of a basis file (featinv.checkpoint.tensor_files.FILE_KINDS)
Progress = Callable[[int, "int | None"], None]   # (vectors processed, total or None for a one-shot stream)


@dataclass(frozen=True, eq=False)
class ConceptBasis:
    """k concepts in a C-channel feature space.

    atoms: (k, C) float32 (unit rows; k-means: the centres); offset: (C,) added by decode (PCA's mean, else 0);
    scale: the fit data's mean vector norm (the dictionary's sparsity alpha is relative to it);
    source: the backbone / layer fitted on; stats: fit statistics (vectors, maps, grid, passes, seed, ...)."""

    atoms: Tensor
    method: str
    offset: Tensor
    scale: float = 1.0
    alpha: float = 0.0
    source: str = ""
    stats: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return self.atoms.shape[0]

    @property
    def channels(self) -> int:
        return self.atoms.shape[1]

    def check(self, feats: Tensor) -> None:
        if feats.ndim != 4:
            raise ValueError(f"feature maps must be (N, C, h, w), got shape {tuple(feats.shape)}")
        if feats.shape[1] != self.channels:
            raise ValueError(f"feature map has {feats.shape[1]} channels but the concept basis was fitted on "
                             f"{self.channels} channels ({self.source or 'unnamed backbone'})")

    def encode(self, feats: Tensor) -> Tensor:
        """feats (N, C, h, w) -> codes (N, k, h, w) float32 (non-negative except for PCA)."""
        self.check(feats)
        n, _, h, w = feats.shape
        x = feats.detach().float().cpu().permute(0, 2, 3, 1).reshape(-1, self.channels)
        codes = _encode_vectors(self, x) if len(x) else x.new_zeros(0, self.k)
        return codes.view(n, h, w, self.k).permute(0, 3, 1, 2).contiguous().to(feats.device)

    def decode(self, codes: Tensor) -> Tensor:
        """codes (N, k, h, w) -> feature maps (N, C, h, w): Σ_i code_i · atom_i + offset."""
        if codes.ndim != 4 or codes.shape[1] != self.k:
            raise ValueError(f"codes must be (N, {self.k}, h, w) for this {self.k}-concept basis, "
                             f"got shape {tuple(codes.shape)}")
        a, off = self.atoms.to(codes.device), self.offset.to(codes.device)
        return torch.einsum("nkhw,kc->nchw", codes.float(), a) + off.view(1, -1, 1, 1)

    def save(self, path: str | Path) -> Path:
        """One safetensors file: atoms and offset, the rest as JSON metadata (written atomically)."""
        from safetensors.torch import save_file

        from featinv.io import atomic_save

        meta = {"format": FORMAT, "method": self.method, "scale": repr(float(self.scale)),
                "alpha": repr(float(self.alpha)), "source": self.source, "stats": json.dumps(self.stats)}
        tensors = {"atoms": self.atoms.float().contiguous(), "offset": self.offset.float().contiguous()}
        return atomic_save(lambda tmp: save_file(tensors, tmp, metadata=meta), path)

    @classmethod
    def load(cls, path: str | Path) -> ConceptBasis:
        """A file written by :meth:`save`; FileNotFoundError if missing, anything else (a folder, another file,
        NaN/inf values) a ValueError naming the file."""
        tensors, meta = read_tensors(path, kind="concept basis", names=("atoms", "offset"))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{str(path)!r} is not a concept basis file (no {FORMAT!r} metadata)")
        atoms, offset = tensors["atoms"].float(), tensors["offset"].float()
        if atoms.ndim != 2 or meta["method"] not in METHODS or offset.shape != (atoms.shape[1],):
            raise ValueError(f"{str(path)!r}: bad concept basis (method {meta['method']!r}, atoms "
                             f"{tuple(atoms.shape)}, offset {tuple(offset.shape)})")
        return cls(atoms, meta["method"], offset, float(meta["scale"]), float(meta["alpha"]), meta.get("source", ""),
                   json.loads(meta.get("stats") or "{}"))


# ----- fitting -------------------------------------------------------------------------------------

def _vectors(feats: Tensor) -> Tensor:
    """(B, C, h, w) maps or (B, C) vectors -> (B·h·w, C) float32 on the CPU."""
    if feats.ndim == 2:
        return feats.detach().float().cpu()
    if feats.ndim != 4:
        raise ValueError(f"feature maps must be (N, C, h, w) (or (N, C) vectors), got shape {tuple(feats.shape)}")
    return feats.detach().float().cpu().permute(0, 2, 3, 1).reshape(-1, feats.shape[1])


def _rebatch(chunks: Iterable[Tensor], size: int, minimum: int) -> Iterable[Tensor]:
    """Vectors in chunks of any size -> batches of ``size`` rows (the first of at least ``minimum``: the
    estimators initialise on it); a remainder of fewer than ``minimum`` rows joins the last batch."""
    buf, rows, pending, first = [], 0, None, max(size, minimum)
    for chunk in chunks:
        buf.append(chunk)
        rows += len(chunk)
        while rows >= (first if pending is None else size):
            cut = first if pending is None else size
            cat = torch.cat(buf)
            if pending is not None:
                yield pending
            pending, buf, rows = cat[:cut], [cat[cut:]], rows - cut
    rest = torch.cat(buf) if buf else torch.zeros(0)
    if pending is not None and len(rest) >= minimum:
        yield pending
        pending = None
    if pending is None:
        if len(rest):
            yield rest
    else:
        yield torch.cat([pending, rest])


def nmf_estimator(k: int, seed: int, alpha: float, batch_size: int):
    """``nmf``: MiniBatchNMF, initialised by NNDSVDa (k <= channels); alpha is not used."""
    from sklearn.decomposition import MiniBatchNMF

    return MiniBatchNMF(n_components=k, init="nndsvda", batch_size=batch_size, random_state=seed)


def dict_estimator(k: int, seed: int, alpha: float, batch_size: int):
    """``dict``: MiniBatchDictionaryLearning with non-negative lasso codes of sparsity ``alpha``."""
    from sklearn.decomposition import MiniBatchDictionaryLearning

    return MiniBatchDictionaryLearning(n_components=k, alpha=alpha, batch_size=batch_size, positive_code=True,
                                       fit_algorithm="cd", transform_algorithm="lasso_cd", random_state=seed)


def pca_estimator(k: int, seed: int, alpha: float, batch_size: int):
    """``pca``: IncrementalPCA (k <= channels); deterministic, so seed and alpha are not used."""
    from sklearn.decomposition import IncrementalPCA

    return IncrementalPCA(n_components=k, batch_size=batch_size)


def kmeans_estimator(k: int, seed: int, alpha: float, batch_size: int):
    """``kmeans``: MiniBatchKMeans with one initialisation; alpha is not used."""
    from sklearn.cluster import MiniBatchKMeans

    return MiniBatchKMeans(n_clusters=k, batch_size=batch_size, random_state=seed, n_init=1)


def resolve_method(method: str | None, nonnegative: bool) -> str:
    """The method a fit uses: ``method`` if it is one of :data:`METHODS` (ValueError otherwise), else nmf for
    non-negative maps and dict for signed ones."""
    if method is None:
        return "nmf" if nonnegative else "dict"
    if method not in METHODS:
        raise ValueError(f"unknown concept method {method!r}: choose one of {', '.join(METHODS)}")
    return method


def check_k(k: int, method: str, vectors: int | None, channels: int | None) -> None:
    """ValueError ``-k: ...`` stating the range of k for ``method`` (resolved: see :func:`resolve_method`) unless
    1 <= k <= vectors, and for nmf and pca (:data:`PER_CHANNEL`) also k <= channels. ``vectors``: the
    feature-map locations fitted on, None when not known up front (a stream of batches); ``channels`` likewise."""
    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"-k: k must be a positive number of concepts, got {k}")
    per_channel = method in PER_CHANNEL and channels is not None
    bounds = [n for n in (vectors, channels if per_channel else None) if n is not None]
    if vectors is not None and k > vectors:
        raise ValueError(f"-k: k={k} exceeds the {vectors} feature-map locations to fit on; method {method!r} takes "
                         f"1..{min(bounds)} concepts here" + (" (at most one per channel)" if per_channel else ""))
    if per_channel and k > channels:
        more = f"up to {vectors} (one per location)" if vectors is not None else "more"
        raise ValueError(f"-k: k={k} exceeds the {channels} channels of the feature map: method {method!r} finds at "
                         f"most one concept per channel (1..{min(bounds)} here); 'dict' and 'kmeans' take {more}")


def _negative_error(x: Tensor) -> ValueError:
    return ValueError(f"NMF needs non-negative feature maps, but they hold negative entries (min {x.min():.3g}); "
                      "use method 'dict' (non-negative codes, signed atoms), 'pca' or 'kmeans'")


def _batches(feats, batch_size: int, seed: int, passes: int) -> tuple[Callable[[int], Iterable[Tensor]], dict]:
    """-> (pass index -> chunks of vectors, facts known up front). A tensor is read in a seeded random order
    of its maps each pass; an iterable of batches is read as given (a one-shot iterator only once)."""
    if isinstance(feats, Tensor):
        if feats.ndim != 4:
            raise ValueError(f"feature maps must be (N, C, h, w), got shape {tuple(feats.shape)}")
        n, c, h, w = feats.shape
        per_chunk = max(1, batch_size // (h * w))

        def chunks(p: int) -> Iterable[Tensor]:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + p))
            for idx in order.split(per_chunk):
                yield _vectors(feats[idx])
        return chunks, {"vectors": n * h * w, "maps": n, "grid": [h, w], "channels": c}
    if iter(feats) is feats and passes > 1:
        raise ValueError(f"passes={passes} needs a re-iterable set of batches (a list, a DataLoader), "
                         "not a one-shot iterator")
    return (lambda p: (_vectors(b) for b in feats)), {}


def fit_concepts(feats: Tensor | Iterable[Tensor], k: int, method: str | None = None, seed: int = 0,
                 progress: Progress | None = None, passes: int | None = None, batch_size: int = 1024,
                 alpha: float = 0.1, source: str = "") -> ConceptBasis:
    """Fit k concepts on the per-location channel vectors of feature maps -> ConceptBasis.

    feats: (N, C, h, w) maps, or an iterable of (B, C, h, w) batches (or (B, C) vectors) streamed through
    ``partial_fit`` (a set larger than memory). method: 'nmf', 'dict', 'pca', 'kmeans' or None (nmf for
    non-negative maps, else dict). passes: epochs over the data (default: enough for ~200 mini-batch
    steps; 1 for PCA and for an iterable). alpha: the dictionary's sparsity, relative to the mean vector
    norm. progress(done, total) after every mini-batch. Deterministic given ``seed``."""
    if isinstance(feats, Tensor) and feats.ndim == 4:
        locations = feats.shape[0] * feats.shape[2] * feats.shape[3]
        method = resolve_method(method, feats.numel() > 0 and bool(feats.min() >= 0))
        check_k(k, method, locations, feats.shape[1])
        batches = math.ceil(locations / batch_size)
        # PCA's incremental SVD sees every vector once (more passes only repeat them, at an SVD a batch)
        passes = passes or (1 if method == "pca" else math.ceil(200 / batches))
    passes = passes or 1
    chunks, facts = _batches(feats, batch_size, seed, passes)
    total = facts["vectors"] * passes if facts else None
    est, scale, done, seen = None, 1.0, 0, 0
    for p in range(passes):
        for x in _rebatch(chunks(p), batch_size, k):
            if est is None:  # the first batch: at least k vectors, or all of them if fewer (see _rebatch)
                method = resolve_method(method, bool(x.min() >= 0))
                check_k(k, method, len(x) if len(x) < k else None, x.shape[1])
                scale = float(x.norm(dim=1).mean()) or 1.0  # codes and alpha in units of a typical vector
                est = CONCEPT_METHODS[method].load()(k, seed, alpha, batch_size)
            if method == "nmf" and x.min() < 0:
                raise _negative_error(x)
            # float64 for the dictionary: its lasso's duality-gap test cannot be met in float32 precision
            with _no_convergence_warnings():
                est.partial_fit((x / scale).to(torch.float64 if method == "dict" else torch.float32).numpy())
            done += len(x)
            seen += len(x) if p == 0 else 0
            if progress is not None:
                progress(done, total)
    if est is None:
        raise ValueError("no feature maps to fit concepts on (the set of batches is empty)")
    facts = facts or {"vectors": seen}
    stats = {**facts, "passes": passes, "batch_size": batch_size, "seed": seed, "k": k}
    return _basis_from(est, method, scale, alpha, source, stats)


@contextlib.contextmanager
def _no_convergence_warnings():
    """scikit-learn's ConvergenceWarning off: a mini-batch step runs a few coordinate-descent iterations by
    design, and a lasso per vector warns once per unconverged vector (tens of thousands of lines on a big fit)."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield


def _basis_from(est, method: str, scale: float, alpha: float, source: str, stats: dict) -> ConceptBasis:
    """The fitted estimator (in units of ``scale``) -> ConceptBasis in feature units, unit atoms."""
    atoms = torch.from_numpy(np.asarray(est.cluster_centers_ if method == "kmeans" else est.components_)).float()
    offset = torch.zeros(atoms.shape[1])
    if method == "kmeans":
        atoms = atoms * scale
    else:
        atoms = atoms / atoms.norm(dim=1, keepdim=True).clamp(min=1e-12)
    if method == "pca":
        offset = torch.from_numpy(np.asarray(est.mean_)).float() * scale
        stats = {**stats, "explained_variance_ratio": [float(v) for v in est.explained_variance_ratio_]}
    return ConceptBasis(atoms.contiguous(), method, offset, scale, alpha, source, stats)


def _encode_vectors(basis: ConceptBasis, x: Tensor) -> Tensor:
    """(n, C) -> codes (n, k) in feature units (atoms are unit, so a code is a length along its atom)."""
    if basis.method == "pca":
        return (x - basis.offset) @ basis.atoms.T
    if basis.method == "kmeans":
        nearest = torch.cdist(x, basis.atoms).argmin(dim=1)
        return F.one_hot(nearest, basis.k).float()
    if basis.method == "nmf" and x.min() < 0:
        raise _negative_error(x)
    xs, atoms = (x / basis.scale).double().numpy(), basis.atoms.double().numpy()
    if basis.method == "nmf":
        from sklearn.decomposition import non_negative_factorization

        with _no_convergence_warnings():
            codes, _, _ = non_negative_factorization(xs, H=atoms, n_components=basis.k, update_H=False, solver="cd",
                                                     max_iter=400, tol=1e-6)
    else:
        from sklearn.decomposition import sparse_encode

        with _no_convergence_warnings():
            codes = sparse_encode(xs, atoms, algorithm="lasso_cd", alpha=basis.alpha, positive=True, max_iter=1000)
    return torch.from_numpy(codes).float() * basis.scale
