"""Tiny random stand-ins for the analysis tests: a DigitsCNN extractor and a demo-shaped FeatInv."""
from __future__ import annotations

import dataclasses

import torch

from featinv.demo import QUICK, DigitsCNN, make_extractor, model_config
from featinv.model import FeatInv
from featinv.reconstruct import Reconstructor, SampleConfig

FAST = SampleConfig(steps=2, num_samples=2, guidance_scale=2.0, seed=3)


def random_extractor(seed: int = 0):
    torch.manual_seed(seed)
    return make_extractor(DigitsCNN().eval(), 8)


def random_reconstructor(extractor, cfg: SampleConfig = FAST, fixed_batch: int | None = None) -> Reconstructor:
    """The quick demo's model shape (8x8 images, 4x4 latents) with random weights, zero layers included."""
    torch.manual_seed(1)
    model = FeatInv(model_config(QUICK, extractor.feature_shape[0])).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return Reconstructor(model, extractor, dataclasses.replace(cfg), fixed_batch=fixed_batch)
