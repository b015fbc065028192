"""What a reconstruct output folder already holds: the settings it was made with (``manifest.json``),
which outputs are known to decode, and starting over.

One folder holds one job: every setting that changes pixels (the checkpoint's contents, the backbone,
the sampling settings) or the set of items (``per_class``) must match the folder's manifest, or the
job refuses to add to it, naming the setting.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path

from PIL import Image

from featinv.checkpoint.config_file import flatten
from featinv.config import EVAL_DIR, MANIFEST

SETTINGS = ("backbone", "sample", "per_class")  # compared key by key; the checkpoint by its content hash

# The folder's layout, here only: <out>/<class>/<stem>.png (the original, cropped) and
# <out>/<class>/reconstructed_<stem>_<k>.png; <out>/manifest.json; evaluate writes <out>/eval/.
RECONSTRUCTION = re.compile(r"reconstructed_(.+)_(\d+)\.png")


def original_path(out: Path, class_name: str, stem: str) -> Path:
    return out / class_name / f"{stem}.png"


def reconstruction_path(out: Path, class_name: str, stem: str, k: int) -> Path:
    return out / class_name / f"reconstructed_{stem}_{k}.png"


def read_manifest(out: Path) -> dict | None:
    """The folder's manifest.json, None without one; ValueError naming it if it does not parse."""
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"--out: {path} is not readable JSON ({e}); "
                         "pass --overwrite to start the folder over") from None
    if not isinstance(data, dict):
        raise ValueError(f"--out: {path} is not a reconstruct manifest; pass --overwrite to start the folder over")
    return data


def checkpoint_identity(path: str, previous: dict | None = None) -> dict:
    """{path, size, mtime_ns, sha256} of a checkpoint file. The SHA-256 of the contents (it reads the whole
    file) is computed once: a file at the same path with the size and mtime the manifest recorded
    keeps the recorded hash (a copied or touched file is hashed again and still matches)."""
    st = os.stat(path)
    ident = {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    known = (previous or {}).get("checkpoint_file") or {}
    if all(known.get(key) == value for key, value in ident.items()) and known.get("sha256"):
        return {**ident, "sha256": known["sha256"]}
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):  # hashlib.file_digest needs Python 3.11; we support 3.10
            digest.update(block)
    ident["sha256"] = digest.hexdigest()
    return ident


def settings_diff(previous: dict, now: dict) -> list[str]:
    """One phrase per setting that differs between the folder's manifest and this job (settings the
    manifest does not record, from older versions, are not compared)."""
    diffs = []
    old_ck, new_ck = previous.get("checkpoint_file") or {}, now.get("checkpoint_file") or {}
    if old_ck.get("sha256") and new_ck.get("sha256") and old_ck["sha256"] != new_ck["sha256"]:
        diffs.append(f"checkpoint: the folder's came from {old_ck.get('path')} (sha256 {old_ck['sha256'][:12]}), "
                     f"this one is {new_ck['path']} (sha256 {new_ck['sha256'][:12]})")
    elif not old_ck and previous.get("checkpoint") and previous["checkpoint"] != now.get("checkpoint"):
        diffs.append(f"checkpoint was {previous['checkpoint']!r}, now {now.get('checkpoint')!r}")
    old_sd, new_sd = previous.get("minisd_file") or {}, now.get("minisd_file") or {}
    if (old_sd or new_sd) and (old_sd.get("sha256") or old_sd.get("path")) != (new_sd.get("sha256") or new_sd.get("path")):
        diffs.append(f"minisd: the folder's model used {old_sd.get('path')}, this one {new_sd.get('path')}")
    old = flatten({k: previous[k] for k in SETTINGS if k in previous})
    new = flatten({k: now[k] for k in SETTINGS if k in previous})
    diffs += [f"{key} was {old.get(key)!r}, now {value!r}" for key, value in new.items() if old.get(key) != value]
    return diffs


def check_same_settings(out: Path, previous: dict | None, now: dict, items: list, k: int) -> None:
    """ValueError unless the folder is new, or was made with the same settings (see module doc)."""
    if previous is None:
        if any(p.exists() for it in items for p in it.outputs(out, k)):
            raise ValueError(f"--out: {out} holds reconstructions but no manifest.json, so their settings are "
                             "unknown; use another --out, or pass --overwrite to delete them and start over")
        return
    diffs = settings_diff(previous, now)
    if diffs:
        more = f" (and {len(diffs) - 1} more: {'; '.join(diffs[1:])})" if len(diffs) > 1 else ""
        raise ValueError(f"--out: {out} holds reconstructions made with other settings: {diffs[0]}{more}; use "
                         "another --out, or pass --overwrite to delete them and start over")


def decodes(path: Path) -> bool:
    """Whether an image file is whole: PIL's ``verify`` (PNG: every chunk and its CRC, no decoding)."""
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:  # noqa: BLE001 -- PIL raises OSError, SyntaxError, ValueError, ... for a bad file
        return False


def drop_undecodable(out: Path, items: list, k: int, verified: set[str]) -> list[Path]:
    """Delete the existing outputs that do not decode, so that the job makes them again; returns them.

    Checked: files of items the manifest does not record as whole (``verified``), and files changed
    after the manifest was written. Our own PNGs are written atomically, so a bad file appeared
    otherwise (a junk file, a copy cut short); a rerun of a finished 10,000-image job costs one
    ``stat`` per file, not 20,000 PNG reads."""
    manifest = out / MANIFEST
    since = manifest.stat().st_mtime_ns if verified and manifest.is_file() else -1
    bad = []
    for item in items:
        for path in item.outputs(out, k):
            try:
                mtime = path.stat().st_mtime_ns
            except FileNotFoundError:
                continue
            changed = item.key not in verified or mtime > since
            if changed and not decodes(path):
                with contextlib.suppress(FileNotFoundError):  # another rank may have removed it
                    path.unlink()
                bad.append(path)
    return bad


def clear_outputs(out: Path) -> list[Path]:
    """Delete what a reconstruct job writes in ``out`` (PNGs in class folders, eval/, manifest.json);
    other files stay. Returns the deleted files."""
    removed = []
    folders = [p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")]
    for folder in folders:
        pattern = "*" if folder.name == EVAL_DIR else "*.png"
        removed += [p for p in folder.glob(pattern) if p.is_file()]
    removed += [out / MANIFEST] if (out / MANIFEST).is_file() else []
    for path in removed:
        path.unlink()
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty
    return removed
