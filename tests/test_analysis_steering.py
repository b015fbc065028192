"""Steering: direction sources recover planted directions, masks and α = 0 leave features bitwise alone."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from analysis_helpers import random_extractor, random_reconstructor

from featinv.analysis.steering import (
    box_mask,
    channel_direction,
    class_direction,
    feature_range,
    feature_scale,
    mask_from_image,
    mean_difference_direction,
    probe_direction,
    steer,
    steer_and_reconstruct,
)


def planted(c: int = 32, n: int = 1000, seed: int = 0):
    """Two sets of (n, c, 2, 2) maps that differ along one random unit direction (plus isotropic noise)."""
    g = torch.Generator().manual_seed(seed)
    d = F.normalize(torch.randn(c, generator=g), dim=0)
    base = torch.randn(c, generator=g) * 3
    noise = lambda: torch.randn(n, c, 2, 2, generator=g)  # noqa: E731
    concept = base.view(1, c, 1, 1) + 2.0 * d.view(1, c, 1, 1) + noise()
    other = base.view(1, c, 1, 1) + noise()
    return d, concept, other


@pytest.mark.parametrize("source", [mean_difference_direction, probe_direction])
def test_planted_direction_is_recovered(source):
    d, concept, other = planted()
    found = source(concept, other)
    assert found.shape == d.shape
    assert abs(found.norm().item() - 1) < 1e-5
    assert torch.dot(found, d).item() > 0.99
    assert torch.dot(source(other, concept), d).item() < -0.99  # sign: towards the concept


def test_class_and_channel_directions():
    ext = random_extractor()
    w = ext.model.head.weight
    d = class_direction(ext, 3)
    torch.testing.assert_close(d, w[3] / w[3].norm())
    with pytest.raises(ValueError, match="class index 10 out of range"):
        class_direction(ext, 10)
    assert channel_direction(64, 5).nonzero().flatten().tolist() == [5]
    with pytest.raises(ValueError, match="channel index 64"):
        channel_direction(64, 64)


def test_steer_units_alpha_zero_and_mask():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 16, 4, 4, generator=g).relu()
    d = F.normalize(torch.randn(16, generator=g), dim=0)
    out = steer(feats, d, [0.0, 0.5, 2.0])
    assert out.shape == (3, 3, 16, 4, 4)
    assert torch.equal(out[:, 0], feats)
    # α is in units of the mean per-location norm: every location moves by α · scale.
    moved = (out[:, 2] - feats).norm(dim=1)
    torch.testing.assert_close(moved, 2.0 * feature_scale(feats).view(3, 1, 1).expand(3, 4, 4))
    mask = torch.zeros(4, 4)
    mask[1:3, 2:] = 1
    masked = steer(feats, d, [1.0], mask=mask)[:, 0]
    assert torch.equal(masked[..., mask == 0], feats[..., mask == 0])
    assert not torch.equal(masked[..., mask == 1], feats[..., mask == 1])
    with pytest.raises(ValueError, match=r"mask has shape \(2, 2\), the feature grid is \(4, 4\)"):
        steer(feats, d, [1.0], mask=torch.ones(2, 2))
    with pytest.raises(ValueError, match="direction has shape"):
        steer(feats, d[:8], [1.0])


def test_clamp_keeps_edits_in_range_and_the_rest_bitwise():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(4, 8, 2, 2, generator=g).relu()
    lo, hi = feature_range(feats)
    assert (lo >= 0).all() and lo.shape == (8,)
    d = channel_direction(8, 2) * -1  # pushes channel 2 below zero
    out = steer(feats, d, [0.0, 3.0], clamp=(lo, hi))
    assert torch.equal(out[:, 0], feats)
    assert (out[:, 1, 2] >= lo[2]).all() and out[:, 1, 2].min() == lo[2]
    others = [c for c in range(8) if c != 2]
    assert torch.equal(out[:, 1, others], feats[:, others])  # zero components are not clamped either
    unclamped = steer(feats, d, [3.0])
    assert (unclamped[:, 0, 2] < 0).any()
    lo_l, hi_l = feature_range(feats, per_location=True)
    assert lo_l.shape == (8, 2, 2) and (lo_l >= lo.view(8, 1, 1)).all() and (hi_l <= hi.view(8, 1, 1)).all()
    up = steer(feats, channel_direction(8, 5), [5.0], clamp=(lo_l, hi_l))[:, 0]
    assert torch.equal(up[:, 5].amax(dim=0), hi_l[5])  # each location stops at its own maximum


def test_box_and_image_masks():
    m = box_mask((0, 0, 4, 8), 8, (2, 2))  # left half of an 8x8 image
    torch.testing.assert_close(m, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    m = box_mask((2, 0, 6, 4), 8, (2, 2))  # straddles the top two cells
    torch.testing.assert_close(m, torch.tensor([[0.5, 0.5], [0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"mask box \(0, 0, 9, 4\)"):
        box_mask((0, 0, 9, 4), 8, (2, 2))
    img = torch.zeros(8, 8)
    img[4:, 4:] = 1
    torch.testing.assert_close(mask_from_image(img, (2, 2)), torch.tensor([[0.0, 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="smaller than the feature grid"):
        mask_from_image(torch.ones(1, 1), (2, 2))


def test_alpha_zero_reproduces_the_plain_reconstruction_bitwise():
    ext = random_extractor()
    rec = random_reconstructor(ext)
    images = torch.rand(2, 3, 8, 8)
    feats = rec.features(images)
    keys = ["a", "b"]
    plain = rec.from_features(feats, keys)
    d = class_direction(ext, 4)
    samples = steer_and_reconstruct(rec, feats, d, [0.0, 1.0], keys)
    assert samples.shape == (2, 2, 2, 3, 8, 8)
    assert torch.equal(samples[:, 0], plain)
    assert not torch.equal(samples[:, 1], plain)
