"""Build the initial FeatInv checkpoint from a miniSD checkpoint (the reference's "tool_add_control").

The miniSD source is a checkpoint file, a diffusers pipeline folder or a Hub id of one
(:func:`featinv.checkpoint.load.read_source`).

Every ``control_model.X`` whose name exists as ``model.diffusion_model.X`` (time embedding, input
blocks, middle block) is copied from the UNet; the feature adapter and the 13 zero convs are new.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from featinv.checkpoint.layout import CheckpointError
from featinv.checkpoint.load import infer_model_config, load_into, read_source, save_featinv
from featinv.config import BackboneConfig, ModelConfig
from featinv.nets.controlnet import ControlNet
from featinv.nets.model import FeatInv

ENCODER_PARTS = ("time_embed.", "input_blocks.", "middle_block.")


def backbone_channels(cfg: BackboneConfig) -> int:
    """Feature-map channels of a backbone, found on the meta device (no weights, no download)."""
    from featinv.nets.backbone import build_backbone

    with torch.device("meta"):
        return build_backbone(dataclasses.replace(cfg, pretrained=False, checkpoint="")).feature_shape[0]


def build_control(minisd: str | Path, out: str | Path, cfg: ModelConfig | None = None,
                  hint_channels: int | None = None, seed: int = 0) -> dict:
    """miniSD checkpoint, diffusers pipeline folder or Hub id -> FeatInv safetensors at ``out``; returns a
    summary of what was copied / new.

    cfg: the model config (default: the file's featinv metadata, a pipeline's config.json files, else
    inferred from the shapes); hint_channels overrides
    ``cfg.adapter.in_channels`` (the backbone's feature channels). Refuses to overwrite ``out``."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; refusing to overwrite it (choose another output path)")
    sd, found = read_source(minisd)
    if any(k.startswith("control_model.") for k in sd):
        raise CheckpointError(f"{minisd} already holds a control branch (control_model.*): it is a FeatInv "
                              "checkpoint, not a miniSD one")
    cfg = cfg or found or infer_model_config(sd, str(minisd))
    if hint_channels is not None:
        cfg = dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, in_channels=hint_channels))
    with torch.device("meta"):
        model = FeatInv(cfg)
    model.to_empty(device="cpu")
    notes = load_into(model, sd, components=("unet", "vae", "text_encoder"), source=str(minisd))
    torch.manual_seed(seed)  # the adapter's first two convs use PyTorch's default init, reproducibly
    model.control = ControlNet.from_unet(model.unet, cfg.adapter)  # replaces the empty branch, no second copy
    copied = verify_copy(model)
    new = {k for k in model.control.state_dict() if not k.startswith(ENCODER_PARTS)}
    zero = sorted(k for k in new if model.control.state_dict()[k].abs().sum() == 0)
    save_featinv(model, out)
    return {"copied": copied, "new": sorted(new), "zero_initialised": zero, "notes": notes,
            "kept": {c: sum(1 for k in model.state_dict() if k.startswith(c + ".")) for c in ("unet", "vae", "text_encoder")},
            "adapter_in_channels": cfg.adapter.in_channels, "out": str(out)}


def verify_copy(model: FeatInv) -> int:
    """Check that each copied control tensor equals its UNet source; return how many were copied."""
    unet_sd = model.unet.state_dict()
    count = 0
    for key, value in model.control.state_dict().items():
        if key.startswith(ENCODER_PARTS):
            if not torch.equal(value, unet_sd[key]):
                raise RuntimeError(f"control.{key} does not equal unet.{key} after the copy")
            count += 1
    return count
