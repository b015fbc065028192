"""What a checkpoint of unknown origin holds, and whether it loads.

Reports the file format, the components (UNet, control branch, VAE, text encoder, schedule buffers)
with parameter counts and dtypes, the kind of checkpoint, its config (file metadata, else inferred
from shapes) and the preset that config matches, and the outcome of a strict load against a
meta-device model (no weights are allocated).
"""
from __future__ import annotations

import os
import re
import zipfile
from collections import Counter
from pathlib import Path

import torch

from featinv.checkpoint.config_file import flatten, from_dict, load_config, to_dict
from featinv.checkpoint.layout import (
    COMPONENT_NAMES,
    HARMLESS,
    CheckpointError,
    check_state_dict,
    component_of,
    from_reference,
)
from featinv.checkpoint.load import check_schedule, config_from_metadata, infer_model_config, read_checkpoint
from featinv.checkpoint.tensor_files import nonfinite_counts
from featinv.config import BACKBONE_HELP, PRESETS, WEIGHTS_FILE, ModelConfig
from featinv.nets.model import FeatInv

WEIGHT_COMPONENTS = ("unet", "control", "vae", "text_encoder")
MINISD = ("unet", "vae", "text_encoder")
TRAINING_KEYS = ("epoch", "global_step", "optimizer_states", "lr_schedulers", "loops")
WRAPPER = "model."  # FeatInvModule.model: our training checkpoints hold "model.control.*"


def _unwrap(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str | None]:
    """Strip a LightningModule's ``model.`` prefix when it wraps our own key layout."""
    ours = {"unet.", "control.", "vae.", "text_encoder."}
    wrapped = {k for k in sd if k.startswith(WRAPPER) and any(k[len(WRAPPER):].startswith(p) for p in ours)}
    if not wrapped:
        return sd, None
    return {k[len(WRAPPER):] if k in wrapped else k: v for k, v in sd.items()}, WRAPPER


def _components(sd: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Tensor count, value count and dtypes per component; harmless extras counted apart."""
    groups: dict[str, list[str]] = {}
    for key in sd:
        comp = "ignored" if any(key.startswith(h) for h in HARMLESS) else component_of(key)
        groups.setdefault(comp, []).append(key)
    out, nonfinite = {}, nonfinite_counts(sd)
    for comp in (*WEIGHT_COMPONENTS, "schedule", "other", "ignored"):
        keys = groups.get(comp, [])
        if not keys:
            continue
        entry = {"name": COMPONENT_NAMES.get(comp, "ignored (harmless)"), "tensors": len(keys),
                 "params": sum(sd[k].numel() for k in keys),
                 "dtypes": sorted({str(sd[k].dtype).removeprefix("torch.") for k in keys}),
                 "examples": keys[:3], "nonfinite": sum(nonfinite.get(k, 0) for k in keys),
                 "nonfinite_first": next((k for k in keys if k in nonfinite), None)}
        if comp == "control":  # the feature adapter is the control branch's input_hint_block
            hint = [k for k in keys if ".input_hint_block." in k]
            entry["adapter_params"] = sum(sd[k].numel() for k in hint)
        out[comp] = entry
    return out


def _kind(components: dict) -> str:
    present = set(components) & set(WEIGHT_COMPONENTS)
    if present == set(WEIGHT_COMPONENTS):
        return "full FeatInv (miniSD + control branch)"
    if present == set(MINISD):
        return "miniSD (no control branch)"
    if present:
        return "partial: " + " + ".join(COMPONENT_NAMES[c] for c in WEIGHT_COMPONENTS if c in present) + " only"
    return "unrecognised (no UNet, control branch, VAE or text encoder keys)"


def adapter_fit(sd: dict[str, torch.Tensor]) -> dict | None:
    """The adapter's feature channels (its first conv's input) and the presets that give them: config presets
    whose adapter takes them and backbone presets whose feature map has them (a file does not name its
    backbone). None without an adapter."""
    hint = sd.get("control_model.input_hint_block.block.1.weight", sd.get("control.input_hint_block.block.1.weight"))
    if hint is None:
        return None
    channels = hint.shape[1]
    return {"in_channels": channels, "width": hint.shape[0],
            "config_presets": [n for n, p in PRESETS.items() if p.model.adapter.in_channels == channels],
            "backbone_presets": [n for n, text in BACKBONE_HELP.items() if re.search(rf"\b{channels}x\d+x\d+", text)]}


def match_preset(cfg: ModelConfig, has_control: bool = True) -> str | None:
    """The preset ``cfg`` equals (gradient_checkpointing ignored), a preset plus adapter changes, or None.

    Without a control branch the adapter is unknown, so adapter fields are not compared."""
    def comparable(c: ModelConfig) -> dict:
        leaves = flatten(to_dict(c))
        return {k: v for k, v in leaves.items()
                if k != "unet.gradient_checkpointing" and (has_control or not k.startswith("adapter."))}

    mine = comparable(cfg)
    for name, preset in PRESETS.items():
        theirs = comparable(preset.model)
        diffs = {k: v for k, v in mine.items() if theirs.get(k) != v}
        if not diffs:
            return name
        if all(k.startswith("adapter.") for k in diffs):
            return f"{name} with " + ", ".join(f"{k}={v}" for k, v in diffs.items())
    return None


def _summary(value):
    """A JSON-ready stand-in for a training-state entry: a number, or the length of a container."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (list, tuple, dict)):
        return len(value)
    return value if isinstance(value, (int, float)) else str(value)


