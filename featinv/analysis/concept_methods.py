"""The concept methods of :data:`featinv.registry.CONCEPT_METHODS`, one class each: ``fit`` (streamed over
epochs of (n, C) vector batches) and ``encode``; decode, save and load are the basis's own
(:class:`featinv.analysis.concepts.ConceptBasis`: every method decodes affinely, x ≈ codes @ atoms + offset).

A new method is one class here (its fit, its encode, its bounds on k) and one registry entry. Fits work in
units of ``scale`` (the first batch's mean vector norm); bases are in feature units with unit atoms (k-means:
the centres), so a code is a length along its atom.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from featinv.analysis.concepts import ConceptBasis, Progress, check_k, rebatch

Epochs = Callable[[int], Iterable[Tensor]]   # epoch -> chunks of (n, C) float32 vectors


class Method:
    """A way to find k concepts. Class attributes: ``per_channel`` (at most one concept per channel),
    ``k_above_vectors`` (may have more concepts than fit vectors: an overcomplete SAE), ``batch_size`` (the
    default mini-batch)."""

    name = ""
    per_channel = False
    k_above_vectors = False
    batch_size = 1024

    def default_passes(self, vectors: int, batch_size: int) -> int:
        """Epochs over a set of ``vectors`` when the caller gives none: about 200 mini-batch steps."""
        return math.ceil(200 / math.ceil(vectors / batch_size))

    def fit(self, epochs: Epochs, k: int, *, passes: int, batch_size: int, seed: int, alpha: float,
            top_k: int | None, progress: Progress | None, total: int | None) -> tuple[ConceptBasis, int]:
        """-> (the basis, without source and the caller's stats; the vectors seen in one epoch)."""
        raise NotImplementedError

    def encode(self, basis: ConceptBasis, x: Tensor) -> Tensor:
        """(n, C) float32 on the CPU -> codes (n, k) in feature units."""
        raise NotImplementedError


# ----- scikit-learn factorisations ---------------------------------------------------------------------

class _Sklearn(Method):
    """A scikit-learn estimator streamed through ``partial_fit``."""

    dtype = torch.float32

    def estimator(self, k: int, seed: int, alpha: float, batch_size: int):
        raise NotImplementedError

    def fit(self, epochs, k, *, passes, batch_size, seed, alpha, top_k, progress, total):
        est, scale, done, seen = None, 1.0, 0, 0
        for p in range(passes):
            for x in rebatch(epochs(p), batch_size, k):
                if est is None:  # the first batch: at least k vectors, or all of a smaller stream (see rebatch)
                    check_k(k, self.name, len(x) if len(x) < k else None, x.shape[1])
                    scale = float(x.norm(dim=1).mean()) or 1.0  # codes and alpha in units of a typical vector
                    est = self.estimator(k, seed, alpha, batch_size)
                self.check_input(x)
                with no_convergence_warnings():
                    est.partial_fit((x / scale).to(self.dtype).numpy())
                done += len(x)
                seen += len(x) if p == 0 else 0
                if progress is not None:
                    progress(done, total)
        return self.basis(est, scale, alpha), seen

    def check_input(self, x: Tensor) -> None:
        """ValueError when the vectors do not suit the method (NMF: negative entries)."""

    def basis(self, est, scale: float, alpha: float) -> ConceptBasis:
        atoms = torch.from_numpy(np.asarray(est.components_)).float()
        atoms = atoms / atoms.norm(dim=1, keepdim=True).clamp(min=1e-12)
        return ConceptBasis(atoms.contiguous(), self.name, torch.zeros(atoms.shape[1]), scale, alpha)


class NMF(_Sklearn):
    """``nmf``: MiniBatchNMF initialised by NNDSVDa (k <= channels); codes by a non-negative least-squares fit
    on the fixed atoms."""

    name, per_channel = "nmf", True

    def estimator(self, k, seed, alpha, batch_size):
        from sklearn.decomposition import MiniBatchNMF

        return MiniBatchNMF(n_components=k, init="nndsvda", batch_size=batch_size, random_state=seed)

    def check_input(self, x):
        if x.numel() and x.min() < 0:
            raise negative_error(x)

    def encode(self, basis, x):
        from sklearn.decomposition import non_negative_factorization

        self.check_input(x)
        with no_convergence_warnings():
            codes, _, _ = non_negative_factorization((x / basis.scale).double().numpy(), H=basis.atoms.double().numpy(),
                                                     n_components=basis.k, update_H=False, solver="cd", max_iter=400,
                                                     tol=1e-6)
        return torch.from_numpy(codes).float() * basis.scale


class Dictionary(_Sklearn):
    """``dict``: MiniBatchDictionaryLearning with non-negative lasso codes of sparsity ``alpha`` (float64: the
    lasso's duality-gap test cannot be met in float32)."""

    name, dtype = "dict", torch.float64

    def estimator(self, k, seed, alpha, batch_size):
        from sklearn.decomposition import MiniBatchDictionaryLearning

        return MiniBatchDictionaryLearning(n_components=k, alpha=alpha, batch_size=batch_size, positive_code=True,
                                           fit_algorithm="cd", transform_algorithm="lasso_cd", random_state=seed)

    def encode(self, basis, x):
        from sklearn.decomposition import sparse_encode

        with no_convergence_warnings():
            codes = sparse_encode((x / basis.scale).double().numpy(), basis.atoms.double().numpy(),
                                  algorithm="lasso_cd", alpha=basis.alpha, positive=True, max_iter=1000)
        return torch.from_numpy(codes).float() * basis.scale


class PCA(_Sklearn):
    """``pca``: IncrementalPCA (k <= channels), deterministic; signed codes around the mean (the offset). Its
    incremental SVD sees every vector once: more passes only repeat them."""

    name, per_channel = "pca", True

    def default_passes(self, vectors, batch_size):
        return 1

    def estimator(self, k, seed, alpha, batch_size):
        from sklearn.decomposition import IncrementalPCA

        return IncrementalPCA(n_components=k, batch_size=batch_size)

    def basis(self, est, scale, alpha):
        base = super().basis(est, scale, alpha)
        offset = torch.from_numpy(np.asarray(est.mean_)).float() * scale
        stats = {"explained_variance_ratio": [float(v) for v in est.explained_variance_ratio_]}
        return ConceptBasis(base.atoms, self.name, offset, scale, alpha, stats=stats)

    def encode(self, basis, x):
        return (x - basis.offset) @ basis.atoms.T


class KMeans(_Sklearn):
    """``kmeans``: MiniBatchKMeans, one initialisation; one-hot codes (each location is its nearest centre), the
    centres as atoms (not unit)."""

    name = "kmeans"

    def estimator(self, k, seed, alpha, batch_size):
        from sklearn.cluster import MiniBatchKMeans

        return MiniBatchKMeans(n_clusters=k, batch_size=batch_size, random_state=seed, n_init=1)

    def basis(self, est, scale, alpha):
        atoms = torch.from_numpy(np.asarray(est.cluster_centers_)).float() * scale
        return ConceptBasis(atoms.contiguous(), self.name, torch.zeros(atoms.shape[1]), scale, alpha)

    def encode(self, basis, x):
        return F.one_hot(torch.cdist(x, basis.atoms).argmin(dim=1), basis.k).float()


# ----- sparse autoencoders -------------------------------------------------------------------------------

class TopK(Method):
    """``topk``: a TopK sparse autoencoder (Gao et al. 2024; :mod:`featinv.nets.sae`, trained by
    :func:`featinv.analysis.sae.train_sae`): exactly ``top_k`` active latents per vector. The basis keeps the
    decoder (atoms: its unit rows; offset: the pre-bias) and the encoder (``encoder``: W_enc, b_enc, threshold,
    in units of ``scale``)."""

    name, kind, k_above_vectors, batch_size = "topk", "topk", True, 4096

    def default_passes(self, vectors, batch_size):
        return math.ceil(2000 / math.ceil(vectors / batch_size))  # ~2000 Adam steps

    def fit(self, epochs, k, *, passes, batch_size, seed, alpha, top_k, progress, total):
        from featinv.analysis.sae import train_sae

        first = next(iter(epochs(0)))  # the first chunk only: epochs(0) is read again, whole, below
        scale = float(first.norm(dim=1).mean()) or 1.0
        seen = [0]

        def batches(epoch: int) -> Iterable[Tensor]:
            for x in rebatch(epochs(epoch), batch_size, 1):
                seen[0] += len(x) if epoch == 0 else 0
                yield x / scale
        top_k = top_k or default_top_k(first.shape[1], k)
        sae, stats = train_sae(batches, first.shape[1], k, top_k, self.kind, epochs=passes, seed=seed,
                               progress=None if progress is None else (lambda done, _: progress(done, total)))
        t = {name: value.detach().float().cpu() for name, value in sae.state_dict().items()}
        encoder = {name: t[name].contiguous() for name in ("W_enc", "b_enc", "threshold")}
        basis = ConceptBasis(t["W_dec"].contiguous(), self.name, t["b_pre"] * scale, scale, 0.0,
                             stats={"sae": {k_: v for k_, v in stats.items() if isinstance(v, (int, float))}},
                             encoder=encoder, params={"top_k": top_k})
        return basis, seen[0]

    def basis_from_sae(self, tensors: dict[str, Tensor], top_k: int | None, source: str = "") -> ConceptBasis:
        """A trained SAE's tensors (b_pre, W_enc, b_enc, W_dec, threshold; e.g. from
        :func:`featinv.checkpoint.overcomplete.overcomplete_to_sae`) -> a basis in the units the SAE was trained
        in (scale 1; its decoder rows as they are). top_k: None for a jumprelu SAE."""
        from featinv.nets.sae import SparseAutoencoder

        sae = SparseAutoencoder.from_tensors(tensors, top_k, self.kind)  # checks every key and shape
        t = {name: value.detach().float() for name, value in sae.state_dict().items()}
        return ConceptBasis(t["W_dec"].contiguous(), self.name, t["b_pre"], 1.0, 0.0, source,
                            encoder={name: t[name].contiguous() for name in ("W_enc", "b_enc", "threshold")},
                            params={} if top_k is None else {"top_k": top_k})

    def sae(self, basis: ConceptBasis):
        """The basis as a SparseAutoencoder in units of ``scale`` (eval mode)."""
        from featinv.nets.sae import SparseAutoencoder

        tensors = {**basis.encoder, "W_dec": basis.atoms, "b_pre": basis.offset / basis.scale}
        top_k = basis.params.get("top_k")
        return SparseAutoencoder.from_tensors(tensors, None if top_k is None else int(top_k), self.kind).eval()

    def encode(self, basis, x):
        with torch.no_grad():
            return self.sae(basis).encode(x / basis.scale) * basis.scale


class BatchTopK(TopK):
    """``batchtopk``: a BatchTopK sparse autoencoder (Bussmann et al. 2024): ``top_k`` active latents per vector
    on average over a training batch, a learned threshold at inference."""

    name, kind = "batchtopk", "batchtopk"


class JumpReLU(TopK):
    """``jumprelu``: a JumpReLU sparse autoencoder (Rajamanoharan et al. 2024): every latent whose
    pre-activation reaches its own threshold is active. Imported (``featinv concepts --import-sae FILE --sae-type
    jumprelu``), not fitted here."""

    name, kind = "jumprelu", "jumprelu"

    def fit(self, epochs, k, *, passes, batch_size, seed, alpha, top_k, progress, total):
        raise ValueError("--method jumprelu: featinv imports JumpReLU SAEs (--import-sae FILE --sae-type jumprelu) "
                         "but fits topk and batchtopk ones")


def default_top_k(channels: int, k: int) -> int:
    """An SAE's active latents when not given: channels / 8, at least 1, at most 32 and below k."""
    return max(1, min(32, channels // 8, k - 1 if k > 1 else 1))


# ----- shared --------------------------------------------------------------------------------------------

def negative_error(x: Tensor) -> ValueError:
    return ValueError(f"NMF needs non-negative feature maps, but they hold negative entries (min {x.min():.3g}); "
                      "use method 'dict' (non-negative codes, signed atoms), 'pca', 'kmeans' or an SAE")


@contextlib.contextmanager
def no_convergence_warnings():
    """scikit-learn's ConvergenceWarning off: a mini-batch step runs a few coordinate-descent iterations by
    design, and a lasso per vector warns once per unconverged vector (tens of thousands of lines on a big fit)."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield
