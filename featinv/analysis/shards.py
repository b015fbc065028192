"""Channel vectors on disk: .npy shards, written batch by batch and read memory-mapped, so a set of vectors larger
than RAM streams into a fit (:func:`featinv.analysis.concepts.fit_concepts` takes a shard folder).

A folder holds ``shard_00000.npy``, ``shard_00001.npy``, ... ((n_i, C) float32 or float16 each) and, when
:func:`write_shards` wrote it, ``shards.json``: the files and their row counts, so that a missing, truncated or
foreign file is found before a fit starts. A folder of .npy files without ``shards.json`` is read as it is.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

SHARD_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
MANIFEST, FORMAT = "shards.json", "featinv-shards/1"


def _shard_rows(path: Path, d: int | None) -> tuple[int, int]:
    """(rows, d) of a .npy shard from its header alone; a ValueError naming the file if it is not a 2-D float32
    or float16 array, has another width than ``d``, or holds fewer bytes than its header promises."""
    try:
        with path.open("rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
            data_start = f.tell()
    except (OSError, ValueError) as err:
        raise ValueError(f"shard {path}: not a readable .npy file ({err})") from None
    if len(shape) != 2 or dtype not in SHARD_DTYPES:
        raise ValueError(f"shard {path}: {dtype} array of shape {shape}; expected a 2-D (n, d) float32 or float16")
    if d is not None and shape[1] != d:
        raise ValueError(f"shard {path}: width {shape[1]}, but the shards before it have width {d}")
    needed, size = data_start + shape[0] * shape[1] * dtype.itemsize, os.path.getsize(path)
    if size < needed:
        raise ValueError(f"shard {path}: truncated: its header promises {shape} {dtype} ({needed} bytes), "
                         f"the file has {size} bytes")
    return shape


def _listed(folder: Path) -> list[tuple[Path, int | None]]:
    """The shards of a folder with the rows its manifest lists (None without a manifest); ValueError naming a
    listed file that is missing or a .npy file the manifest does not list."""
    found = sorted(folder.glob("*.npy"))
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return [(path, None) for path in found]
    try:
        meta = json.loads(manifest.read_text())
        files = {str(name): int(rows) for name, rows in meta["files"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"shard folder {folder}: unreadable {MANIFEST} ({type(err).__name__}: {err})") from None
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"shard folder {folder}: {missing[0]} (listed in {MANIFEST}) is missing"
                         + (f", and {len(missing) - 1} more" if len(missing) > 1 else ""))
    foreign = [p.name for p in found if p.name not in files]
    if foreign:
        raise ValueError(f"shard folder {folder}: {foreign[0]} is not listed in {MANIFEST} (not written with the "
                         "others); move it out")
    return [(folder / name, rows) for name, rows in files.items()]


def shard_batches(folder: str | Path, batch_size: int, seed: int = 0,
                  window: int = 4) -> tuple[Callable[[int], Iterator[Tensor]], dict]:
    """Batches from the .npy shards in a folder (float32 or float16, (n_i, d) each; read memory-mapped).

    Every shard is checked up front from its .npy header and against ``shards.json`` when there is one (a missing,
    unlisted, non-2-D, non-float, mis-sized or truncated shard is a ValueError naming the file). Each epoch reads
    every vector exactly once: the shards are cut into chunks of ceil(batch_size / 8) consecutive rows, the chunks
    are visited in an order drawn from (seed, epoch), and ``window`` batches' worth of chunks at a time are
    shuffled together in memory (peak memory ~ 2 · window + 1 batches: the block read and its shuffled copy).
    Returns (batches: epoch -> iterator of (B, d) float32 tensors, the last one possibly smaller, facts: vectors,
    d, shards)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"shard folder {folder}: not a directory")
    listed = _listed(folder)
    if not listed:
        raise ValueError(f"shard folder {folder}: no .npy shards")
    shards, d = [], None
    for path, expected in listed:
        rows, d = _shard_rows(path, d)
        if expected is not None and rows != expected:
            raise ValueError(f"shard {path}: {rows} rows, but {MANIFEST} lists {expected}")
        if rows:
            shards.append((path, rows))
    chunk = -(-batch_size // 8)
    pieces = [(i, a, min(a + chunk, rows)) for i, (_, rows) in enumerate(shards) for a in range(0, rows, chunk)]

    def batches(epoch: int) -> Iterator[Tensor]:
        rng = np.random.default_rng((seed, epoch))
        arrays = [np.load(path, mmap_mode="r") for path, _ in shards]
        order, per_window = rng.permutation(len(pieces)), 8 * window
        carry = np.empty((0, d), np.float32)
        for w in range(0, len(order), per_window):
            parts = [arrays[i][a:b] for i, a, b in (pieces[j] for j in order[w:w + per_window])]
            block = np.concatenate([carry, *parts], dtype=np.float32)  # the only read of these rows
            block = block[rng.permutation(len(block))]
            full = len(block) // batch_size * batch_size
            for s in range(0, full, batch_size):
                yield torch.from_numpy(block[s:s + batch_size])
            carry = block[full:]
        if len(carry):
            yield torch.from_numpy(carry)

    return batches, {"vectors": sum(rows for _, rows in shards), "d": d, "shards": len(listed)}


def write_shards(batches: Iterable[Tensor], folder: str | Path, shard_rows: int = 100_000,
                 dtype: str = "float32") -> dict:
    """Write the per-location channel vectors of (B, C, h, w) maps (or (B, C) vectors) to .npy shards of
    ``shard_rows`` rows -> {vectors, d, shards}.

    Streamed: one shard's rows are held in memory at a time; each shard is written atomically and ``shards.json``
    is rewritten after it, so an interrupted run leaves a consistent, readable folder. The folder must be empty or
    new (ValueError otherwise: nothing there is overwritten)."""
    from featinv.io import atomic_save, atomic_write_text

    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ValueError(f"shard folder {folder}: " + ("not a directory" if not folder.is_dir() else
                         "not empty; give a new or empty folder (nothing in it is overwritten)"))
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
    folder.mkdir(parents=True, exist_ok=True)
    files, buf, filled = [], None, 0

    def flush() -> None:
        name = f"shard_{len(files):05d}.npy"

        def save(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.save(f, buf[:filled])
        atomic_save(save, folder / name)
        files.append([name, filled])
        atomic_write_text(json.dumps({"format": FORMAT, "d": buf.shape[1], "files": files}), folder / MANIFEST)

    for batch in batches:
        x = batch.detach().float().cpu()
        x = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]) if x.ndim == 4 else x
        if x.ndim != 2:
            raise ValueError(f"write_shards: batch of shape {tuple(batch.shape)}; expected (B, C, h, w) or (B, C)")
        if buf is None:
            buf = np.empty((shard_rows, x.shape[1]), np.dtype(dtype))
        elif x.shape[1] != buf.shape[1]:
            raise ValueError(f"write_shards: batch of {x.shape[1]} channels after batches of {buf.shape[1]}")
        rows = x.numpy()
        while len(rows):
            take = min(len(rows), shard_rows - filled)
            buf[filled:filled + take], rows, filled = rows[:take], rows[take:], filled + take
            if filled == shard_rows:
                flush()
                filled = 0
    if buf is None:
        raise ValueError("write_shards: no batches to write")
    if filled:
        flush()
    return {"vectors": sum(rows for _, rows in files), "d": buf.shape[1], "shards": len(files)}
