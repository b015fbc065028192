"""Edits by concept: a concept's contribution to a feature map, the map without it, its atom as a steering
direction, and where it sits (its code over the grid, brought to image size).

A basis (:class:`featinv.analysis.concepts.ConceptBasis`) has unit atoms, so concept i's contribution to a map
is code_i (N, 1, h, w) times atom_i (C,); removing it subtracts that and leaves the encoding's residual.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from featinv.analysis.concepts import ConceptBasis
from featinv.analysis.steering import steer


def _concept_indices(basis: ConceptBasis, concepts: int | Sequence[int]) -> list[int]:
    idx = [concepts] if isinstance(concepts, int) else list(concepts)
    bad = [i for i in idx if not 0 <= i < basis.k]
    if bad:
        raise ValueError(f"concept index {bad[0]} out of range: the basis has {basis.k} concepts (0..{basis.k - 1})")
    return idx


def contribution(basis: ConceptBasis, codes: Tensor, concepts: int | Sequence[int]) -> Tensor:
    """codes (N, k, h, w) -> the concepts' summed contribution code_i · atom_i to the map (N, C, h, w)."""
    idx = _concept_indices(basis, concepts)
    mask = torch.zeros(basis.k, device=codes.device)
    mask[idx] = 1.0
    return torch.einsum("nkhw,kc->nchw", codes.float() * mask.view(1, -1, 1, 1), basis.atoms.to(codes.device))


def remove(feats: Tensor, basis: ConceptBasis, concepts: int | Sequence[int], codes: Tensor | None = None,
           floor: float | None = None) -> Tensor:
    """feats (N, C, h, w) minus the concepts' contribution -> (N, C, h, w); the encoding's residual stays.

    Entries the concepts do not touch (zero code, zero atom entry) stay bit-identical. floor: clamp the
    changed entries from below (0 keeps a ReLU map non-negative). codes: basis.encode(feats), if known."""
    basis.check(feats)
    codes = basis.encode(feats) if codes is None else codes
    part = contribution(basis, codes, concepts).to(feats.dtype)
    edited = feats - part
    if floor is not None:
        edited = edited.clamp(min=floor)
    return torch.where(part != 0, edited, feats)


def concept_direction(basis: ConceptBasis, i: int) -> Tensor:
    """Concept i's atom as a unit steering direction -> (C,)."""
    (i,) = _concept_indices(basis, i)
    atom = basis.atoms[i].float()
    norm = atom.norm()
    if norm == 0:
        raise ValueError(f"concept {i} has a zero atom; it has no direction to steer along")
    return atom / norm


def steer_concept(feats: Tensor, basis: ConceptBasis, i: int, alphas: Sequence[float], mask: Tensor | None = None,
                  clamp=None) -> Tensor:
    """feats (B, C, h, w) steered along concept i's atom for each α -> (B, A, C, h, w) (see steering.steer)."""
    basis.check(feats)
    return steer(feats, concept_direction(basis, i).to(feats.device), alphas, mask, clamp)


def heat_map(codes: Tensor, i: int, size: int | tuple[int, int]) -> Tensor:
    """Concept i's code over the grid, bilinearly brought to image size -> (N, H, W) in feature units."""
    if codes.ndim != 4 or not 0 <= i < codes.shape[1]:
        raise ValueError(f"concept {i} out of range for codes of shape {tuple(codes.shape)}")
    size = (size, size) if isinstance(size, int) else tuple(size)
    return F.interpolate(codes[:, i:i + 1].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
