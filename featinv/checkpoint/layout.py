"""The reference checkpoint layout, in one place: LDM/FeatInv key prefixes <-> featinv attributes.

Our module tree mirrors the LDM one, so the mapping is a prefix table (STYLE.md approach (a)):

    reference key prefix                          featinv attribute
    model.diffusion_model.                        unet.
    control_model.                                control.
    first_stage_model.                            vae.
    cond_stage_model.transformer.text_model.      text_encoder.
    betas, alphas_cumprod, ... (13 buffers)       computed from ModelConfig.diffusion
"""
from __future__ import annotations

import torch

from featinv.config import RUN_CONFIG, WEIGHTS_FILE, DiffusionConfig
from featinv.diffusion.schedule import SCHEDULE_KEYS, schedule_buffers

PREFIXES = {  # reference prefix -> our attribute prefix
    "model.diffusion_model.": "unet.",
    "control_model.": "control.",
    "first_stage_model.": "vae.",
    "cond_stage_model.transformer.text_model.": "text_encoder.",
}


COMPONENT_NAMES = {"unet": "UNet", "control": "control branch", "vae": "VAE", "text_encoder": "text encoder",
                   "schedule": "diffusion buffers", "other": "unrecognised"}


# Keys that old or EMA-trained checkpoints carry and that we may drop without changing the model.
HARMLESS = ("cond_stage_model.transformer.text_model.embeddings.position_ids", "model_ema.",
            "cond_stage_model.transformer.embeddings.position_ids")


METADATA_KEY = "featinv_config"




EXPORT_FILES = [WEIGHTS_FILE, RUN_CONFIG, "README.md"]  # an exported FeatInv folder


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message lists what is wrong."""


def component_of(key: str) -> str:
    """Which component a key (reference or ours) belongs to."""
    if key in SCHEDULE_KEYS:
        return "schedule"
    for ref, ours in PREFIXES.items():
        if key.startswith(ref) or key.startswith(ours):
            return ours[:-1]
    if key.startswith("cond_stage_model.transformer."):
        return "text_encoder"
    return "other"


def from_reference(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """Reference keys -> (our keys, schedule buffers, notes about dropped harmless keys)."""
    ours, schedule, dropped = {}, {}, []
    for key, value in sd.items():
        if key in SCHEDULE_KEYS:
            schedule[key] = value
            continue
        if any(key.startswith(h) for h in HARMLESS):
            dropped.append(key)
            continue
        for ref, new in PREFIXES.items():
            if key.startswith(ref):
                key = new + key[len(ref):]
                break
        else:
            if key.startswith("cond_stage_model.transformer."):  # transformers >= 5 drops `text_model.`
                key = "text_encoder." + key[len("cond_stage_model.transformer."):]
        ours[key] = value
    notes = []
    if dropped:
        notes.append(f"ignored {len(dropped)} known harmless key(s) (e.g. {dropped[0]})")
    return ours, schedule, notes


def reference_key(key: str) -> str:
    """Our key -> the reference (file) key; keys without a known prefix are returned unchanged."""
    for ref, ours in PREFIXES.items():
        if key.startswith(ours):
            return ref + key[len(ours):]
    return key


def to_reference(sd: dict[str, torch.Tensor], diffusion: DiffusionConfig) -> dict[str, torch.Tensor]:
    """Our keys -> reference keys, with the 13 schedule buffers first (the reference order)."""
    out = dict(schedule_buffers(diffusion))
    for key, value in sd.items():
        ref = reference_key(key)
        if ref == key:
            raise KeyError(f"no reference prefix for key {key!r}")
        out[ref] = value
    return out
