"""Any checkpoint the package reads -> one safetensors file in the reference layout (``featinv convert``)."""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from featinv.checkpoint.config_file import to_dict
from featinv.checkpoint.hub import looks_like_hub_id
from featinv.checkpoint.layout import METADATA_KEY, CheckpointError, reference_key
from featinv.checkpoint.load import read_source, read_state_dict, unwrap_state_dict
from featinv.diffusion.schedule import SCHEDULE_KEYS, schedule_buffers
from featinv.io import atomic_save


def convert_to_safetensors(src: str | os.PathLike, dst: str | os.PathLike, trust_pickle: bool = False) -> dict:
    """Write the state dict of ``src`` (any format :func:`read_state_dict` reads, or any folder or Hub id
    :func:`read_source` reads) to the safetensors file ``dst`` in the reference layout, atomically;
    returns ``{"tensors", "skipped", "out"}``. A diffusers pipeline becomes a miniSD file (with the
    schedule buffers of a ``.ckpt`` and its config in the metadata, heads included).

    trust_pickle: unpickle ``src`` fully (``weights_only=False``), which runs any code the file
    holds: only for a file from a trusted source that the weights-only reader refuses."""
    src, dst = Path(src), Path(dst)
    metadata: dict[str, str] = {}
    if src.is_dir() or looks_like_hub_id(src):  # a diffusers pipeline, an exported FeatInv folder, a Hub id
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
    tensors, storages = {}, set()
    for key, value in sd.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().contiguous()
            ptr = value.untyped_storage().data_ptr()
            tensors[reference_key(key)] = value.clone() if ptr in storages else value  # safetensors: no sharing
            storages.add(ptr)
    if not tensors:
        raise CheckpointError(f"{src}: holds no tensors to convert")
    metadata = {**metadata, "featinv_converted_from": src.name or str(src)}
    atomic_save(lambda tmp: save_file(tensors, tmp, metadata=metadata), dst)
    return {"tensors": len(tensors), "skipped": sorted(k for k, v in sd.items() if not isinstance(v, torch.Tensor)),
            "out": str(dst)}
