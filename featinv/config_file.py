"""Config files: a preset name, a project YAML or a reference-style (``target:``/``params:``) YAML.

Apart from config.py so that config stays a leaf: the reference YAML is translated by
:func:`featinv.checkpoint.reference_yaml.config_from_reference_yaml`, next to the checkpoint key table.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from featinv.backbone import BACKBONE_PRESETS
from featinv.checkpoint import resolve_featinv_source
from featinv.checkpoint.reference_yaml import config_from_reference_yaml
from featinv.config import PRESETS, BackboneConfig, FeatInvConfig, merge


def load_config(path_or_preset: str, overrides: list[str] | None = None) -> FeatInvConfig:
    """A preset name, a project YAML (``preset:`` key optional) or a reference-style YAML.

    Project YAML: ``{preset: tiny, model: {...}, train: {...}}`` merged onto the preset.
    Reference YAML (has ``model.target``): translated into a ModelConfig.
    """
    if path_or_preset in PRESETS:
        try:
            return merge(PRESETS[path_or_preset], overrides or [])
        except ValueError as e:
            raise ValueError(f"command-line override(s) {' '.join(overrides or [])}: {e}") from None
    path = Path(path_or_preset)
    if not path.is_file():
        raise FileNotFoundError(
            f"config {path_or_preset!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    if isinstance(data.get("model"), dict) and "target" in data["model"]:
        cfg = FeatInvConfig(model=config_from_reference_yaml(data, source=str(path)))
        return merge(cfg, overrides or [])
    preset = data.pop("preset", "featinv_convnext")
    if preset not in PRESETS:
        raise ValueError(f"{path}: unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    try:
        return merge(PRESETS[preset], data, overrides or [])
    except ValueError as e:
        if overrides:  # say whose mistake it is: the file's, or the command line's
            try:
                merge(PRESETS[preset], data)
            except ValueError:
                pass
            else:
                raise ValueError(f"command-line override(s) {' '.join(overrides)}: {e}") from None
        raise ValueError(f"{path}: {e}") from None


def run_config(checkpoint: str | Path, config: str | None = None, run_dir: str | Path | None = None,
               backbone: str | None = None) -> tuple[FeatInvConfig | None, BackboneConfig, str]:
    """Where a trained checkpoint's model and backbone settings come from (reconstruct, the analyses,
    the app): ``(full config or None, backbone base, description)``. ``--config`` gives both; else the
    model comes from the checkpoint's metadata and the backbone from the training run's ``config.yaml``
    (``--run-dir``, else beside the checkpoint); with neither and no ``--backbone``, a ValueError names
    the missing flag (never a silent fall-back to another backbone)."""
    if config:
        full = load_config(config)
        return full, full.backbone, config
    if run_dir:
        run_file = Path(run_dir) / "config.yaml"
    else:  # beside the checkpoint file, or inside an exported FeatInv folder (or Hub id)
        try:
            run_file = resolve_featinv_source(checkpoint)[1] or Path(checkpoint).parent / "config.yaml"
        except FileNotFoundError:  # loading the checkpoint says so, in its own words
            run_file = Path(checkpoint).parent / "config.yaml"
    if run_file.is_file():
        return None, load_config(str(run_file)).backbone, f"model: the checkpoint's metadata; backbone: {run_file}"
    if run_dir:
        raise FileNotFoundError(f"--run-dir: {run_file} not found (a training run folder holds config.yaml)")
    if not backbone:
        raise ValueError(f"no backbone known for {checkpoint} (no config.yaml beside it): pass --backbone "
                         f"(a preset: {', '.join(BACKBONE_PRESETS)}, or a timm name), or --run-dir / --config")
    return None, BackboneConfig(), "model: the checkpoint's metadata; backbone: --backbone"
