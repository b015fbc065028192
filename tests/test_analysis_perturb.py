"""Perturbations: corruptions change images within [0, 1]; PGD stays in its budget and moves the loss."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from analysis_helpers import random_extractor

from featinv.analysis.perturb import CORRUPTIONS, corrupt, pgd


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corruptions_grow_with_severity(kind):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 16, 16, generator=g)
    dist = []
    for severity in (1, 2, 3):
        out = corrupt(images, kind, severity, generator=torch.Generator().manual_seed(1))
        assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
        dist.append((out - images).abs().mean().item())
    assert dist[0] > 0
    assert dist[0] < dist[2]


def test_corrupt_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown corruption 'fog'"):
        corrupt(torch.rand(1, 3, 8, 8), "fog", 1)
    with pytest.raises(ValueError, match="severity must be 1, 2 or 3"):
        corrupt(torch.rand(1, 3, 8, 8), "blur", 4)


def test_pgd_stays_in_budget_and_moves_the_loss():
    ext = random_extractor()
    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    labels = ext.classify(images).argmax(1)
    eps = 0.05
    adv = pgd(ext, images, labels, eps=eps, steps=5, step_size=0.02)
    assert (adv - images).abs().max() <= eps + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        assert F.cross_entropy(ext.classify(adv), labels) > F.cross_entropy(ext.classify(images), labels)
    target = (labels + 1) % 10
    adv_t = pgd(ext, images, labels, eps=eps, steps=5, step_size=0.02, target=target)
    assert (adv_t - images).abs().max() <= eps + 1e-6
    with torch.no_grad():
        assert F.cross_entropy(ext.classify(adv_t), target) < F.cross_entropy(ext.classify(images), target)
