"""Any checkpoint the package reads -> one safetensors file in the reference layout (``featinv convert``)."""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import torch

from featinv.checkpoint.config_file import to_dict
from featinv.checkpoint.control_pair import check_control_fits
from featinv.checkpoint.hub import looks_like_hub_id
from featinv.checkpoint.layout import METADATA_KEY, CheckpointError, reference_key
from featinv.checkpoint.load import (
    config_from_metadata,
    infer_model_config,
    read_control_pair,
    read_source,
    read_state_dict,
    unwrap_state_dict,
)
from featinv.checkpoint.tensor_files import write_safetensors
from featinv.diffusion.schedule import SCHEDULE_KEYS, schedule_buffers
from featinv.io import atomic_save


def convert_to_safetensors(src: str | os.PathLike, dst: str | os.PathLike, trust_pickle: bool = False,
                           minisd: str | os.PathLike | None = None) -> dict:
    """Write the state dict of ``src`` (any format :func:`read_state_dict` reads, or any folder or Hub id
    :func:`read_source` reads) to the safetensors file ``dst`` in the reference layout, atomically;
    returns ``{"tensors", "skipped", "out"}``. A diffusers pipeline becomes a miniSD file (with the
    schedule buffers of a ``.ckpt`` and its config in the metadata, heads included). With ``minisd``,
    ``src`` is a control branch shipped alone and ``dst`` the full model, once its branch is checked to fit.

    Streams: sources are memory-mapped where their format allows (safetensors, torch.save zip archives) and
    ``dst`` is written tensor by tensor, so peak memory is about one copy of the weights plus the largest tensor.

    trust_pickle: unpickle ``src`` fully (``weights_only=False``), which runs any code the file
    holds: only for a file from a trusted source that the weights-only reader refuses."""
    src, dst = Path(src), Path(dst)
    metadata: dict[str, str] = {}
    if minisd is not None:
        sd = _control_pair(src, minisd)
    elif src.is_dir() or looks_like_hub_id(src):  # a diffusers pipeline, an exported FeatInv folder, a Hub id
        sd, cfg = read_source(src)
        if cfg is not None:
            metadata = {METADATA_KEY: json.dumps(to_dict(cfg), sort_keys=True)}
            if not any(k in sd for k in SCHEDULE_KEYS):  # a pipeline: the buffers a miniSD .ckpt holds
                sd = {**schedule_buffers(cfg.diffusion), **sd}
    elif trust_pickle and src.suffix != ".safetensors":
        if not src.is_file():
            raise FileNotFoundError(f"checkpoint not found: {src}")
        obj = torch.load(src, map_location="cpu", weights_only=False, mmap=zipfile.is_zipfile(src))
        sd, _ = unwrap_state_dict(obj, src, tensors_only=False)  # non-tensor entries are skipped below
    else:
        sd, metadata = read_state_dict(src)
    tensors = {reference_key(k): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{src}: holds no tensors to convert")
    metadata = {**metadata, "featinv_converted_from": src.name or str(src)}
    if minisd is not None:
        metadata["featinv_minisd"] = Path(minisd).name or str(minisd)
    atomic_save(lambda tmp: write_safetensors(tensors, tmp, metadata), dst)
    return {"tensors": len(tensors), "skipped": sorted(k for k, v in sd.items() if not isinstance(v, torch.Tensor)),
            "out": str(dst)}


def _control_pair(control: Path, minisd: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The full model's state dict of a control-only file and its miniSD, checked against a meta-device
    model (no weights allocated) of the miniSD's config, else the one the pair's shapes give."""
    from featinv.nets.model import FeatInv

    sd, metadata, found = read_control_pair(control, minisd)
    cfg = config_from_metadata(metadata) or found or infer_model_config(sd, str(control))
    with torch.device("meta"):
        model = FeatInv(cfg)
    check_control_fits(model, sd, str(control), f"the UNet of {minisd}")
    return sd
