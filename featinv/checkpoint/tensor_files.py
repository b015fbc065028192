"""Tensors of a safetensors file, memory-mapped instead of copied, and the checks every tensor-file reader shares.

``safetensors.safe_open(...).get_tensor`` copies every tensor out of its memory map, so reading a
file and then loading it into a model held the weights twice (11.4 GiB peak for the 5.35 GiB full
model). Here each tensor is a view of one private (copy-on-write) map of the file: the pages are read
on first touch, belong to the page cache until written, and assigning the views as a model's
parameters (``load_state_dict(assign=True)``) keeps a single copy -- the same as
``torch.load(mmap=True)`` does for torch.save zip archives.

Every reader refuses NaN/inf values with :func:`check_finite` (checkpoints: featinv.checkpoint.load); files
that are not checkpoints (a concept basis, ...) are read with :func:`read_tensors`, which also says when the
path is a folder, another kind of featinv file, or lacks a tensor.
"""
from __future__ import annotations

import json
import mmap
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

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


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file one tensor at a time (``safetensors.torch.save_file`` builds the whole file in
    memory first): besides the tensors themselves (memory-mapped sources stay mapped) it holds at most one
    tensor's copy, for a tensor that is not contiguous. Tensors are laid out by item size, largest first, after
    a header padded to 8 bytes, so every tensor is aligned for the memory-mapped reader above."""
    names = {dtype: name for name, dtype in DTYPES.items()}
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key in order:
        t = tensors[key]
        if t.dtype not in names:
            raise ValueError(f"{key}: dtype {t.dtype} has no safetensors name")
        size = t.numel() * t.element_size()
        header[key] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for key in order:
            t = tensors[key].detach().cpu().contiguous().reshape(-1)
            if t.numel():
                f.write(memoryview(t.view(torch.uint8).numpy()))  # the tensor's bytes, not a copy of them


# The tensor files featinv writes besides checkpoints, by the ``format`` entry of their metadata ("<name>/<version>"):
# what each one is, so that a reader handed one of them by mistake can say so. A new kind of file adds its line here.
FILE_KINDS = {"featinv-concepts": "a concept basis (featinv concepts)"}


def file_kind(metadata: Mapping[str, str]) -> str | None:
    """What a featinv tensor file is (a :data:`FILE_KINDS` value) by its metadata; None for any other file."""
    return FILE_KINDS.get(metadata.get("format", "").partition("/")[0])


def nonfinite_counts(tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """{name: number of NaN/inf values} of the floating-point tensors that hold any, in ``tensors``' order."""
    counts = {}
    for name, value in tensors.items():
        # Fast path: NaN/inf make the float64 sum non-finite, and float32/16 values cannot overflow it.
        if value.is_floating_point() and not torch.isfinite(value.sum(dtype=torch.float64)):
            n = value.numel() - int(torch.isfinite(value).sum())
            if n:
                counts[name] = n
    return counts


def check_finite(tensors: Mapping[str, torch.Tensor], source: str, consequence: str = "") -> None:
    """ValueError (one line) naming ``source`` and the first tensor if any floating-point value is NaN or inf:
    ``<source>: 3 non-finite (NaN/inf) values in 1 tensor, first 'atoms'; <consequence>``."""
    bad = nonfinite_counts(tensors)
    if bad:
        total, first = sum(bad.values()), next(iter(bad))
        raise ValueError(f"{source}: {total} non-finite (NaN/inf) value{'s' * (total > 1)} in {len(bad)} "
                         f"tensor{'s' * (len(bad) > 1)}, first {first!r}" + (f"; {consequence}" if consequence else ""))


def read_tensors(path: str | os.PathLike, *, kind: str = "tensor", names: Iterable[str] | None = None,
                 require_finite: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file that is not a model checkpoint (a concept basis, ...).

    ``kind`` names the expected file in the errors ('concept basis'). ``names``: the tensors to return (all if
    None); the file must hold them. ``require_finite``: refuse NaN/inf values in them (:func:`check_finite`).
    FileNotFoundError for a missing path; ValueError naming the file for a folder, an unreadable file, missing
    tensors or non-finite values."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.safetensors"))
        holds = f"; it holds {', '.join(inside[:3])}{', ...' if len(inside) > 3 else ''}" if inside else ""
        raise ValueError(f"{str(path)!r} is a folder; expected a .safetensors file ({kind}){holds}")
    if not path.is_file():
        raise FileNotFoundError(f"{kind} {str(path)!r} not found")
    try:
        tensors, metadata = read_safetensors(path)
    except SafetensorError as e:
        raise ValueError(f"{str(path)!r} is not a {kind} file (not a readable safetensors file: {e})") from None
    if names is not None:
        names = tuple(names)
        missing = [name for name in names if name not in tensors]
        if missing:
            other = file_kind(metadata)
            found = f"it is {other}" if other else "it holds " + (", ".join(map(repr, sorted(tensors)[:5])) or "none")
            raise ValueError(f"{str(path)!r} is not a {kind} file (no tensor {', '.join(map(repr, missing))}; "
                             f"{found})")
        tensors = {name: tensors[name] for name in names}
    if require_finite:
        check_finite(tensors, str(path))
    return tensors, metadata
