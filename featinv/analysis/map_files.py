"""Feature-space maps on disk: one safetensors file per map, its spec (kind, channels, grids, options, what the fit
chose, where its maps came from) as JSON metadata; read without pickles, and checked against the networks it is
applied to (:func:`check_map_fits`)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from featinv.analysis.feature_maps import FeatureMapping, build_map
from featinv.io import atomic_save

METADATA_KEY = "featinv_map"


def save_map(fmap: FeatureMapping, path: str | Path, about: dict | None = None) -> Path:
    """The map's tensors as one safetensors file, its spec (and ``about``: backbones, manipulation) in the
    metadata as JSON; written atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in fmap.state_dict().items()}
    meta = {METADATA_KEY: json.dumps({**fmap.spec(), "about": {**fmap.about, **(about or {})}}, sort_keys=True)}
    return atomic_save(lambda tmp: save_file(tensors, tmp, metadata=meta), path)


def read_map_spec(path: str | Path) -> dict:
    """The spec saved with a map file (kind, channels, grids, options, fit record, about). ValueError naming the
    file when it is missing or holds no featinv map."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"map file {str(path)!r} not found")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())})") from None
    if METADATA_KEY not in meta:
        raise ValueError(f"{path}: holds no featinv map (no {METADATA_KEY!r} metadata; featinv maps writes maps/*.safetensors)")
    return json.loads(meta[METADATA_KEY])


def load_map(path: str | Path, device: str | torch.device = "cpu") -> FeatureMapping:
    """A map written by :func:`save_map` -> the map, eval mode, its ``about`` in ``.about``."""
    spec = read_map_spec(path)
    fmap = build_map(spec["kind"], spec["in_channels"], spec["out_channels"], spec["in_grid"], spec["grid"],
                     **spec["options"])
    fmap.load_state_dict(load_file(str(path)))
    fmap.fit_info, fmap.about = spec.get("fit", {}), spec.get("about", {})
    return fmap.to(device).eval()


def check_map_fits(fmap: FeatureMapping, channels: int, grid, target_channels: int, source: str, target: str,
                   path: str) -> None:
    """ValueError naming both sides when a saved map does not take ``source``'s maps or give ``target``'s."""
    if fmap.in_channels != channels or fmap.in_grid != tuple(grid):
        made = f" (made for {fmap.about['source']})" if fmap.about.get("source") else ""
        raise ValueError(f"{path}: the map takes {fmap.in_channels}x{fmap.in_grid[0]}x{fmap.in_grid[1]} maps{made}, "
                         f"but {source} gives {channels}x{grid[0]}x{grid[1]}")
    if fmap.out_channels != target_channels:
        raise ValueError(f"{path}: the map gives {fmap.out_channels}-channel maps, but {target} inverts "
                         f"{target_channels} channels")
