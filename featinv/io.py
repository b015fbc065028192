"""Atomic file writing: a crash or a full disk never leaves a partial output file behind."""
from __future__ import annotations

import contextlib
import json
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
        raise ValueError(f"{flag}: {str(path)!r} cannot be written: {existing} is not writable ({reason})") from None
    return path


OUTPUT_MARKER = ".featinv-output.json"  # {"command": ...}: the folder holds this command's output


def check_output_folder(folder: str | os.PathLike, command: str, overwrite: bool | None = False, flag: str = "--out",
                        own: tuple[str, ...] = ()) -> None:
    """ValueError unless ``folder`` may receive ``command``'s output: it is new or empty (hidden files
    aside), holds this command's earlier output (its marker, or one of the ``own`` entries that only the
    command writes), or ``overwrite`` is set (None: the command has no --overwrite). A user's own files are
    never silently overwritten."""
    folder = Path(folder)
    if overwrite or not folder.is_dir():
        return
    entries = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    if not entries or any((folder / name).exists() for name in own):
        return
    with contextlib.suppress(OSError, ValueError):
        if json.loads((folder / OUTPUT_MARKER).read_text()).get("command") == command:
            return
    shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
    hint = "" if overwrite is None else ", or pass --overwrite to write into it"
    raise ValueError(f"{flag}: {folder} holds files that are not featinv {command}'s output ({shown}); use another "
                     f"{flag} or an empty folder{hint}")


def mark_output_folder(folder: str | os.PathLike, command: str) -> None:
    """Record that ``folder`` holds ``command``'s output (see :func:`check_output_folder`)."""
    atomic_write_text(json.dumps({"command": command}) + "\n", Path(folder) / OUTPUT_MARKER)