def _resolve_config(sd, metadata, container, config, source) -> tuple[ModelConfig | None, str, str | None]:
    """(config, where it came from, why none could be found)."""
    if config is not None:
        cfg = config if isinstance(config, ModelConfig) else load_config(str(config)).model
        return cfg, f"given ({config if isinstance(config, str) else 'ModelConfig'})", None
    cfg = config_from_metadata(metadata)
    if cfg is not None:
        return cfg, "file metadata", None
    saved = (container or {}).get("featinv", {})
    if isinstance(saved, dict) and isinstance(saved.get("model"), dict):
        return from_dict(ModelConfig, saved["model"]), "training checkpoint's 'featinv' entry", None
    try:
        return infer_model_config(sd, source), "inferred from tensor shapes (head counts assumed)", None
    except CheckpointError as e:
        return None, "none", str(e)


def _strict_load(model: torch.nn.Module, sd: dict[str, torch.Tensor], components: tuple[str, ...] | None,
                 source: str) -> dict:
    """Would ``load_into`` accept ``sd``? ``model`` may live on the meta device (nothing allocated)."""
    ours, schedule, _ = from_reference(sd)
    try:
        check_schedule(schedule, model.cfg.diffusion, source)
        check_state_dict(model, ours, components, source)
    except CheckpointError as e:
        return {"ok": False, "problems": str(e)}
    return {"ok": True, "problems": None}


def checkpoint_file(path: str | os.PathLike) -> Path:
    """``path``, or the weights file of a folder holding one (a run or an exported FeatInv model, as
    ``load_featinv`` accepts); ValueError for any other folder."""
    path = Path(path)
    if not path.is_dir():
        return path
    if (path / WEIGHTS_FILE).is_file():
        return path / WEIGHTS_FILE
    if (path / "model_index.json").is_file():
        raise ValueError(f"{path} is a diffusers pipeline folder; expected a checkpoint file (make one with "
                         f"`featinv convert {path} OUT.safetensors`)")
    raise ValueError(f"{path} is a folder; expected a checkpoint file (.safetensors, .ckpt, .pt or .pth) or a "
                     f"folder holding {WEIGHTS_FILE} (a run, or one written by featinv export)")


def describe(path: str | os.PathLike, config: str | ModelConfig | None = None) -> dict:
    """Everything ``featinv inspect`` reports about one checkpoint (a file, or a folder holding
    ``featinv.safetensors``: see :func:`checkpoint_file`), as a JSON-ready dict."""
    path = checkpoint_file(path)
    sd, metadata, container = read_checkpoint(path)
    sd, wrapper = _unwrap(sd)
    components = _components(sd)
    has_control = "control" in components
    info: dict = {
        "path": str(path), "bytes": path.stat().st_size,
        "format": "safetensors" if path.suffix == ".safetensors" else
                  f"torch.save {'zip archive' if zipfile.is_zipfile(path) else 'legacy pickle'}, "
                  + ("dict with 'state_dict'" if container is not None else "plain state dict"),
        "tensors": len(sd), "values": sum(v.numel() for v in sd.values()),
        "dtypes": dict(Counter(str(v.dtype).removeprefix("torch.") for v in sd.values())),
        "components": components, "kind": _kind(components), "key_prefix_stripped": wrapper,
        "metadata_keys": sorted(metadata), "adapter": adapter_fit(sd),
    }
    training = {k: _summary(container[k]) for k in TRAINING_KEYS if container is not None and k in container}
    info["training"] = ({**training, "other_entries": sorted(set(container) - set(TRAINING_KEYS) - {"state_dict"})}
                        if training else None)
    cfg, cfg_source, cfg_error = _resolve_config(sd, metadata, container, config, str(path))
    info["config"] = {"source": cfg_source, "error": cfg_error, "model": to_dict(cfg) if cfg else None,
                      "preset": match_preset(cfg, has_control) if cfg else None}
    present = tuple(c for c in WEIGHT_COMPONENTS if c in components)
    info["strict_load"] = None
    if cfg is not None:
        with torch.device("meta"):
            model = FeatInv(cfg)
        info["strict_load"] = {"full": _strict_load(model, sd, None, str(path))}
        if present and present != WEIGHT_COMPONENTS:  # e.g. a miniSD file: does what is there fit?
            info["strict_load"]["present_components"] = {
                "components": [COMPONENT_NAMES[c] for c in present], **_strict_load(model, sd, present, str(path))}
    return info


