"""One job per folder: a job holds ``<folder>/.featinv.lock`` for its whole life (reconstruct's --out,
train's --run-dir), so a second job on the same folder is refused at once instead of mixing its files
with the first one's.

The lock is an OS-level file lock (``filelock``: ``flock`` on POSIX, ``LockFileEx`` on Windows), which
the kernel releases when the process ends however it ends (also ``kill -9``): a stale lock never
blocks. The lock file stays behind (deleting it would race with a job opening it) and holds the PID
of the last holder, which the refusal names. Under DDP only the rank that owns the folder (global
rank 0 on node 0) locks it: the other ranks are the same job.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from filelock import FileLock, Timeout

from featinv.config import LOCK_NAME


class FolderBusyError(ValueError):
    """Another featinv job holds the folder's lock (a user error: the face prints it in one line)."""


def owns_folder() -> bool:
    """Whether this process is the one that locks a job's folder: global rank 0 (RANK, SLURM_PROCID,
    LOCAL_RANK as Lightning and torchrun set them) on node 0 (NODE_RANK / GROUP_RANK); True outside DDP."""
    for name in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
        value = os.environ.get(name, "0")
        if value.isdigit() and int(value) != 0:
            return False
    return True


def _holder(path: Path) -> str:
    with contextlib.suppress(OSError):
        pid = path.read_text().strip()
        if pid.isdigit():
            return f"PID {pid}"
    return "PID unknown"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, flag: str = "--out", enabled: bool | None = None):
    """Hold ``<folder>/.featinv.lock`` for the body (creating ``folder``); FolderBusyError naming the
    folder, the lock file and the holder's PID when another process holds it.

    enabled: None -> :func:`owns_folder` (rank 0 of a DDP job locks, the other ranks do not)."""
    if not (owns_folder() if enabled is None else enabled):
        yield None
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise FolderBusyError(f"{flag}: {folder} is in use by another featinv job ({_holder(path)} holds {path}); "
                              "wait for it to finish, or use another folder") from None
    try:
        # Another descriptor of the same file: the flock stays on filelock's descriptor, and a job refused
        # above opens the file without truncating it, so it reads this PID.
        with open(path, "w") as f:
            f.write(f"{os.getpid()}\n")
        yield path
    finally:
        lock.release()
