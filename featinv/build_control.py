"""Build the initial FeatInv checkpoint from a miniSD checkpoint (the reference's "tool_add_control").

Every ``control_model.X`` whose name exists as ``model.diffusion_model.X`` (time embedding, input
blocks, middle block) is copied from the UNet; the feature adapter and the 13 zero convs are new.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from featinv.checkpoint import CheckpointError, infer_model_config, load_into, read_state_dict, save_featinv
from featinv.config import BackboneConfig, ModelConfig
from featinv.config_file import load_config
from featinv.controlnet import ControlNet
from featinv.model import FeatInv

ENCODER_PARTS = ("time_embed.", "input_blocks.", "middle_block.")


def backbone_channels(cfg: BackboneConfig) -> int:
    """Feature-map channels of a backbone, found on the meta device (no weights, no download)."""
    from featinv.backbone import build_backbone

    with torch.device("meta"):
        return build_backbone(dataclasses.replace(cfg, pretrained=False, checkpoint="")).feature_shape[0]


def build_control(minisd: str | Path, out: str | Path, cfg: ModelConfig | None = None,
                  hint_channels: int | None = None, seed: int = 0) -> dict:
    """miniSD checkpoint -> FeatInv safetensors at ``out``; returns a summary of what was copied / new.

    cfg: the model config (default: inferred from the file's shapes); hint_channels overrides
    ``cfg.adapter.in_channels`` (the backbone's feature channels). Refuses to overwrite ``out``."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; refusing to overwrite it (choose another output path)")
    sd, _ = read_state_dict(minisd)
    if any(k.startswith("control_model.") for k in sd):
        raise CheckpointError(f"{minisd} already holds a control branch (control_model.*): it is a FeatInv "
                              "checkpoint, not a miniSD one")
    cfg = cfg or infer_model_config(sd, str(minisd))
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="featinv build-control", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("minisd", help="miniSD checkpoint (.ckpt, .pt or .safetensors)")
    p.add_argument("out", help="output FeatInv checkpoint (.safetensors); must not exist")
    p.add_argument("--config", help="model config (preset or YAML); default: inferred from the checkpoint")
    p.add_argument("--backbone", default="convnext_base",
                   help="backbone preset or timm name whose feature channels the adapter takes")
    p.add_argument("--hint-channels", type=int, help="adapter input channels (overrides --backbone)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not str(args.out).endswith(".safetensors"):
        p.error(f"output must be a .safetensors file, got {args.out}")
    channels = args.hint_channels
    if channels is None:
        from featinv.backbone import BACKBONE_PRESETS

        bb = BACKBONE_PRESETS.get(args.backbone, BackboneConfig(name=args.backbone))
        channels = backbone_channels(bb)
    cfg = load_config(args.config).model if args.config else None
    report = build_control(args.minisd, args.out, cfg, channels, args.seed)
    for note in report["notes"]:
        print(f"note: {note}")
    print(f"kept from {args.minisd}: " + ", ".join(f"{c} {n} tensors" for c, n in report["kept"].items()))
    print(f"copied into the control branch (and checked equal): {report['copied']} tensors "
          "(time_embed, input_blocks, middle_block)")
    print(f"new: {len(report['new'])} tensors (feature adapter for {channels} channels, zero convs); "
          f"zero-initialised: {len(report['zero_initialised'])}")
    print(f"wrote {report['out']}")
    return 0
