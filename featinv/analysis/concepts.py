"""Concept discovery on spatial feature maps: a basis of channel-space atoms fitted on per-location vectors.

The feature map's per-location channel vectors x (C,) are factorised as x ≈ Σ_i code_i · atom_i + offset,
in the fit / encode / decode convention of scikit-learn and Overcomplete (CRAFT and ACE do the same on
spatial activations). The methods (:data:`featinv.registry.CONCEPT_METHODS`, one class each in
:mod:`featinv.analysis.concept_methods`): scikit-learn factorisations streamed through ``partial_fit``
(``nmf``, ``dict``, ``pca``, ``kmeans``) and sparse autoencoders in torch (``topk``, ``batchtopk``). Every
method decodes affinely, so decode, save, load and the edits are the basis's, whatever the method.

Atoms are unit vectors (k-means: the cluster centres), so a code is a length along its atom in feature
units and concept i's contribution to a map is code_i (N, 1, h, w) times atom_i. The edits by concept
(remove one, steer along its atom, set its code, see where it sits) are :mod:`featinv.analysis.concept_edits`;
how much a class's logit needs one is :mod:`featinv.analysis.concept_scores`.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from featinv.checkpoint.tensor_files import read_tensors
from featinv.registry import CONCEPT_METHODS

METHODS = tuple(CONCEPT_METHODS)
FORMAT = "featinv-concepts/1"   # metadata["format"] of a basis file (featinv.checkpoint.tensor_files.FILE_KINDS)
Progress = Callable[[int, "int | None"], None]   # (vectors processed, total or None for a one-shot stream)


@dataclass(frozen=True, eq=False)
class ConceptBasis:
    """k concepts in a C-channel feature space.

    atoms: (k, C) float32 (unit rows; k-means: the centres); offset: (C,) added by decode (PCA's mean, an SAE's
    pre-bias, else 0); scale: the fit data's mean vector norm (the dictionary's sparsity alpha is relative to it);
    source: the backbone / layer fitted on; stats: fit statistics (vectors, maps, grid, passes, seed, held-out
    quality, ...); encoder: what the method's encode needs beyond the atoms (an SAE's W_enc, b_enc, threshold);
    params: the method's settings (an SAE's top_k); module: a Python SAE module that encodes (see
    :func:`basis_from_module`; not saved)."""

    atoms: Tensor
    method: str
    offset: Tensor
    scale: float = 1.0
    alpha: float = 0.0
    source: str = ""
    stats: dict = field(default_factory=dict)
    encoder: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    module: Any = field(default=None, repr=False)

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
        if not len(x):
            codes = x.new_zeros(0, self.k)
        elif self.module is not None:
            codes = _module_codes(self.module, x).cpu()
        else:
            codes = method_of(self.method).encode(self, x)
        return codes.view(n, h, w, self.k).permute(0, 3, 1, 2).contiguous().to(feats.device)

    def decode(self, codes: Tensor) -> Tensor:
        """codes (N, k, h, w) -> feature maps (N, C, h, w): Σ_i code_i · atom_i + offset."""
        if codes.ndim != 4 or codes.shape[1] != self.k:
            raise ValueError(f"codes must be (N, {self.k}, h, w) for this {self.k}-concept basis, "
                             f"got shape {tuple(codes.shape)}")
        a, off = self.atoms.to(codes.device), self.offset.to(codes.device)
        return torch.einsum("nkhw,kc->nchw", codes.float(), a) + off.view(1, -1, 1, 1)

    def save(self, path: str | Path) -> Path:
        """One safetensors file: atoms, offset and the encoder's tensors (``encoder.<name>``), the rest as JSON
        metadata (written atomically)."""
        from safetensors.torch import save_file

        from featinv.io import atomic_save

        if self.module is not None:
            raise ValueError(f"a basis around a Python module ({self.source}) cannot be saved: its encoder is code, not "
                             "tensors; save the module's state dict and import it (featinv concepts --import-sae)")

        meta = {"format": FORMAT, "method": self.method, "scale": repr(float(self.scale)),
                "alpha": repr(float(self.alpha)), "source": self.source, "stats": json.dumps(self.stats),
                "params": json.dumps(self.params)}
        tensors = {"atoms": self.atoms.float().contiguous(), "offset": self.offset.float().contiguous(),
                   **{f"encoder.{name}": t.float().contiguous() for name, t in self.encoder.items()}}
        return atomic_save(lambda tmp: save_file(tensors, tmp, metadata=meta), path)

    @classmethod
    def load(cls, path: str | Path) -> ConceptBasis:
        """A file written by :meth:`save`; FileNotFoundError if missing, anything else (a folder, another file,
        NaN/inf values) a ValueError naming the file."""
        tensors, meta = read_tensors(path, kind="concept basis")
        if meta.get("format") != FORMAT or "atoms" not in tensors or "offset" not in tensors:
            raise ValueError(f"{str(path)!r} is not a concept basis file (no {FORMAT!r} metadata, atoms and offset)")
        atoms, offset = tensors["atoms"].float(), tensors["offset"].float()
        encoder = {name.removeprefix("encoder."): t.float() for name, t in tensors.items()
                   if name.startswith("encoder.")}
        if atoms.ndim != 2 or meta["method"] not in METHODS or offset.shape != (atoms.shape[1],):
            raise ValueError(f"{str(path)!r}: bad concept basis (method {meta['method']!r}, atoms "
                             f"{tuple(atoms.shape)}, offset {tuple(offset.shape)})")
        return cls(atoms, meta["method"], offset, float(meta["scale"]), float(meta["alpha"]), meta.get("source", ""),
                   json.loads(meta.get("stats") or "{}"), encoder, json.loads(meta.get("params") or "{}"))


def _module_codes(module, x: Tensor) -> Tensor:
    """module.encode(x) -> codes (n, k) float32: the codes, or the last of a (pre_codes, codes) tuple."""
    param = next(iter(module.parameters()), None) if hasattr(module, "parameters") else None
    with torch.no_grad():
        out = module.encode(x if param is None else x.to(param.device, param.dtype))
    codes = out[-1] if isinstance(out, (tuple, list)) else out
    if not isinstance(codes, Tensor) or codes.ndim != 2 or codes.shape[0] != len(x):
        raise ValueError(f"{type(module).__name__}.encode: expected codes ({len(x)}, k) (or a (pre_codes, codes) "
                         f"tuple) for {len(x)} vectors, got {type(codes).__name__} "
                         f"{tuple(getattr(codes, 'shape', ()))}")
    return codes.float()


def basis_from_module(module, channels: int, source: str = "", chunk: int = 1024, rtol: float = 1e-4) -> ConceptBasis:
    """Any sparse autoencoder module as a basis: ``encode(x (n, C))`` returns the codes (n, k) or ``(pre_codes,
    codes)`` (as Overcomplete's SAEs do), and ``decode(codes)`` is affine in the codes. The atoms are read off the
    decoder (decode(e_i) − decode(0); offset decode(0)) and checked: decode of random sparse codes must equal
    codes @ atoms + offset within ``rtol`` of their norm, else a ValueError. The basis encodes through the module
    (on its device) and gets removal, code edits, steering and the atlas; it cannot be saved (its encoder is
    code). Missing encode/decode or mis-shaped outputs: a one-line ValueError."""
    name = type(module).__name__
    missing = [m for m in ("encode", "decode") if not callable(getattr(module, m, None))]
    if missing:
        raise ValueError(f"{name}: not a sparse autoencoder module: it has no {' and no '.join(missing)}() (a basis "
                         "needs encode(x) -> codes or (pre_codes, codes) and decode(codes) -> x)")
    param = next(iter(module.parameters()), None) if hasattr(module, "parameters") else None
    dev, dtype = (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)
    k = _module_codes(module, torch.zeros(1, channels)).shape[1]

    def decode(codes: Tensor) -> Tensor:
        with torch.no_grad():
            out = module.decode(codes.to(dev, dtype))
        if not isinstance(out, Tensor) or tuple(out.shape) != (len(codes), channels):
            raise ValueError(f"{name}.decode: expected ({len(codes)}, {channels}) for {len(codes)} codes of {k} "
                             f"latents, got {type(out).__name__} {tuple(getattr(out, 'shape', ()))}")
        return out.float().cpu()
    offset = decode(torch.zeros(1, k))[0]
    atoms = torch.cat([decode(torch.eye(k)[a:a + chunk]) - offset for a in range(0, k, chunk)])
    g = torch.Generator().manual_seed(0)
    z = torch.rand(8, k, generator=g) * (torch.rand(8, k, generator=g) < min(1.0, 8 / k))
    expected = z @ atoms + offset
    err = float((decode(z) - expected).norm(dim=1).max())
    if err > rtol * max(float(expected.norm(dim=1).max()), 1e-12):
        raise ValueError(f"{name}.decode is not affine in the codes (error {err:.3g} against codes @ atoms + offset); "
                         "a basis needs decode(codes) = codes @ D + b")
    return ConceptBasis(atoms.contiguous(), "module", offset, source=source or name, stats={"k": k}, module=module)


@functools.cache
def method_of(name: str):
    """The method class instance registered as ``name`` (:mod:`featinv.analysis.concept_methods`)."""
    if name not in CONCEPT_METHODS:
        raise ValueError(f"unknown concept method {name!r}: choose one of {', '.join(METHODS)}")
    return CONCEPT_METHODS[name].load()()


# ----- fitting -------------------------------------------------------------------------------------

def _vectors(feats: Tensor) -> Tensor:
    """(B, C, h, w) maps or (B, C) vectors -> (B·h·w, C) float32 on the CPU."""
    if feats.ndim == 2:
        return feats.detach().float().cpu()
    if feats.ndim != 4:
        raise ValueError(f"feature maps must be (N, C, h, w) (or (N, C) vectors), got shape {tuple(feats.shape)}")
    return feats.detach().float().cpu().permute(0, 2, 3, 1).reshape(-1, feats.shape[1])


def rebatch(chunks: Iterable[Tensor], size: int, minimum: int) -> Iterable[Tensor]:
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


def resolve_method(method: str | None, nonnegative: bool) -> str:
    """The method a fit uses: ``method`` if it is one of :data:`METHODS` (ValueError otherwise), else nmf for
    non-negative maps and dict for signed ones."""
    if method is None:
        return "nmf" if nonnegative else "dict"
    if method not in METHODS:
        raise ValueError(f"unknown concept method {method!r}: choose one of {', '.join(METHODS)}")
    return method


def check_k(k: int, method_name: str, vectors: int | None, channels: int | None) -> None:
    """ValueError ``-k: ...`` stating the range of k for the method (resolved: see :func:`resolve_method`): at
    least 1; at most the vectors fitted on unless the method may have more (an overcomplete SAE); at most the
    channels for a method with one concept per channel (nmf, pca). ``vectors`` / ``channels``: None when not
    known up front (a stream of batches)."""
    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"-k: k must be a positive number of concepts, got {k}")
    m = method_of(method_name)
    per_channel = m.per_channel and channels is not None
    bounds = [n for n in (None if m.k_above_vectors else vectors, channels if per_channel else None) if n is not None]
    if vectors is not None and k > vectors and not m.k_above_vectors:
        raise ValueError(f"-k: k={k} exceeds the {vectors} feature-map locations to fit on; method {method_name!r} "
                         f"takes 1..{min(bounds)} concepts here" + (" (at most one per channel)" if per_channel else "")
                         + "; the sparse autoencoders (topk, batchtopk) take more")
    if per_channel and k > channels:
        more = f"up to {vectors} (one per location)" if vectors is not None else "more"
        raise ValueError(f"-k: k={k} exceeds the {channels} channels of the feature map: method {method_name!r} finds "
                         f"at most one concept per channel (1..{min(bounds)} here); 'dict' and 'kmeans' take {more}, "
                         "the sparse autoencoders (topk, batchtopk) any number")


def _batches(feats, seed: int) -> tuple[Callable[[int], Iterable[Tensor]], dict]:
    """-> (pass index -> chunks of vectors, facts known up front). A tensor is read in a seeded random order
    of its maps each pass, ~1024 vectors a chunk (the methods rebatch); a shard folder (str or Path) likewise,
    memory-mapped (:func:`featinv.analysis.shards.shard_batches`); an iterable of batches is read as given (a
    one-shot iterator only once)."""
    if isinstance(feats, (str, Path)):
        from featinv.analysis.shards import shard_batches

        chunks, facts = shard_batches(feats, 1024, seed)
        return chunks, {"vectors": facts["vectors"], "channels": facts["d"], "shards": facts["shards"]}
    if isinstance(feats, Tensor):
        if feats.ndim != 4:
            raise ValueError(f"feature maps must be (N, C, h, w), got shape {tuple(feats.shape)}")
        n, c, h, w = feats.shape
        per_chunk = max(1, 1024 // (h * w))

        def chunks(p: int) -> Iterable[Tensor]:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + p))
            for idx in order.split(per_chunk):
                yield _vectors(feats[idx])
        return chunks, {"vectors": n * h * w, "maps": n, "grid": [h, w], "channels": c}
    return (lambda p: (_vectors(b) for b in feats)), {}


def fit_concepts(feats: Tensor | Iterable[Tensor] | str | Path, k: int, method: str | None = None, seed: int = 0,
                 progress: Progress | None = None, passes: int | None = None, batch_size: int | None = None,
                 alpha: float = 0.1, source: str = "", top_k: int | None = None) -> ConceptBasis:
    """Fit k concepts on the per-location channel vectors of feature maps -> ConceptBasis.

    feats: (N, C, h, w) maps, an iterable of (B, C, h, w) batches (or (B, C) vectors), or a folder of .npy shards
    (:mod:`featinv.analysis.shards`), streamed (a set larger than memory). method: a name of :data:`METHODS`, or None (nmf for non-negative maps, else dict). passes:
    epochs over the data (default: the method's, e.g. ~200 mini-batch steps for the scikit-learn methods, 1 for
    PCA and for an iterable). batch_size: the method's default when None (1024; SAEs 4096). alpha: the
    dictionary's sparsity, relative to the mean vector norm. top_k: an SAE's active latents (default
    channels / 8, at most 32). progress(done, total) after every mini-batch. Deterministic given ``seed`` (on the
    CPU)."""
    chunks, facts = _batches(feats, seed)
    first_pass = chunks(0)
    first = next(iter(first_pass), None)
    if first is None:
        raise ValueError("no feature maps to fit concepts on (the set of batches is empty)")
    source_min = feats.min() if isinstance(feats, Tensor) else first.min()  # a stream, shards: the first batch
    method = resolve_method(method, bool(source_min >= 0))
    m = method_of(method)
    batch_size = batch_size or m.batch_size
    check_k(k, method, facts.get("vectors"), first.shape[1])
    if passes is None:
        passes = m.default_passes(facts["vectors"], batch_size) if facts else 1
    if not facts and iter(feats) is feats and passes > 1:
        raise ValueError(f"passes={passes} needs a re-iterable set of batches (a list, a DataLoader), "
                         "not a one-shot iterator")
    epochs = lambda p: itertools.chain([first], first_pass) if p == 0 else chunks(p)  # noqa: E731
    total = facts["vectors"] * passes if facts else None
    basis, seen = m.fit(epochs, k, passes=passes, batch_size=batch_size, seed=seed, alpha=alpha, top_k=top_k,
                        progress=progress, total=total)
    stats = {**basis.stats, **(facts or {"vectors": seen}), "passes": passes, "batch_size": batch_size, "seed": seed,
             "k": k}
    return dataclasses.replace(basis, source=source, stats=stats)
