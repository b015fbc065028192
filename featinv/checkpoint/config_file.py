"""Config files and config (de)serialisation: a preset name, a project YAML or a reference-style
(``target:``/``params:``) YAML -> :class:`~featinv.config.FeatInvConfig`; strict merging of mappings and
dotlists onto a config (``OmegaConf.structured``: an unknown key is an error naming it); plain dicts.

Apart from config.py so that config stays a plain leaf: the reference YAML is translated by
:func:`featinv.checkpoint.reference_yaml.config_from_reference_yaml`, next to the checkpoint key table.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from featinv.checkpoint.reference_yaml import config_from_reference_yaml
from featinv.config import PRESETS, FeatInvConfig


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


def to_dict(cfg: Any) -> dict:
    """A plain dict (tuples become lists) of a config dataclass."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested mappings -> one level with dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def from_dict(cls: type, data: dict | None) -> Any:
    """Build config dataclass ``cls`` from a (possibly partial) mapping; unknown keys fail."""
    return merge(cls(), data or {})


def merge(base: Any, *overrides: Any) -> Any:
    """Merge mappings / dotlists onto a config dataclass instance, strictly.

    ``overrides`` are dicts or lists of ``"a.b=value"`` strings. Unknown keys and wrong types
    raise ``ValueError`` naming the key.
    """
    conf = OmegaConf.structured(base)
    try:
        for ov in overrides:
            if isinstance(ov, (list, tuple)):
                ov = OmegaConf.from_dotlist(list(ov))
            conf = OmegaConf.merge(conf, ov)
        return OmegaConf.to_object(conf)
    except OmegaConfBaseException as e:  # its message, without OmegaConf's dump of the types involved
        key = getattr(e, "full_key", None)
        text = (getattr(e, "msg", None) or str(e)).splitlines()[0]
        raise ValueError(f"{key + ': ' if key else ''}{text}") from None
