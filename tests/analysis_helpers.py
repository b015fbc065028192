"""Tiny random stand-ins for the analysis tests: a DigitsCNN extractor and a demo-shaped FeatInv."""
from __future__ import annotations

import dataclasses

import torch

from featinv.config import SampleConfig
from featinv.demo.digits import DigitsCNN, make_extractor
from featinv.demo.stages import QUICK, model_config
from featinv.diffusion.reconstruct import Reconstructor
from featinv.nets.model import FeatInv

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


def tiny_checkpoint(tmp) -> dict:
    """A random tiny FeatInv checkpoint over a random resnet18 (64 px -> 512x2x2), the backbone's weights
    file (offline --backbone-checkpoint) and a folder of photos: the --checkpoint path of the commands."""
    from helpers import sample_photos_folder
    from safetensors.torch import save_file

    from featinv.checkpoint.load import save_featinv
    from featinv.config import PRESETS
    from featinv.nets.backbone import build_backbone

    torch.manual_seed(1)
    backbone = build_backbone(PRESETS["tiny"].backbone)
    cfg = PRESETS["tiny"].model
    cfg = dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, in_channels=512, width=64))
    model = FeatInv(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    bb_file = tmp / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.model.state_dict().items()}, str(bb_file))
    return {"ckpt": save_featinv(model, tmp / "tiny.safetensors"), "bb_file": bb_file,
            "photos": sample_photos_folder(tmp / "photos", size=72)}
