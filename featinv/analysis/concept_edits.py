"""Edits by concept: a concept's contribution to a feature map, the map without it, its atom as a steering
direction, where it sits (its code over the grid, brought to image size; the concepts active at a cell), and edits
of its code.

A basis (:class:`featinv.analysis.concepts.ConceptBasis`) has unit atoms, so concept i's contribution to a map
is code_i (N, 1, h, w) times atom_i (C,); removing it subtracts that and leaves the encoding's residual.

Code edits (:func:`set_code`, :func:`swap`) set a concept's code to a level instead of adding its atom with a
free strength. They need only a decode that is affine in the codes (decode(codes) = Σ_i code_i · atom_i + b, as
for every :class:`ConceptBasis` method and a sparse autoencoder's codes @ W_dec + b_pre) and read only
``basis.encode``, ``basis.atoms``, ``basis.k`` and ``basis.channels``: the edit is x' = x + Σ_i (level_i − code_i)
· atom_i, so what the basis leaves unexplained (the encoding's residual, an SAE's error term) stays as it was.
Levels come from the concept's own codes on real maps (:func:`code_levels`, :func:`class_levels`). Class a to
class b with n concepts::

    codes = basis.encode(fit_feats)
    levels = class_levels(basis, codes, labels)[b]
    edited = swap(feats, basis, top_concepts(basis, codes, labels, a, n), top_concepts(basis, codes, labels, b, n),
                  levels)
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


# ----- code edits ----------------------------------------------------------------------------------

def _check_codes(basis: ConceptBasis, codes: Tensor, feats: Tensor | None = None) -> None:
    """ValueError unless codes is (N, k, h, w) for ``basis`` (and, with feats, on feats' maps and grid)."""
    if codes.ndim != 4 or codes.shape[1] != basis.k:
        raise ValueError(f"codes must be (N, {basis.k}, h, w) for this {basis.k}-concept basis, "
                         f"got shape {tuple(codes.shape)}")
    if feats is not None and (codes.shape[0], *codes.shape[2:]) != (feats.shape[0], *feats.shape[2:]):
        raise ValueError(f"codes of shape {tuple(codes.shape)} do not belong to feature maps of shape "
                         f"{tuple(feats.shape)} (maps and grid differ)")


def _check_feats(basis: ConceptBasis, feats: Tensor) -> None:
    if feats.ndim != 4 or feats.shape[1] != basis.channels:
        raise ValueError(f"feature maps must be (N, {basis.channels}, h, w) for this {basis.channels}-channel "
                         f"basis, got shape {tuple(feats.shape)}")


def _check_labels(codes: Tensor, labels: Tensor) -> Tensor:
    if labels.shape != codes.shape[:1] or labels.is_floating_point() or (labels < 0).any():
        raise ValueError(f"labels must be ({codes.shape[0]},) non-negative class indices, one per map, got "
                         f"{labels.dtype} of shape {tuple(labels.shape)}")
    return labels.to(codes.device)


def nonzero_quantile(values: Tensor, quantile: float) -> Tensor:
    """values (R, M) -> (R,) float32: each row's ``quantile`` of its non-zero entries, linearly interpolated as
    torch.quantile does (which refuses inputs beyond 2**24 entries); 0 for a row without any."""
    if values.shape[1] == 0:
        return values.new_zeros(len(values), dtype=torch.float32)
    values = values.float()
    count = (values != 0).sum(dim=1, keepdim=True)
    ranked = values.masked_fill(values == 0, float("inf")).sort(dim=1).values  # non-zero entries first
    pos = quantile * (count - 1).clamp(min=0)
    lo, hi = ranked.gather(1, pos.floor().long()), ranked.gather(1, pos.ceil().long())
    level = torch.lerp(lo, hi, pos - pos.floor())
    return torch.where(count > 0, level, 0.0)[:, 0]


def code_levels(basis: ConceptBasis, codes: Tensor, quantile: float = 0.9) -> Tensor:
    """Each concept's typical firing level: the ``quantile`` of its non-zero codes -> (k,) float32.

    codes: (N, k, h, w) = basis.encode(maps of a fit set). A level comes from the concept's own distribution on
    real data (zeros, where it does not fire, left out), so setting a code to it keeps the map inside what the
    basis saw; 0 for a concept that never fires."""
    _check_codes(basis, codes)
    if not 0 <= quantile <= 1:
        raise ValueError(f"quantile must lie in [0, 1], got {quantile}")
    return nonzero_quantile(codes.transpose(0, 1).flatten(1), quantile)


def class_levels(basis: ConceptBasis, codes: Tensor, labels: Tensor, quantile: float = 0.9) -> Tensor:
    """Per class, each concept's ``quantile`` of non-zero codes over that class's maps -> (labels.max() + 1, k).

    codes: (N, k, h, w) = basis.encode(maps of a fit set); labels: (N,) int class of each map. Row c is class
    c's typical code of each concept, from the concept's own distribution on that class's real maps; 0 where
    the concept never fires on the class (or the class has no maps)."""
    _check_codes(basis, codes)
    labels = _check_labels(codes, labels)
    classes = int(labels.max()) + 1 if len(labels) else 0
    rows = [code_levels(basis, codes[labels == c], quantile) for c in range(classes)]
    return torch.stack(rows) if rows else codes.new_zeros(0, basis.k, dtype=torch.float32)


def _grid_mask(mask: Tensor, feats: Tensor) -> Tensor:
    """(h, w) or (N, 1, h, w) weights in [0, 1] -> (N or 1, 1, h, w) float32 on feats' device."""
    n, _, h, w = feats.shape
    if mask.shape not in ((h, w), (n, 1, h, w)):
        raise ValueError(f"mask has shape {tuple(mask.shape)}; the feature maps {tuple(feats.shape)} take "
                         f"({h}, {w}) or ({n}, 1, {h}, {w})")
    mask = mask.to(feats.device, torch.float32).view(-1, 1, h, w)
    if not ((mask >= 0) & (mask <= 1)).all():  # NaN fails too
        raise ValueError(f"mask weights must lie in [0, 1], got {mask.min():.3g}..{mask.max():.3g}")
    return mask


def set_code(feats: Tensor, basis: ConceptBasis, i: int | Sequence[int], level: float | Tensor,
             mask: Tensor | None = None, codes: Tensor | None = None) -> Tensor:
    """feats (N, C, h, w) with concept i's code set to ``level`` -> (N, C, h, w) float32 on feats' device.

    Each location moves by (level − code_i) · atom_i (for several concepts, the sum over them), so its residual
    x − decode(codes) is kept: x' − decode(codes') = x − decode(codes). With an orthonormal basis (pca)
    re-encoding x' gives code_i = level; a non-negative or sparse encoder (nmf, dict, an SAE) may share the
    change out over other concepts. level: a float, or a tensor of one level or one per concept in i (finite,
    in feature units: see :func:`code_levels`). mask: (h, w) or (N, 1, h, w) weights in [0, 1] that scale the
    change (0: the location is unchanged). codes: basis.encode(feats), if known."""
    idx = _concept_indices(basis, i)
    if len(set(idx)) < len(idx):
        raise ValueError(f"concepts {idx} list one concept more than once")
    _check_feats(basis, feats)
    codes = basis.encode(feats) if codes is None else codes
    _check_codes(basis, codes, feats)
    level = torch.as_tensor(level, dtype=torch.float32, device=feats.device)
    if level.numel() not in (1, len(idx)) or level.ndim > 1:
        raise ValueError(f"level must be one value or one per concept ({len(idx)}), got shape {tuple(level.shape)}")
    if not torch.isfinite(level).all():
        raise ValueError(f"level must be finite, got {level.tolist()}")
    delta = level.reshape(-1, 1, 1) - codes[:, idx].to(feats.device, torch.float32)
    if mask is not None:
        delta = delta * _grid_mask(mask, feats)
    atoms = basis.atoms[idx].to(feats.device, torch.float32)
    return feats.float() + torch.einsum("nmhw,mc->nchw", delta, atoms)


def swap(feats: Tensor, basis: ConceptBasis, source: int | Sequence[int], target: int | Sequence[int],
         levels: Tensor | float, mask: Tensor | None = None, codes: Tensor | None = None) -> Tensor:
    """feats (N, C, h, w) with the source concepts' codes set to 0 and the target concepts' to their levels
    -> (N, C, h, w) float32 (a :func:`set_code` of both sets at once, residual kept).

    levels: (k,) a level per concept (e.g. a row of :func:`class_levels`), or one float for every target. A
    concept in both sets ends at its target level. Where the source concepts are inactive (code 0) only the
    targets' contributions change. mask, codes: as for :func:`set_code`."""
    target = list(dict.fromkeys(_concept_indices(basis, target)))
    source = [s for s in dict.fromkeys(_concept_indices(basis, source)) if s not in target]
    levels = torch.as_tensor(levels, dtype=torch.float32, device=feats.device)
    if levels.shape not in ((), (basis.k,)):
        raise ValueError(f"levels must be one float or ({basis.k},), one per concept, got shape "
                         f"{tuple(levels.shape)}")
    target_levels = levels[target] if levels.ndim else levels.expand(len(target))
    return set_code(feats, basis, source + target, torch.cat([levels.new_zeros(len(source)), target_levels]), mask,
                    codes)


def top_concepts(basis: ConceptBasis, codes: Tensor, labels: Tensor, cls: int, n: int) -> list[int]:
    """Class ``cls``'s n most distinctive concepts, highest score first -> n indices.

    Score of concept i: its mean code over the maps of class cls minus its mean code over all other maps (every
    location counts, zeros included; feature units). codes: (N, k, h, w) = basis.encode(maps); labels: (N,)."""
    _check_codes(basis, codes)
    labels = _check_labels(codes, labels)
    if not 1 <= n <= basis.k:
        raise ValueError(f"n={n} concepts asked for: the basis has {basis.k} (1..{basis.k})")
    mine = labels == cls
    if not mine.any() or mine.all():
        raise ValueError(f"class {cls} has {int(mine.sum())} of the {len(labels)} maps; scoring its concepts needs "
                         "maps of it and of other classes")
    means = codes.float().mean(dim=(2, 3))
    score = means[mine].mean(dim=0) - means[~mine].mean(dim=0)
    return score.argsort(descending=True, stable=True)[:n].tolist()


# ----- where concepts sit ---------------------------------------------------------------------------

def pixel_cell(x: float, y: float, size: int | tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
    """Pixel (x, y) of an image of ``size`` (S or (H, W)) -> (row, col) of the (h, w) feature grid over it.

    Cell (row, col) covers the pixels [col·W/w, (col+1)·W/w) × [row·H/h, (row+1)·H/h), as
    :func:`featinv.analysis.steering.box_mask` reads a box; ValueError for a pixel outside the image."""
    height, width = (size, size) if isinstance(size, int) else size
    h, w = grid
    if not (0 <= x < width and 0 <= y < height):
        raise ValueError(f"pixel ({x:g}, {y:g}) is outside the {width}x{height} image")
    return min(int(y * h // height), h - 1), min(int(x * w // width), w - 1)


def active_at(codes: Tensor, row: int, col: int, top: int | None = None) -> list[tuple[int, float]]:
    """The concepts active (code ≠ 0) at grid cell (row, col) of one map's codes (1, k, h, w) -> [(concept, code)],
    strongest |code| first (ties: lower index first), at most ``top`` of them.

    Codes are signed for PCA, so strength is the magnitude; a non-negative or sparse encoder's zeros are the
    concepts that do not fire there."""
    if codes.ndim != 4 or codes.shape[0] != 1:
        raise ValueError(f"codes must be one map's (1, k, h, w), got shape {tuple(codes.shape)}")
    h, w = codes.shape[2:]
    if not (0 <= row < h and 0 <= col < w):
        raise ValueError(f"cell ({row}, {col}) is outside the {h}x{w} feature grid (rows 0..{h - 1}, cols 0..{w - 1})")
    if top is not None and top < 1:
        raise ValueError(f"top={top}: ask for at least one concept")
    cell = codes[0, :, row, col].float().cpu()
    order = cell.abs().argsort(descending=True, stable=True)
    active = [(int(i), float(cell[i])) for i in order if cell[i] != 0]
    return active[:top]
