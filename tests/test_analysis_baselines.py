"""Pixel optimisation (Mahendran & Vedaldi 2015): the feature distance falls, the prior smooths, bad settings."""
from __future__ import annotations

import pytest
import torch

from featinv.analysis.baselines import PixelInversionConfig, pixel_inversion, total_variation
from featinv.demo.digits import DigitsCNN, make_extractor
from featinv.diffusion.guidance import relative_feature_distance


@pytest.fixture(scope="module")
def extractor():
    torch.manual_seed(0)
    return make_extractor(DigitsCNN(), 8).eval()  # random weights: the demo classifier's shape (64x2x2 maps)


def test_the_feature_distance_falls_monotonically_on_average(extractor):
    torch.manual_seed(1)
    originals = torch.rand(4, 3, 8, 8)
    with torch.no_grad():
        target = extractor(originals)
    images, history = pixel_inversion(extractor, target, 8, PixelInversionConfig(steps=60, tv_weight=0.01))
    assert images.shape == (4, 3, 8, 8) and images.min() >= 0 and images.max() <= 1
    assert history.shape == (60, 4)
    windows = history.mean(1).view(6, 10).mean(1)  # mean distance over windows of 10 steps
    assert (windows[1:] < windows[:-1]).all(), windows
    with torch.no_grad():
        final = relative_feature_distance(extractor(images), target)
    assert (final < 0.5 * history[0]).all(), (history[0], final)


def test_the_tv_prior_makes_smoother_images(extractor):
    target = extractor(torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))).detach()
    cfg = PixelInversionConfig(steps=30, tv_weight=0.0)
    rough, _ = pixel_inversion(extractor, target, 8, cfg)
    smooth, _ = pixel_inversion(extractor, target, 8, PixelInversionConfig(steps=30, tv_weight=5.0))
    assert (total_variation(smooth) < total_variation(rough)).all()
    again, _ = pixel_inversion(extractor, target, 8, cfg)
    assert torch.equal(again, rough)  # seeded: the same start, the same result


def test_total_variation_values():
    ramp = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 4, 4)  # +1 per column
    assert total_variation(ramp).item() == pytest.approx(1.0)
    assert total_variation(ramp, beta=1.0).item() == pytest.approx(1.0, abs=1e-4)
    assert total_variation(torch.ones(2, 3, 5, 5)).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("kw, message", [
    (dict(steps=0), r"^PixelInversionConfig\.steps must be >= 1, got 0$"),
    (dict(lr=0.0), r"^PixelInversionConfig\.lr must be a finite number > 0, got 0\.0$"),
    (dict(tv_weight=-1.0), r"^PixelInversionConfig\.tv_weight must be a finite number >= 0, got -1\.0$"),
])
def test_bad_settings_are_one_line_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        PixelInversionConfig(**kw)


def test_a_feature_function_without_gradient_is_refused(extractor):
    with pytest.raises(ValueError, match="no gradient"):
        pixel_inversion(torch.no_grad()(extractor), torch.randn(1, 64, 2, 2), 8, PixelInversionConfig(steps=1))
