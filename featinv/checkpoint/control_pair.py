"""A control branch shipped alone, paired with a miniSD checkpoint: the full model's state dict from two files.

The reference layout splits at its prefixes (:mod:`featinv.checkpoint.layout`). A control-only file holds
``control_model.*``: the ControlNet copy of the UNet encoder, the 13 zero convs and the feature adapter
(``control_model.input_hint_block.*``), perhaps the schedule buffers too. The miniSD file holds
``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*`` and the schedule buffers. Both
are read memory-mapped where the format allows, so the pair costs what one full file would.
"""
from __future__ import annotations

import dataclasses

import torch

from featinv.checkpoint.layout import (
    COMPONENT_NAMES,
    HARMLESS,
    CheckpointError,
    check_state_dict,
    component_of,
    from_reference,
    reference_key,
)
from featinv.config import AdapterConfig, ModelConfig

MINISD = ("unet", "vae", "text_encoder")
HINT_KEY = "control_model.input_hint_block.block.1.weight"  # (width, feature channels, 3, 3): the adapter's first conv


def components(sd: dict[str, torch.Tensor]) -> set[str]:
    """The weight components (unet, control, vae, text_encoder) a reference-layout state dict holds keys of."""
    return {component_of(k) for k in sd if not k.startswith(HARMLESS)} & {"control", *MINISD}


def _names(comps) -> str:
    return ", ".join(COMPONENT_NAMES[c] for c in ("unet", "control", "vae", "text_encoder") if c in comps)


def adapter_of(sd: dict[str, torch.Tensor]) -> AdapterConfig | None:
    """The adapter's feature channels and width, read from its first conv's shape (None without one)."""
    hint = sd.get(HINT_KEY)
    return None if hint is None else AdapterConfig(in_channels=hint.shape[1], width=hint.shape[0])


def check_not_control_only(sd: dict[str, torch.Tensor], source: str) -> None:
    """CheckpointError saying what to pair it with, for a file that holds the control branch alone."""
    if components(sd) == {"control"}:
        raise CheckpointError(f"{source}: holds the control branch alone (control_model.*, the adapter); pair it "
                              "with its miniSD checkpoint (--minisd FILE; minisd= in Python)")


def check_control_only(sd_c: dict[str, torch.Tensor], control: str) -> None:
    """CheckpointError unless ``sd_c`` (from ``control``) holds the control branch and nothing else: checked
    before the miniSD file is read, so a full model given with --minisd is named whatever that file holds."""
    held = components(sd_c)
    if "control" not in held:
        raise CheckpointError(f"{control}: holds no control branch (control_model.*); with a miniSD file the "
                              "checkpoint is the control branch shipped alone")
    if held - {"control"}:
        raise CheckpointError(f"{control}: holds the {_names(held - {'control'})} besides the control branch: a "
                              "full model, which needs no miniSD file (drop --minisd)")


def pair_control(sd_c: dict[str, torch.Tensor], control: str, sd_m: dict[str, torch.Tensor], found: ModelConfig | None,
                 minisd: str) -> tuple[dict[str, torch.Tensor], ModelConfig | None]:
    """A control-only state dict (from ``control``) and a miniSD's (from ``minisd``, with its config ``found`` or
    None) -> (the full model's reference-layout state dict, the miniSD's config with the control file's adapter,
    or None). CheckpointError naming the file that holds the wrong parts. (Reading both files:
    :func:`featinv.checkpoint.load.read_control_pair`.)"""
    check_control_only(sd_c, control)
    held_m = components(sd_m)
    if "control" in held_m:
        raise CheckpointError(f"{minisd}: holds a control branch (control_model.*): a FeatInv checkpoint, "
                              "not a miniSD one")
    if set(MINISD) - held_m:
        raise CheckpointError(f"{minisd}: not a miniSD checkpoint: it holds no {_names(set(MINISD) - held_m)} keys")
    # the miniSD's schedule buffers are the ones kept (checked against the config when the model loads)
    merged = {**sd_m, **{k: v for k, v in sd_c.items() if k not in sd_m}}
    adapter = adapter_of(sd_c)
    if found is not None and adapter is not None:
        found = dataclasses.replace(found, adapter=dataclasses.replace(
            found.adapter, in_channels=adapter.in_channels, width=adapter.width))
    return merged, found


def check_control_fits(model: torch.nn.Module, sd: dict[str, torch.Tensor], control: str, against: str) -> None:
    """CheckpointError, one line naming the expected and found shapes, unless the control branch in ``sd``
    (reference keys) fits ``model`` (built, perhaps on the meta device, from the config or the miniSD):
    another adapter width or feature-channel count, or a branch copied from another UNet."""
    expected = {reference_key(k): tuple(v.shape) for k, v in model.state_dict().items() if component_of(k) == "control"}
    bad = [(k, tuple(sd[k].shape), shape) for k, shape in expected.items() if k in sd and tuple(sd[k].shape) != shape]
    if bad:
        found, want = adapter_of(sd), model.cfg.adapter
        what = []
        if found is not None and found.width != want.width:
            what.append(f"adapter width {found.width}, expected {want.width}")
        if found is not None and found.in_channels != want.in_channels:
            what.append(f"feature channels (hint) {found.in_channels}, expected {want.in_channels}")
        key, shape, shape_expected = bad[0]
        raise CheckpointError(f"{control}: its control branch does not fit {against}: "
                              f"{'; '.join(what) or 'copied from another UNet'} ({len(bad)} tensor(s) of another "
                              f"shape, e.g. {key}: found {shape}, expected {shape_expected})")
    ours, _, _ = from_reference({k: v for k, v in sd.items() if component_of(k) == "control"})
    check_state_dict(model, ours, ("control",), source=f"{control}'s control branch")  # missing / unexpected keys
