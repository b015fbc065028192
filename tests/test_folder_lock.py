"""One job per folder: a second holder of <folder>/.featinv.lock is refused naming the holder's PID, and
a lock whose process was killed (kill -9) does not block."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from featinv.jobs.lock import LOCK_NAME, FolderBusyError, folder_lock, owns_folder

REPO = Path(__file__).resolve().parents[1]
HOLD = "import sys, time; from featinv.jobs.lock import folder_lock\n" \
       "with folder_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(600)\n"


def holder(folder: Path) -> subprocess.Popen:
    """A process that holds the folder's lock until killed (once it printed 'locked')."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_job_is_refused_naming_the_folder_and_pid_and_kill_9_frees_it(tmp_path):
    folder = tmp_path / "out"
    proc = holder(folder)
    try:
        start = time.monotonic()
        with pytest.raises(FolderBusyError, match=rf"--out: {folder} is in use .*PID {proc.pid} holds .*{LOCK_NAME}"):
            with folder_lock(folder):
                pass
        assert time.monotonic() - start < 5  # refused at once, not after a wait
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    with folder_lock(folder) as path:  # the kernel released the killed process's lock
        assert path.read_text().strip() == str(os.getpid())


def test_the_lock_is_released_after_the_job_and_after_an_error(tmp_path):
    with pytest.raises(RuntimeError):
        with folder_lock(tmp_path):
            raise RuntimeError("the job failed")
    with folder_lock(tmp_path):
        pass


def test_only_the_rank_that_owns_the_folder_locks(tmp_path, monkeypatch):
    assert owns_folder()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not owns_folder()
    with folder_lock(tmp_path / "out"):
        assert not (tmp_path / "out").exists()  # rank 1 neither creates nor locks the folder
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("NODE_RANK", "1")
    assert not owns_folder()
