"""Tensors of a safetensors file, memory-mapped instead of copied.

``safetensors.safe_open(...).get_tensor`` copies every tensor out of its memory map, so reading a
file and then loading it into a model held the weights twice (11.4 GiB peak for the 5.35 GiB full
model). Here each tensor is a view of one private (copy-on-write) map of the file: the pages are read
on first touch, belong to the page cache until written, and assigning the views as a model's
parameters (``load_state_dict(assign=True)``) keeps a single copy -- the same as
``torch.load(mmap=True)`` does for torch.save zip archives.
"""
from __future__ import annotations

import json
import mmap
import os

import torch
from safetensors import safe_open

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; tensors are views of a private map of the file.

    The file is validated by safetensors first (SafetensorError for a damaged one). A tensor whose
    dtype is not in DTYPES or whose offset is not aligned to its item size is copied instead."""
    with safe_open(str(path), framework="pt") as st:  # validates header, offsets and bounds
        metadata = dict(st.metadata() or {})
        keys = list(st.keys())
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if os.fstat(f.fileno()).st_size else None
        base = 8 + header_len
        tensors = {}
        for key in keys:
            info = header[key]
            dtype = DTYPES.get(info["dtype"])
            start, end = info["data_offsets"]
            if dtype is None or (base + start) % dtype.itemsize or end == start or mapped is None:
                tensors[key] = st.get_tensor(key)  # rare: copy
                continue
            flat = torch.frombuffer(mapped, dtype=dtype, count=(end - start) // dtype.itemsize, offset=base + start)
            tensors[key] = flat.view(info["shape"])
    return tensors, metadata
