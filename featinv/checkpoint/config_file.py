"""Config files: a preset name, a project YAML or a reference-style (``target:``/``params:``) YAML.

Apart from config.py so that config stays a leaf: the reference YAML is translated by
:func:`featinv.checkpoint.reference_yaml.config_from_reference_yaml`, next to the checkpoint key table.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from featinv.checkpoint.reference_yaml import config_from_reference_yaml
from featinv.config import PRESETS, FeatInvConfig, merge


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


