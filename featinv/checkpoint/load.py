"""Reading, strict loading and saving of FeatInv and miniSD checkpoints (keys in the reference layout,
:mod:`featinv.checkpoint.layout`).

Sources: a checkpoint file, a diffusers pipeline folder (``model_index.json``, :mod:`featinv.checkpoint.diffusers`),
an exported FeatInv folder (weights, ``config.yaml``, ``README.md``: see :mod:`featinv.jobs.export`), or the Hub id
of a folder (:mod:`featinv.checkpoint.hub`). Loads are strict: a failure lists every missing, unexpected or
mis-shaped key by name.
"""
from __future__ import annotations

import json
import os
import pickle
import sys
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from featinv.checkpoint.config_file import from_dict, to_dict
from featinv.checkpoint.hub import DIFFUSERS_FILES, local_source
from featinv.checkpoint.layout import (
    EXPORT_FILES,
    METADATA_KEY,
    CheckpointError,
    check_state_dict,
    component_of,
    from_reference,
    to_reference,
)
from featinv.checkpoint.safe_unpickle import legacy_globals
from featinv.checkpoint.tensor_files import check_finite, file_kind, read_safetensors
from featinv.config import (
    RUN_CONFIG,
    WEIGHTS_FILE,
    AdapterConfig,
    DiffusionConfig,
    ModelConfig,
    TextConfig,
    UNetConfig,
    VAEConfig,
)
from featinv.diffusion.schedule import schedule_buffers
from featinv.io import atomic_save


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a ``.safetensors``, ``.ckpt`` (Lightning) or ``.pt``/``.pth`` file.

    Pickles are read with ``weights_only=True`` (plus inert stand-ins for the callback classes and
    numpy scalars of LDM-era Lightning files): a file that needs code execution is refused."""
    sd, metadata, _ = read_checkpoint(path)
    return sd, metadata


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str], dict | None]:
    """:func:`read_state_dict` plus the torch.save dict that wraps the state dict (a Lightning
    checkpoint's ``epoch``, ``global_step``, ...), None for safetensors and plain state dicts.

    ValueError naming the file for a folder, an unreadable file, and another kind of featinv file (a
    concept basis, see :data:`featinv.checkpoint.tensor_files.FILE_KINDS`); FileNotFoundError if missing."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; expected a checkpoint file (.safetensors, .ckpt, .pt or .pth)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:  # memory-mapped views, not copies: see featinv.checkpoint.tensor_files
            sd, metadata = read_safetensors(path)
        except SafetensorError as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        if other := file_kind(metadata):
            raise CheckpointError(f"{path} is {other}, not a model checkpoint")
        return sd, metadata, None
    is_zip = zipfile.is_zipfile(path)
    if not is_zip:
        with open(path, "rb") as f:
            head = f.read(4)
        if head.startswith(b"PK"):
            raise CheckpointError(f"{path}: damaged torch.save zip archive (truncated or corrupt file)")
        if head[:1] != b"\x80":  # a pickle (protocol >= 2) starts with the PROTO opcode
            raise CheckpointError(f"{path}: not a checkpoint: neither safetensors (by its suffix), "
                                  "a torch.save zip archive nor a pickle")
    try:  # mmap needs the zip format of torch.save; legacy (pre-1.6) pickles are read without it
        # weights_only, plus inert stand-ins for the harmless globals of LDM / Lightning 1.x files
        with torch.serialization.safe_globals(legacy_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except (pickle.UnpicklingError, RuntimeError) as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            detail = next((ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln), str(e).splitlines()[0])
            raise CheckpointError(
                f"{path}: refusing to load a pickle that needs arbitrary code execution "
                f"(torch.load weights_only=True failed). If you trust the file, convert it once with "
                f"`featinv convert {path} OUT.safetensors --trust-pickle` (this unpickles it fully). "
                f"Details: {detail}") from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({e})") from None
    sd, container = unwrap_state_dict(obj, path)
    return sd, {}, container


def unwrap_state_dict(obj, source: str | os.PathLike, tensors_only: bool = True) -> tuple[dict, dict | None]:
    """(state dict, the torch.save dict that wraps it or None) of what ``torch.load`` returned: a plain
    state dict, or a dict whose ``state_dict`` entry is one (a Lightning checkpoint). Anything else is a
    CheckpointError naming ``source``; so is a non-tensor value, unless ``tensors_only`` is False."""
    container = obj if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict) else None
    sd = container["state_dict"] if container is not None else obj
    if not isinstance(sd, dict) or (tensors_only and not all(isinstance(v, torch.Tensor) for v in sd.values())):
        raise CheckpointError(f"{source}: expected a state dict (or a dict with 'state_dict'), "
                              f"found {type(sd).__name__}")
    return sd, container


def check_schedule(schedule: dict[str, torch.Tensor], diffusion: DiffusionConfig, source: str) -> None:
    """Schedule buffers in a file must equal the config's (they are derived, never loaded)."""
    expected = schedule_buffers(diffusion)
    for k, v in schedule.items():
        # fp16 / bf16 files store rounded buffers: allow two ulps of the file's dtype
        rtol = max(1e-5, 2 * torch.finfo(v.dtype).eps) if v.is_floating_point() else 1e-5
        if v.shape != expected[k].shape or not torch.allclose(v.float(), expected[k], rtol=rtol, atol=1e-7):
            raise CheckpointError(f"{source}: schedule buffer {k!r} differs from the config's diffusion schedule "
                                  f"({diffusion}); the model was trained with another schedule")


def load_into(model, sd: dict[str, torch.Tensor], components: tuple[str, ...] | None = None,
              source: str = "checkpoint", assign: bool = False) -> list[str]:
    """Load a reference-layout (or featinv-layout) state dict strictly; return notes.

    assign: make ``sd``'s tensors the model's parameters (cast to the model's dtypes where they
    differ) instead of copying into them: a model built on the meta device then costs no second copy."""
    ours, schedule, notes = from_reference(sd)
    check_schedule(schedule, model.cfg.diffusion, source)
    check_state_dict(model, ours, components, source)
    if assign:
        dtypes = {k: v.dtype for k, v in model.state_dict().items()}
        ours = {k: v if v.dtype == dtypes[k] else v.to(dtypes[k]) for k, v in ours.items()}
    model.load_state_dict(ours, strict=components is None, assign=assign)
    return notes


def infer_model_config(sd: dict[str, torch.Tensor], source: str = "checkpoint") -> ModelConfig:
    """Guess the ModelConfig of a reference-layout state dict from its shapes.

    Heads are not visible in shapes: SD-1.x values (8 UNet heads, 64-dim text heads) are assumed."""
    ours, _, _ = from_reference(sd)
    try:
        te = ours["unet.time_embed.0.weight"]
        mc = te.shape[1]
        starts = sorted({int(k.split(".")[2]) for k in ours if k.startswith("unet.input_blocks.")})
        outs = [ours[f"unet.input_blocks.{i}.0.in_layers.2.weight"].shape[0]
                for i in starts if f"unet.input_blocks.{i}.0.in_layers.2.weight" in ours]
        downs = [i for i in starts if f"unet.input_blocks.{i}.0.op.weight" in ours]
        levels = len(downs) + 1
        nres = len(outs) // levels
        mult = tuple(outs[lvl * nres] // mc for lvl in range(levels))
        attn, res_idx = [], [i for i in starts if i and i not in downs]
        for lvl in range(levels):
            if f"unet.input_blocks.{res_idx[lvl * nres]}.1.proj_in.weight" in ours:
                attn.append(2 ** lvl)
        ctx = ours["unet.middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
        unet = UNetConfig(in_channels=ours["unet.input_blocks.0.0.weight"].shape[1],
                          out_channels=ours["unet.out.2.weight"].shape[0], model_channels=mc, channel_mult=mult,
                          num_res_blocks=nres, attention_resolutions=tuple(attn[::-1]),  # (4, 2, 1) as in the YAML
                          num_heads=8 if mc >= 320 else 2, context_dim=ctx)
        hint = ours.get("control.input_hint_block.block.1.weight")
        adapter = AdapterConfig(in_channels=hint.shape[1], width=hint.shape[0]) if hint is not None else AdapterConfig()
        ch = ours["vae.encoder.conv_in.weight"].shape[0]
        vlevels = len({k.split(".")[3] for k in ours if k.startswith("vae.encoder.down.")})
        vmult = tuple(ours[f"vae.encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in range(vlevels))
        vres = len({k.split(".")[5] for k in ours if k.startswith("vae.encoder.down.0.block.")})
        vae = VAEConfig(ch=ch, ch_mult=vmult, num_res_blocks=vres,
                        z_channels=ours["vae.post_quant_conv.weight"].shape[0],
                        embed_dim=ours["vae.post_quant_conv.weight"].shape[0])
        tok = ours["text_encoder.embeddings.token_embedding.weight"]
        width = tok.shape[1]
        tlayers = len({k.split(".")[3] for k in ours if k.startswith("text_encoder.encoder.layers.")})
        text = TextConfig(vocab_size=tok.shape[0], width=width, layers=tlayers, heads=max(1, width // 64) if width >= 64 else 2,
                          mlp_width=ours["text_encoder.encoder.layers.0.mlp.fc1.weight"].shape[0],
                          context_length=ours["text_encoder.embeddings.position_embedding.weight"].shape[0])
    except (KeyError, IndexError, ZeroDivisionError) as e:
        raise CheckpointError(f"{source}: cannot infer the model config from its keys (missing {e}); "
                              "pass a config (preset name or YAML)") from None
    return ModelConfig(unet=unet, adapter=adapter, vae=vae, text=text)


def config_from_metadata(metadata: dict[str, str]) -> ModelConfig | None:
    """The ModelConfig saved in a featinv safetensors file, if any."""
    if METADATA_KEY not in metadata:
        return None
    return from_dict(ModelConfig, json.loads(metadata[METADATA_KEY]))


def resolve_featinv_source(source: str | os.PathLike) -> tuple[Path, Path | None]:
    """A trained FeatInv model's (weights file, run config.yaml or None) from a checkpoint file (its
    config.yaml is the one beside it, if any), an exported FeatInv folder, or the Hub id of one."""
    path = local_source(source, EXPORT_FILES)
    if path.is_dir():
        if (path / WEIGHTS_FILE).is_file():
            path = path / WEIGHTS_FILE
        elif (path / "model_index.json").is_file():
            raise ValueError(f"{source}: a diffusers pipeline (miniSD) holds no FeatInv branch; make the initial "
                             "FeatInv checkpoint from it with `featinv build-control`")
        else:
            raise FileNotFoundError(f"{source}: a folder without {WEIGHTS_FILE} (an exported FeatInv model, "
                                    "see `featinv export`)")
    run_config = path.parent / RUN_CONFIG
    return path, run_config if run_config.is_file() else None


def read_source(source: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ModelConfig | None]:
    """(state dict with reference keys, the config it carries or None) of a checkpoint file, an exported
    FeatInv folder, a diffusers pipeline folder (config from its config.json files, see
    :mod:`featinv.checkpoint.diffusers`), or the Hub id of either folder."""
    from featinv.checkpoint.diffusers import is_pipeline_folder, read_pipeline

    path = local_source(source, DIFFUSERS_FILES + EXPORT_FILES)
    if path.is_dir() and is_pipeline_folder(path):
        return read_pipeline(path)
    if path.is_dir() and not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{source}: a folder that is neither a diffusers pipeline (no model_index.json) "
                                f"nor an exported FeatInv model (no {WEIGHTS_FILE})")
    weights, _ = resolve_featinv_source(path)
    sd, metadata = read_state_dict(weights)
    return sd, config_from_metadata(metadata)


def check_adapter_option(saved: ModelConfig | None, model, source: str) -> None:
    """CheckpointError naming ``model.adapter.pooled`` if a file's adapter was trained with the other
    setting than the model it is loaded into (its metadata's config; no metadata: not checked).

    The setting changes what the adapter sees, not its weights, so shapes cannot catch it. An adapter
    whose output conv is still zero (build-control's output, never trained) gives the same zero hint
    either way, so an initial checkpoint starts a run of either kind."""
    want = model.cfg.adapter.pooled
    if saved is None or saved.adapter.pooled == want:
        return
    last = model.control.input_hint_block.block[-1]
    if not (last.weight.any() or last.bias.any()):
        return
    kind = "pooled" if saved.adapter.pooled else "spatial"
    raise CheckpointError(f"{source}: its adapter was trained on {kind} feature maps (metadata adapter.pooled="
                          f"{str(saved.adapter.pooled).lower()}) but the config says model.adapter.pooled="
                          f"{str(want).lower()}; load it with model.adapter.pooled={str(saved.adapter.pooled).lower()}")


def read_control_pair(control: str | os.PathLike, minisd: str | os.PathLike
                      ) -> tuple[dict[str, torch.Tensor], dict[str, str], ModelConfig | None]:
    """A control-branch-only file and a miniSD source (file, diffusers folder or Hub id), read memory-mapped where
    the format allows -> (the full model's reference-layout state dict, the control file's metadata, the miniSD's
    config with the control file's adapter, or None) (:func:`featinv.checkpoint.control_pair.pair_control`)."""
    from featinv.checkpoint.control_pair import check_control_only, pair_control

    sd_c, metadata = read_state_dict(control)
    check_control_only(sd_c, str(control))
    sd_m, found = read_source(minisd)
    merged, found = pair_control(sd_c, str(control), sd_m, found, str(minisd))
    return merged, metadata, found


def load_featinv(path: str | os.PathLike, cfg: ModelConfig | None = None, device: str | torch.device = "cpu",
                 minisd: str | os.PathLike | None = None):
    """Build a FeatInv model from a full checkpoint (featinv safetensors, reference .ckpt/.pt), an
    exported FeatInv folder or its Hub id (see :func:`resolve_featinv_source`); with ``minisd``, from a
    control-branch-only ``path`` and that miniSD source (:mod:`featinv.checkpoint.control_pair`).

    The config comes from ``cfg``, else the file's metadata (the miniSD's), else the shapes. Loading is
    strict, and NaN/inf weights are refused. Peak memory is about one copy of the weights: safetensors
    files and torch.save zip archives are memory-mapped and their tensors assigned as the parameters."""
    from featinv.checkpoint.control_pair import check_control_fits, check_not_control_only
    from featinv.nets.model import FeatInv

    path, _ = resolve_featinv_source(path)
    sd, metadata, found = (*read_state_dict(path), None) if minisd is None else read_control_pair(path, minisd)
    if minisd is None:
        check_not_control_only(sd, str(path))
    saved = config_from_metadata(metadata)
    given = cfg is not None
    cfg = cfg or saved or found or infer_model_config(sd, str(path))
    check_finite(sd, str(path), "the checkpoint is broken (a diverged run?) and would reconstruct black images")
    with torch.device("meta"):  # no storage: the file's tensors become the parameters (one copy in memory)
        model = FeatInv(cfg)
    if minisd is not None:
        check_control_fits(model, sd, str(path), "the config given" if given else f"the UNet of {minisd}")
    notes = load_into(model, sd, source=str(path), assign=True)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not left, f"not loaded: {left[:3]}"  # strict loading covers every parameter and buffer
    check_adapter_option(saved, model, str(path))
    for note in notes:
        print(f"note: {path}: {note}", file=sys.stderr)
    return model.to(device)


def save_featinv(model, path: str | os.PathLike, extra_metadata: dict[str, str] | None = None) -> Path:
    """Write the full model in the reference layout as safetensors, config in the metadata, atomically."""
    sd = to_reference({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, model.cfg.diffusion)
    metadata = {METADATA_KEY: json.dumps(to_dict(model.cfg), sort_keys=True), **(extra_metadata or {})}
    return atomic_save(lambda tmp: save_file(sd, tmp, metadata=metadata), path)


def save_minisd(model, path: str | os.PathLike) -> Path:
    """Write a model's UNet, VAE and text encoder as a miniSD checkpoint (reference keys and schedule
    buffers, no ``control_model.*``), atomically: what ``build_control`` starts from."""
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if component_of(k) != "control"}
    ref = to_reference(sd, model.cfg.diffusion)
    return atomic_save(lambda tmp: save_file(ref, tmp), path)
