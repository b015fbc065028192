"""Code edits by concept: set_code and swap move each location by Δcode · atom and keep the residual, masks
confine them, levels are quantiles of real codes, top_concepts finds a class's concepts, bad input is refused."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from featinv.analysis.concept_edits import (
    active_at,
    class_levels,
    code_levels,
    pixel_cell,
    set_code,
    swap,
    top_concepts,
)
from featinv.analysis.concepts import ConceptBasis

K, C, GRID = 4, 12, 4


def pca_basis(seed: int = 0) -> ConceptBasis:
    """Orthonormal atoms (signed codes) around a random offset."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.linalg.qr(torch.randn(C, K, generator=g)).Q.T.contiguous()
    return ConceptBasis(atoms, "pca", torch.randn(C, generator=g))


def nmf_basis(seed: int = 0) -> ConceptBasis:
    """Non-negative unit atoms (non-negative codes), no offset."""
    atoms = torch.rand(K, C, generator=torch.Generator().manual_seed(seed))
    return ConceptBasis(atoms / atoms.norm(dim=1, keepdim=True), "nmf", torch.zeros(C))


@dataclass(frozen=True, eq=False)
class ToySAE:
    """A sparse autoencoder with the attributes the code edits read: codes = ReLU((x − b_pre) W_encᵀ + b_enc),
    x_hat = codes @ W_dec + b_pre (atoms = W_dec rows, not unit); x − x_hat is its error term."""

    w_enc: Tensor
    b_enc: Tensor
    atoms: Tensor
    b_pre: Tensor

    k = property(lambda self: self.atoms.shape[0])
    channels = property(lambda self: self.atoms.shape[1])

    def encode(self, feats: Tensor) -> Tensor:
        x = feats.permute(0, 2, 3, 1) - self.b_pre
        return torch.relu(x @ self.w_enc.T + self.b_enc).permute(0, 3, 1, 2)

    def decode(self, codes: Tensor) -> Tensor:
        return torch.einsum("nkhw,kc->nchw", codes, self.atoms) + self.b_pre.view(1, -1, 1, 1)


def toy_sae(seed: int = 0) -> ToySAE:
    g = torch.Generator().manual_seed(seed)
    return ToySAE(torch.randn(K, C, generator=g), torch.zeros(K), 2 * torch.randn(K, C, generator=g),
                  torch.randn(C, generator=g))


BASES = {"pca": pca_basis, "nmf": nmf_basis, "sae": toy_sae}


def random_maps(n: int = 6, seed: int = 1) -> Tensor:
    """Non-negative maps (n, C, GRID, GRID), so the nmf basis can encode them."""
    return torch.rand(n, C, GRID, GRID, generator=torch.Generator().manual_seed(seed))


def along(delta: Tensor, atoms: Tensor) -> Tensor:
    """delta (N, m, h, w) code changes along atoms (m, C) -> the change of the map (N, C, h, w)."""
    return torch.einsum("nmhw,mc->nchw", delta, atoms)


@pytest.mark.parametrize("name", BASES)
def test_set_code_moves_each_location_by_level_minus_code_and_keeps_the_residual(name):
    basis, feats = BASES[name](), random_maps()
    codes = basis.encode(feats)
    edited = set_code(feats, basis, 2, 1.5)
    assert edited.dtype == torch.float32 and edited.shape == feats.shape
    expected = along(1.5 - codes[:, 2:3], basis.atoms[2:3])
    torch.testing.assert_close(edited - feats, expected, rtol=0, atol=1e-5)
    new_codes = codes.clone()
    new_codes[:, 2] = 1.5
    # what the basis does not explain (the encoding's residual, the SAE's error term) is untouched
    torch.testing.assert_close(edited - basis.decode(new_codes), feats - basis.decode(codes), rtol=0, atol=1e-5)
    several = set_code(feats, basis, [0, 3], torch.tensor([0.5, -1.0]), codes=codes)
    expected = along(torch.tensor([0.5, -1.0]).view(1, 2, 1, 1) - codes[:, [0, 3]], basis.atoms[[0, 3]])
    torch.testing.assert_close(several - feats, expected, rtol=0, atol=1e-5)