def _millions(n: int) -> str:
    return f"{n:,}" if n < 10_000 else f"{n / 1e6:,.2f} M"


def format_report(info: dict) -> str:
    """The human-readable report of :func:`describe`."""
    lines = [f"checkpoint  {info['path']}  ({info['bytes'] / 2 ** 20:,.1f} MiB)",
             f"format      {info['format']}",
             f"tensors     {info['tensors']} ({_millions(info['values'])} values); dtypes "
             + ", ".join(f"{d} x{n}" for d, n in info["dtypes"].items()),
             f"holds       {info['kind']}"]
    if set(info["components"]) & set(WEIGHT_COMPONENTS) == {"control"}:
        lines.append("            (a control branch shipped alone: load it with its miniSD file, --minisd FILE)")
    if info["metadata_keys"]:
        lines.append(f"metadata    {', '.join(info['metadata_keys'])}")
    if info["key_prefix_stripped"]:
        lines.append(f"            (keys carry a training-module prefix {info['key_prefix_stripped']!r}, ignored here)")
    if info["training"]:
        t = info["training"]
        lines.append("training    yes: " + ", ".join(f"{k}={v}" for k, v in t.items() if k != "other_entries")
                     + (f"; also {', '.join(t['other_entries'])}" if t["other_entries"] else ""))
    cfg = info["config"]
    if cfg["model"] is None:
        lines.append(f"config      unknown: {cfg['error']}")
    else:
        preset = f"matches {cfg['preset']}" if cfg["preset"] else "matches no preset"
        lines.append(f"config      {cfg['source']}; {preset}")
    if info.get("adapter"):
        a = info["adapter"]
        fits = [f"--config {n}" for n in a["config_presets"]] + [f"--backbone {n}" for n in a["backbone_presets"]]
        lines.append(f"adapter     takes {a['in_channels']}-channel feature maps (width {a['width']}); "
                     + ("presets that give them: " + ", ".join(fits) if fits else "no preset gives them: pass "
                        "--config YAML or --backbone (a timm name) of a classifier with that many channels")
                     + "; the file does not name its backbone")
    lines += ["", f"  {'component':<22}{'tensors':>8}{'params':>16}  dtypes"]
    for entry in info["components"].values():
        lines.append(f"  {entry['name']:<22}{entry['tensors']:>8}{entry['params']:>16,}  {', '.join(entry['dtypes'])}")
        if "adapter_params" in entry:
            lines.append(f"  {'  of which adapter':<22}{'':>8}{entry['adapter_params']:>16,}")
    broken = [e for e in info["components"].values() if e["nonfinite"]]
    if broken:
        lines.append("  non-finite (NaN/inf) values: " + "; ".join(
            f"{e['name']} {e['nonfinite']:,} (first {e['nonfinite_first']})" for e in broken)
            + " -- this checkpoint would reconstruct black images")
    lines.append("")
    load = info["strict_load"]
    if load is None and not set(info["components"]) & set(WEIGHT_COMPONENTS):
        lines.append("strict load not checked: the file holds no model weights (not a FeatInv or Stable Diffusion "
                     "checkpoint)")
    elif load is None:
        lines.append("strict load not checked: no config (pass --config PRESET_OR_YAML)")
    else:
        full = load["full"]
        lines.append("strict load as a full FeatInv model: " + ("OK" if full["ok"] else "FAILS\n" + full["problems"]))
        part = load.get("present_components")
        if part:
            lines.append(f"strict load of the parts present ({', '.join(part['components'])}): "
                         + ("OK" if part["ok"] else "FAILS\n" + part["problems"]))
    return "\n".join(lines)
