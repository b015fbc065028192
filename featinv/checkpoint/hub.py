"""Hugging Face Hub ids -> local folders, cache first (``huggingface_hub.snapshot_download``).

A source that exists on disk is always taken as a path; one that does not and reads ``owner/name`` is
a Hub id. The cache is tried first without any network access, so a cached id works offline; an id
that is not cached fails at once when offline (``HF_HUB_OFFLINE=1``) and names the id.
"""
from __future__ import annotations

import re
from pathlib import Path

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
FILE_SUFFIXES = (".ckpt", ".pt", ".pth", ".safetensors", ".bin", ".yaml", ".yml", ".json")
DIFFUSERS_FILES = ["model_index.json", "unet/*", "vae/*", "text_encoder/*", "scheduler/*"]


def looks_like_hub_id(source: str | Path) -> bool:
    """True for ``owner/name`` that is not an existing path nor a file name (``runs/x.ckpt`` is a path)."""
    text = str(source)
    return (not Path(text).exists() and HUB_ID.fullmatch(text) is not None
            and not text.lower().endswith(FILE_SUFFIXES))


def snapshot(repo_id: str, allow_patterns: list[str] | None = None) -> Path:
    """The local folder of a Hub model repo: from the cache if it is there, else downloaded (unless
    offline). FileNotFoundError naming ``repo_id`` when neither works."""
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns, local_files_only=True))
    except OSError:  # LocalEntryNotFoundError (a FileNotFoundError): not in the cache
        pass
    except ValueError as e:  # HFValidationError: not a valid repo id
        raise FileNotFoundError(f"{repo_id}: no such file or folder, nor a valid Hub id ({e})") from None
    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(f"{repo_id}: no such file or folder, and the Hub id is not in the Hugging Face "
                                f"cache ({constants.HF_HUB_CACHE}); offline (HF_HUB_OFFLINE), so it cannot be "
                                "downloaded")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns))
    except OSError as e:  # not found, gated, or the Hub unreachable (huggingface_hub's errors are OSErrors)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FileNotFoundError(f"{repo_id}: no such file or folder, not in the Hugging Face cache, and not "
                                f"downloadable as a Hub id ({type(e).__name__}: {reason})") from None


def local_source(source: str | Path, allow_patterns: list[str] | None = None) -> Path:
    """An existing path as it is, a Hub id as its snapshot folder; FileNotFoundError otherwise."""
    if looks_like_hub_id(source):
        return snapshot(str(source), allow_patterns)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"not found: {path} (no such file or folder)")
    return path