def test_set_code_on_an_orthonormal_basis_re_encodes_to_the_level():
    basis, feats = pca_basis(), 3 * torch.randn(5, C, GRID, GRID)
    codes = basis.encode(feats)
    edited = set_code(feats, basis, [1, 2], torch.tensor([2.0, -0.5]))
    new_codes = basis.encode(edited)
    torch.testing.assert_close(new_codes[:, 1], torch.full_like(new_codes[:, 1], 2.0), rtol=0, atol=1e-5)
    torch.testing.assert_close(new_codes[:, 2], torch.full_like(new_codes[:, 2], -0.5), rtol=0, atol=1e-5)
    torch.testing.assert_close(new_codes[:, [0, 3]], codes[:, [0, 3]], rtol=0, atol=1e-5)
    # the component orthogonal to the basis span is unchanged
    outside = torch.eye(C) - basis.atoms.T @ basis.atoms
    torch.testing.assert_close(torch.einsum("cd,ndhw->nchw", outside, edited),
                               torch.einsum("cd,ndhw->nchw", outside, feats), rtol=0, atol=1e-5)


def maps_without(name: str, sources: list[int]) -> tuple:
    """(basis, maps on which its ``sources`` concepts do not fire): pca and nmf maps decoded from codes that are
    0 there (pca plus a residual off the span), an SAE whose sources' encoder bias keeps them off."""
    basis, g = BASES[name](), torch.Generator().manual_seed(5)
    if name == "sae":
        bias = basis.b_enc.clone()
        bias[sources] = -1e3
        return ToySAE(basis.w_enc, bias, basis.atoms, basis.b_pre), random_maps()
    codes = torch.rand(6, K, GRID, GRID, generator=g)
    codes[:, sources] = 0.0
    feats = basis.decode(codes)
    if name == "pca":
        off_span = torch.eye(C) - basis.atoms.T @ basis.atoms
        feats = feats + torch.einsum("cd,ndhw->nchw", off_span, torch.randn(feats.shape, generator=g))
    return basis, feats


@pytest.mark.parametrize("name", BASES)
def test_swap_where_the_sources_are_inactive_changes_only_the_targets(name):
    basis, feats = maps_without(name, [0, 1])
    codes = basis.encode(feats)
    torch.testing.assert_close(codes[:, [0, 1]], torch.zeros_like(codes[:, [0, 1]]), rtol=0, atol=1e-5)
    levels = torch.tensor([9.0, 9.0, 0.7, 1.3])
    edited = swap(feats, basis, [0, 1], [2, 3], levels)
    expected = along(levels[[2, 3]].view(1, 2, 1, 1) - codes[:, [2, 3]], basis.atoms[[2, 3]])
    torch.testing.assert_close(edited - feats, expected, rtol=0, atol=1e-5)
    # a concept in both sets ends at its target level; one float sets every target
    torch.testing.assert_close(swap(feats, basis, [0, 2], [2, 3], levels, codes=codes), edited, rtol=0, atol=1e-6)
    torch.testing.assert_close(swap(feats, basis, [], 3, 0.25, codes=codes), set_code(feats, basis, 3, 0.25, codes=codes))


def test_swap_removes_active_sources_and_sets_targets_on_an_orthonormal_basis():
    basis, feats = pca_basis(), 3 * torch.randn(5, C, GRID, GRID)
    levels = torch.tensor([0.0, 0.0, 0.0, 4.0])
    new_codes = basis.encode(swap(feats, basis, [0, 1], [3], levels))
    torch.testing.assert_close(new_codes[:, [0, 1]], torch.zeros_like(new_codes[:, [0, 1]]), rtol=0, atol=1e-5)
    torch.testing.assert_close(new_codes[:, 3], torch.full_like(new_codes[:, 3], 4.0), rtol=0, atol=1e-5)


