"""Composite features: exact endpoints and masks, channel selection through the head, cosine."""
from __future__ import annotations

import pytest
import torch
from analysis_helpers import random_extractor, random_reconstructor

from featinv.analysis.compose import (
    arithmetic,
    channel_contributions,
    feature_cosine,
    interpolate,
    keep_channels,
    paste,
    remove_channels,
    top_channels,
)


def test_interpolate_endpoints_are_exact():
    g = torch.Generator().manual_seed(0)
    fa, fb = torch.randn(2, 16, 3, 3, generator=g)
    path = interpolate(fa, fb, [0.0, 0.3, 1.0])
    assert path.shape == (3, 16, 3, 3)
    assert torch.equal(path[0], fa) and torch.equal(path[2], fb)
    torch.testing.assert_close(path[1], 0.7 * fa + 0.3 * fb)
    ga, gb = torch.randn(2, 3, 16, 3, 3, generator=g)
    batched = interpolate(ga, gb, [0.0, 0.3, 1.0, 0.5])
    assert batched.shape == (3, 4, 16, 3, 3)
    assert torch.equal(batched[2, 0], ga[2]) and torch.equal(batched[1, 2], gb[1])
    torch.testing.assert_close(batched[0, 3], 0.5 * ga[0] + 0.5 * gb[0])
    with pytest.raises(ValueError, match="differ in shape"):
        interpolate(fa, fb[:8], [0.5])


def test_interpolation_endpoints_reconstruct_as_the_inputs():
    ext = random_extractor()
    rec = random_reconstructor(ext, fixed_batch=4)  # a row's pixels then do not depend on its batch
    feats = rec.features(torch.rand(2, 3, 8, 8))
    path = interpolate(feats[0], feats[1], [0.0, 0.5, 1.0])
    keys = ["x"] * 3
    out = rec.from_features(path, keys)
    assert torch.equal(out[0], rec.from_features(feats[:1], ["x"])[0])
    assert torch.equal(out[2], rec.from_features(feats[1:], ["x"])[0])


def test_paste_keep_remove_arithmetic():
    g = torch.Generator().manual_seed(1)
    dst, src = torch.randn(2, 1, 8, 2, 2, generator=g)
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.25]])
    out = paste(dst, src, mask)
    assert torch.equal(out[..., 0, 0], src[..., 0, 0]) and torch.equal(out[..., 0, 1], dst[..., 0, 1])
    torch.testing.assert_close(out[..., 1, 1], 0.75 * dst[..., 1, 1] + 0.25 * src[..., 1, 1])
    with pytest.raises(ValueError, match="mask has shape"):
        paste(dst, src, torch.ones(3, 3))
    kept = keep_channels(dst, [1, 5])
    assert torch.equal(kept[:, [1, 5]], dst[:, [1, 5]]) and not kept[:, [0, 2, 3, 4, 6, 7]].any()
    removed = remove_channels(dst, [1, 5])
    assert not removed[:, [1, 5]].any() and torch.equal(removed[:, 0], dst[:, 0])
    with pytest.raises(ValueError, match="out of range for 8 channels"):
        remove_channels(dst, [8])
    torch.testing.assert_close(arithmetic(dst, src, src), dst)


def test_top_channels_explain_the_class_logit():
    ext = random_extractor()
    feats = ext(torch.rand(1, 3, 8, 8))
    contrib = channel_contributions(ext, feats, 2)
    logit = ext.logits_from_features(feats)[0, 2]
    torch.testing.assert_close(contrib.sum() + ext.model.head.bias[2], logit)
    idx = top_channels(ext, feats, 2, 5)
    assert idx.tolist() == contrib.argsort(descending=True)[:5].tolist()
    with pytest.raises(ValueError, match="class index 11"):
        top_channels(ext, feats, 11, 5)


def test_feature_cosine():
    f = torch.rand(3, 8, 2, 2)
    torch.testing.assert_close(feature_cosine(f, 2 * f), torch.ones(3))
    assert (feature_cosine(f, -f, pooled=True) < -0.99).all()
