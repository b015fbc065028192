"""Atomic file writing: a crash or a full disk never leaves a partial output file behind."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_save(write, path: str | os.PathLike) -> Path:
    """Call write(tmp_path) then rename onto ``path``: a crash never leaves a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """Write a text file (JSON, YAML, CSV, Markdown) atomically."""
    return atomic_save(lambda tmp: Path(tmp).write_text(text), path)