@pytest.mark.parametrize("per_map", [False, True])
def test_masks_confine_the_change(per_map):
    basis, feats = pca_basis(), random_maps()
    weights = torch.zeros(GRID, GRID)
    weights[1:3, 2:] = torch.tensor([[1.0, 0.5], [0.25, 1.0]])
    mask = weights.expand(len(feats), 1, GRID, GRID).clone() if per_map else weights
    full = set_code(feats, basis, [0, 2], 2.0) - feats
    masked = set_code(feats, basis, [0, 2], 2.0, mask=mask) - feats
    assert (masked[..., weights == 0] == 0).all()  # exactly zero change outside the mask
    torch.testing.assert_close(masked, full * weights, rtol=0, atol=1e-6)
    assert (swap(feats, basis, [1], [0, 2], 2.0, mask=mask)[..., weights == 0] == feats[..., weights == 0]).all()


def test_code_levels_are_quantiles_of_the_non_zero_codes():
    basis = nmf_basis()
    g = torch.Generator().manual_seed(3)
    codes = torch.rand(8, K, GRID, GRID, generator=g) * (torch.rand(8, K, GRID, GRID, generator=g) < 0.4)
    codes[:, 2] = 0.0  # concept 2 never fires
    for q in (0.0, 0.3, 0.9, 1.0):
        levels = code_levels(basis, codes, q)
        assert levels.shape == (K,) and levels[2] == 0
        for i in (0, 1, 3):
            values = codes[:, i][codes[:, i] != 0]
            torch.testing.assert_close(levels[i], torch.quantile(values, q), rtol=0, atol=1e-6)
    labels = torch.tensor([0, 0, 0, 2, 2, 0, 2, 2])  # class 1 has no maps
    per_class = class_levels(basis, codes, labels, 0.75)
    assert per_class.shape == (3, K) and (per_class[1] == 0).all() and (per_class[:, 2] == 0).all()
    for c in (0, 2):
        torch.testing.assert_close(per_class[c], code_levels(basis, codes[labels == c], 0.75))
        values = codes[labels == c][:, 0]
        torch.testing.assert_close(per_class[c, 0], torch.quantile(values[values != 0], 0.75), rtol=0, atol=1e-6)


def test_top_concepts_pick_a_class_and_a_class_swap_lands_on_its_levels():
    basis = pca_basis()
    g = torch.Generator().manual_seed(4)
    labels = torch.tensor([0, 1] * 6)
    codes = 0.1 * torch.rand(12, K, GRID, GRID, generator=g)
    codes[labels == 0, 0] += 2.0
    codes[labels == 0, 1] += 1.0
    codes[labels == 1, 3] += 3.0
    codes[labels == 1, 2] += 0.5
    feats = basis.decode(codes)
    codes = basis.encode(feats)
    assert top_concepts(basis, codes, labels, 0, 2) == [0, 1]
    assert top_concepts(basis, codes, labels, 1, 2) == [3, 2]
    levels = class_levels(basis, codes, labels)[1]
    class0 = labels == 0
    edited = swap(feats[class0], basis, top_concepts(basis, codes, labels, 0, 2),
                  top_concepts(basis, codes, labels, 1, 2), levels)
    new_codes = basis.encode(edited)
    torch.testing.assert_close(new_codes[:, [0, 1]], torch.zeros_like(new_codes[:, [0, 1]]), rtol=0, atol=1e-5)
    torch.testing.assert_close(new_codes[:, [2, 3]], levels[[2, 3]].view(1, 2, 1, 1).expand_as(new_codes[:, [2, 3]]),
                               rtol=0, atol=1e-5)


