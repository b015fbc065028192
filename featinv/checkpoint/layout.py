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

from collections import defaultdict

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


def _examples(keys: list[str], n: int = 3) -> str:
    more = f", ... (+{len(keys) - n})" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def check_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor],
                     components: tuple[str, ...] | None = None, source: str = "checkpoint") -> None:
    """Raise CheckpointError listing missing / unexpected / mis-shaped keys, grouped by component.

    ``sd`` has our keys (see ``from_reference``); the message names them as the file does (reference keys).
    components: restrict the check to these (e.g. a miniSD file has no ``control``)."""
    expected = {k: v.shape for k, v in model.state_dict().items()
                if components is None or component_of(k) in components}
    problems: dict[str, list[str]] = defaultdict(list)
    for kind, keys in (("missing", sorted(set(expected) - set(sd))), ("unexpected", sorted(set(sd) - set(expected)))):
        by_comp = defaultdict(list)
        for k in keys:
            by_comp[component_of(k)].append(reference_key(k))
        for comp, ks in by_comp.items():
            problems[comp].append(f"{len(ks)} {kind}: {_examples(ks)}")
    shapes = defaultdict(list)
    for k in sorted(set(expected) & set(sd)):
        if tuple(sd[k].shape) != tuple(expected[k]):
            shapes[component_of(k)].append(f"{reference_key(k)} (file {tuple(sd[k].shape)}, model {tuple(expected[k])})")
    for comp, ks in shapes.items():
        problems[comp].append(f"{len(ks)} mis-shaped: {_examples(ks, 2)}")
    if problems:
        lines = [f"  {COMPONENT_NAMES[c]}: " + "; ".join(p) for c, p in problems.items()]
        raise CheckpointError(f"{source} does not match the model:\n" + "\n".join(lines))
