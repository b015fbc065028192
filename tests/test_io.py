"""Atomic writes leave files with the permissions the umask asks for (not mkstemp's 0600)."""
from __future__ import annotations

import os
import stat

import pytest

import featinv.io as fio


@pytest.fixture
def umask():
    """Set the process umask for one test, restoring it after."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_files_honour_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    path = fio.atomic_write_text("x", tmp_path / "a.txt")
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temporary file left


def test_umask_without_proc(monkeypatch, umask):
    umask(0o027)
    assert fio.current_umask() == 0o027

    def no_proc(*args, **kwargs):
        raise OSError("no /proc here")

    monkeypatch.setattr(fio, "open", no_proc, raising=False)  # module global shadows the builtin
    assert fio.current_umask() == 0o027
    assert os.umask(0o027) == 0o027  # the fallback restored it


def test_check_writable_leaves_nothing_behind_and_names_the_flag(tmp_path):
    from featinv.io import check_writable

    assert check_writable(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert list(tmp_path.iterdir()) == []  # probed, not created
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=r"--run-dir: .*f/out' cannot be written"):
        check_writable(tmp_path / "f" / "out", "--run-dir")
    with pytest.raises(ValueError, match=r"--out: .*/f' is a file, not a folder"):
        check_writable(tmp_path / "f")


def test_check_output_folder_refuses_a_users_files(tmp_path):
    from featinv.io import check_output_folder, mark_output_folder

    check_output_folder(tmp_path / "new", "steer")
    (tmp_path / ".featinv.lock").write_text("")
    check_output_folder(tmp_path, "steer")  # hidden files do not count
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"--out: .* not featinv steer's output \(notes.txt\).*--overwrite"):
        check_output_folder(tmp_path, "steer")
    check_output_folder(tmp_path, "steer", overwrite=True)
    check_output_folder(tmp_path, "train", None, "--run-dir", own=("notes.txt",))
    with pytest.raises(ValueError, match=r"--run-dir: .*an empty folder$"):
        check_output_folder(tmp_path, "train", None, "--run-dir")
    mark_output_folder(tmp_path, "steer")
    check_output_folder(tmp_path, "steer")
    with pytest.raises(ValueError):
        check_output_folder(tmp_path, "compose")