def test_bad_inputs_are_refused():
    basis, feats = pca_basis(), random_maps(2)
    codes, labels = basis.encode(feats), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"concept index 7 out of range: the basis has 4 concepts \(0..3\)"):
        set_code(feats, basis, [1, 7], 1.0)
    with pytest.raises(ValueError, match=r"concept index -1 out of range"):
        swap(feats, basis, [-1], [2], 1.0)
    with pytest.raises(ValueError, match="level must be finite"):
        set_code(feats, basis, 1, float("nan"))
    with pytest.raises(ValueError, match="level must be finite"):
        swap(feats, basis, [0], [1], torch.tensor([0.0, float("inf"), 0.0, 0.0]))
    with pytest.raises(ValueError, match=r"level must be one value or one per concept \(2\), got shape \(3,\)"):
        set_code(feats, basis, [0, 1], torch.ones(3))
    with pytest.raises(ValueError, match=r"levels must be one float or \(4,\), one per concept, got shape \(3,\)"):
        swap(feats, basis, [0], [1], torch.ones(3))
    with pytest.raises(ValueError, match=r"mask has shape \(3, 3\); the feature maps \(2, 12, 4, 4\) take \(4, 4\)"):
        set_code(feats, basis, 1, 1.0, mask=torch.ones(3, 3))
    with pytest.raises(ValueError, match=r"mask has shape \(5, 1, 4, 4\)"):
        swap(feats, basis, [0], [1], 1.0, mask=torch.ones(5, 1, GRID, GRID))
    with pytest.raises(ValueError, match=r"mask weights must lie in \[0, 1\]"):
        set_code(feats, basis, 1, 1.0, mask=torch.full((GRID, GRID), 2.0))
    with pytest.raises(ValueError, match=r"feature maps must be \(N, 12, h, w\) for this 12-channel basis, got "
                                         r"shape \(2, 7, 4, 4\)"):
        set_code(torch.rand(2, 7, GRID, GRID), basis, 1, 1.0, codes=codes)
    with pytest.raises(ValueError, match=r"codes must be \(N, 4, h, w\) for this 4-concept basis, got shape"):
        set_code(feats, basis, 1, 1.0, codes=codes[:, :3])
    with pytest.raises(ValueError, match=r"codes of shape \(1, 4, 4, 4\) do not belong to feature maps of shape"):
        set_code(feats, basis, 1, 1.0, codes=codes[:1])
    with pytest.raises(ValueError, match=r"concepts \[1, 1\] list one concept more than once"):
        set_code(feats, basis, [1, 1], 1.0)
    with pytest.raises(ValueError, match=r"quantile must lie in \[0, 1\], got 90"):
        code_levels(basis, codes, 90)
    with pytest.raises(ValueError, match=r"labels must be \(2,\) non-negative class indices"):
        class_levels(basis, codes, torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match=r"n=5 concepts asked for: the basis has 4 \(1..4\)"):
        top_concepts(basis, codes, labels, 0, 5)
    with pytest.raises(ValueError, match="class 3 has 0 of the 2 maps"):
        top_concepts(basis, codes, labels, 3, 1)


def test_active_at_lists_the_non_zero_codes_of_a_cell_strongest_first():
    codes = torch.zeros(1, 5, 2, 3)
    codes[0, :, 1, 2] = torch.tensor([0.5, 0.0, -2.0, 0.5, 1.0])  # signed (pca): |−2| is the strongest
    codes[0, 1, 0, 0] = 3.0
    assert active_at(codes, 1, 2) == [(2, -2.0), (4, 1.0), (0, 0.5), (3, 0.5)]  # a tie keeps index order
    assert active_at(codes, 1, 2, top=2) == [(2, -2.0), (4, 1.0)]
    assert active_at(codes, 0, 0) == [(1, 3.0)] and active_at(codes, 0, 1) == []
    for row, col in ((2, 0), (0, 3), (-1, 0)):
        with pytest.raises(ValueError, match=rf"cell \({row}, {col}\) is outside the 2x3 feature grid"):
            active_at(codes, row, col)
    with pytest.raises(ValueError, match=r"one map's \(1, k, h, w\), got shape \(2, 5, 2, 3\)"):
        active_at(codes.expand(2, -1, -1, -1), 0, 0)


def test_pixel_cell_maps_pixels_to_the_grid_cell_over_them():
    assert pixel_cell(0, 0, 8, (2, 2)) == (0, 0)
    assert pixel_cell(3.9, 4, 8, (2, 2)) == (1, 0)
    assert pixel_cell(7.99, 7, 8, (2, 2)) == (1, 1)
    assert pixel_cell(100, 10, (20, 224), (2, 7)) == (1, 3)  # (H, W) = (20, 224): cells 10 rows, 32 columns
    for x, y in ((8, 0), (0, -0.5)):
        with pytest.raises(ValueError, match=rf"pixel \({x:g}, {y:g}\) is outside the 8x8 image"):
            pixel_cell(x, y, 8, (2, 2))
