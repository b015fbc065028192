"""Atomic file writing: a crash or a full disk never leaves a partial output file behind."""
from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, without changing it where Linux reports it (``/proc/self/status``); elsewhere
    set-and-restore under a lock (the umask is process-wide, so threads of this module never race)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def atomic_save(write, path: str | os.PathLike) -> Path:
    """Call write(tmp_path) then rename onto ``path``: a crash never leaves a partial file.

    The file gets the permissions a plain ``open`` would give (0666 minus the umask), not mkstemp's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """Write a text file (JSON, YAML, CSV, Markdown) atomically."""
    return atomic_save(lambda tmp: Path(tmp).write_text(text), path)


def check_writable(path: str | os.PathLike, flag: str = "--out", is_file: bool = False) -> Path:
    """ValueError naming ``flag`` unless ``path`` (a folder, or a file's folder with ``is_file``) can be
    written: checked first, before any model loads, and without leaving anything behind (a temporary
    folder is made and removed in the nearest folder that exists)."""
    path = Path(path)
    folder = path.parent if is_file else path
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{flag}: {str(folder)!r} is a file, not a folder")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is not a folder")
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".featinv-probe-"))
    except OSError as e:
        reason = e.strerror or str(e)
        raise ValueError(f"{flag}: {str(path)!r} cannot be written ({reason}: {existing})") from None
    return path
