"""diffusers pipeline folders -> the reference (LDM) layout: key renames and config checks.

A Stable-Diffusion pipeline folder (``model_index.json``; ``unet/``, ``vae/``, ``text_encoder/``, each
with ``config.json`` and weights; ``scheduler/`` optional) is read into the state dict a miniSD
``.ckpt`` holds (reference keys) plus the :class:`ModelConfig` its ``config.json`` files describe. Each
config field is either read, checked against the one value featinv implements, or known not to change
the numbers; anything else is a ValueError naming the file and field. Every tensor is renamed by the
rules below or named in an error: nothing is dropped silently. (The folder's tokenizer is not read:
featinv tokenizes with the CLIP BPE that every SD-1.x pipeline ships.)

    diffusers (n = layers_per_block)                 reference, under model.diffusion_model. / first_stage_model.
    unet conv_in; time_embedding.linear_{1,2}        input_blocks.0.0; time_embed.{0,2}
    unet down_blocks.i.{resnets,attentions}.j        input_blocks.(1 + i(n+1) + j).{0,1}
    unet down_blocks.i.downsamplers.0.conv           input_blocks.((i+1)(n+1)).0.op
    unet mid_block.resnets.{0,1}; attentions.0       middle_block.{0,2}; middle_block.1
    unet up_blocks.i.{resnets,attentions}.j          output_blocks.(i(n+1) + j).{0,1}   (same order: deepest first)
    unet up_blocks.i.upsamplers.0                    output_blocks.(i(n+1) + n).{1, or 2 after an attention}
    unet conv_norm_out; conv_out                     out.0; out.2
    unet resnet norm1 conv1 time_emb_proj            in_layers.0 in_layers.2 emb_layers.1
               norm2 conv2 conv_shortcut             out_layers.0 out_layers.3 skip_connection
    vae encoder.down_blocks.i                        encoder.down.i (resnets.j -> block.j, downsamplers.0 -> downsample)
    vae decoder.up_blocks.i                          decoder.up.(L-1-i): diffusers counts up from the LOWEST resolution
    vae mid_block.resnets.{0,1}; conv_norm_out       mid.block_{1,2}; norm_out; resnet conv_shortcut -> nin_shortcut
    vae mid_block.attentions.0 group_norm, to_q/k/v, to_out.0 (older files: query/key/value, proj_attn):
        Linear weights (C, C)                        mid.attn_1 norm, q/k/v, proj_out: 1x1 conv weights (C, C, 1, 1)
    text_encoder [text_model.]X                      cond_stage_model.transformer.text_model.X
"""
from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path

import torch

from featinv.checkpoint.reference_yaml import clip_text_config
from featinv.checkpoint.tensor_files import read_safetensors
from featinv.config import AdapterConfig, DiffusionConfig, ModelConfig, UNetConfig, VAEConfig

COMPONENTS = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel"}
PREFIX = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
          "text_encoder": "cond_stage_model.transformer.text_model."}
WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}

# config.json fields with the one value featinv implements (the SD-1.x value). A field not listed here
# nor read may only hold None / False (a feature switched off); any other value is an error.
UNET_FIXED = {"act_fn": "silu", "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
              "downsample_padding": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_num_groups": 32,
              "norm_eps": 1e-5, "use_linear_projection": False, "resnet_time_scale_shift": "default",
              "time_embedding_type": "positional", "conv_in_kernel": 3, "conv_out_kernel": 3,
              "attention_type": "default", "mid_block_scale_factor": 1, "resnet_out_scale_factor": 1.0,
              "dropout": 0.0, "num_attention_heads": None}
# Fields that do not change an fp32 forward: upcast_attention only matters in fp16, sample_size is
# read separately, addition_embed_type_num_heads is unused without an addition embedding.
UNET_NEUTRAL = {"upcast_attention", "sample_size", "addition_embed_type_num_heads"}
UNET_READ = {"in_channels", "out_channels", "block_out_channels", "layers_per_block", "attention_head_dim",
             "cross_attention_dim", "down_block_types", "up_block_types", "transformer_layers_per_block",
             "only_cross_attention"}
VAE_FIXED = {"act_fn": "silu", "norm_num_groups": 32, "use_quant_conv": True, "use_post_quant_conv": True,
             "mid_block_add_attention": True}
VAE_NEUTRAL = {"force_upcast", "sample_size"}
VAE_READ = {"in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
            "scaling_factor", "down_block_types", "up_block_types"}
# transformers' generic PretrainedConfig fields, none of which changes the text encoder's output
TEXT_GENERIC = {"dtype", "torch_dtype", "transformers_version", "architectures", "model_type", "output_attentions",
                "output_hidden_states", "return_dict", "use_return_dict", "tie_word_embeddings", "is_decoder",
                "is_encoder_decoder", "chunk_size_feed_forward", "problem_type", "id2label", "label2id"}
SCHEDULER_FIXED = {"beta_schedule": "scaled_linear", "prediction_type": "epsilon", "trained_betas": None}


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; ValueError naming the file if it is not one."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def is_pipeline_folder(path: str | Path) -> bool:
    return (Path(path) / "model_index.json").is_file()


def _check_fields(cfg: dict, fixed: dict, neutral: set[str], read: set[str], where: Path) -> None:
    """One line naming the first field of ``cfg`` featinv does not implement."""
    for name, value in cfg.items():
        if name.startswith("_") or name in neutral or name in read:
            continue
        if name in fixed:
            if value != fixed[name]:
                raise ValueError(f"{where}: {name} = {value!r} is not supported (featinv implements "
                                 f"{fixed[name]!r}, the SD-1.x value)")
        elif value not in (None, False):
            raise ValueError(f"{where}: field {name} = {value!r} is not supported (featinv implements the "
                             "SD-1.x UNet / KL autoencoder, in which this feature is off)")


def _same(value, where: Path, name: str):
    """An int field that diffusers also accepts per level: the one value, if all levels agree."""
    values = value if isinstance(value, (list, tuple)) else [value]
    if len(set(values)) != 1 or not isinstance(values[0], int):
        raise ValueError(f"{where}: {name} = {value!r} is not supported: featinv uses one value for every "
                         "level (SD-1.x: attention_head_dim 8 = heads, layers_per_block 2, one transformer layer)")
    return values[0]


def _multipliers(channels: list[int], where: Path) -> tuple[int, tuple[int, ...]]:
    """block_out_channels -> (base width, integer multipliers)."""
    base = channels[0]
    if any(c % base for c in channels):
        raise ValueError(f"{where}: block_out_channels {channels} are not multiples of the first")
    return base, tuple(c // base for c in channels)


def unet_config(cfg: dict, where: Path) -> tuple[UNetConfig, list[bool]]:
    """UNet ``config.json`` -> (UNetConfig, which up block holds attention, in diffusers order)."""
    _check_fields(cfg, UNET_FIXED, UNET_NEUTRAL, UNET_READ, where)
    if cfg.get("only_cross_attention", False) not in (False, [False] * len(cfg["down_block_types"])):
        raise ValueError(f"{where}: only_cross_attention = {cfg['only_cross_attention']!r} is not supported")
    if _same(cfg.get("transformer_layers_per_block", 1), where, "transformer_layers_per_block") != 1:
        raise ValueError(f"{where}: transformer_layers_per_block must be 1 (SD-1.x)")
    # diffusers' `attention_head_dim` holds the number of HEADS in SD-1.x configs (a historical name);
    # featinv's num_heads means the same (dim_head = channels // heads), one count for every level.
    heads = _same(cfg["attention_head_dim"], where, "attention_head_dim")
    down = list(cfg["down_block_types"])
    known = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    if any(t not in known for t in down):
        raise ValueError(f"{where}: down_block_types {down} not supported (known: {list(known)})")
    expected_up = [t.replace("Down", "Up") for t in reversed(down)]
    if list(cfg["up_block_types"]) != expected_up:
        raise ValueError(f"{where}: up_block_types {cfg['up_block_types']} must mirror down_block_types "
                         f"({expected_up})")
    mc, mult = _multipliers(list(cfg["block_out_channels"]), where)
    unet = UNetConfig(in_channels=cfg.get("in_channels", 4), out_channels=cfg.get("out_channels", 4),
                      model_channels=mc, channel_mult=mult,
                      num_res_blocks=_same(cfg.get("layers_per_block", 2), where, "layers_per_block"),
                      attention_resolutions=tuple(2 ** i for i, t in reversed(list(enumerate(down))) if known[t]),
                      num_heads=heads, context_dim=cfg["cross_attention_dim"])
    return unet, [t.startswith("CrossAttn") for t in expected_up]


def vae_config(cfg: dict, where: Path) -> VAEConfig:
    """AutoencoderKL ``config.json`` -> VAEConfig."""
    _check_fields(cfg, VAE_FIXED, VAE_NEUTRAL, VAE_READ, where)
    for name, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if any(t != block for t in cfg.get(name, [block])):
            raise ValueError(f"{where}: {name} {cfg[name]} not supported (only {block})")
    ch, mult = _multipliers(list(cfg["block_out_channels"]), where)
    return VAEConfig(in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3), ch=ch,
                     ch_mult=mult, num_res_blocks=_same(cfg.get("layers_per_block", 2), where, "layers_per_block"),
                     z_channels=cfg.get("latent_channels", 4), embed_dim=cfg.get("latent_channels", 4),
                     scale_factor=cfg.get("scaling_factor", 0.18215))


def scheduler_config(cfg: dict, where: Path) -> DiffusionConfig:
    """``scheduler_config.json`` -> the training schedule. Sampling settings (spacing, solver ...) are
    featinv's own and not read; the noise schedule and the ε-parameterisation must be SD-1.x's."""
    for name, value in SCHEDULER_FIXED.items():
        if cfg.get(name, value) != value:
            raise ValueError(f"{where}: {name} = {cfg[name]!r} is not supported (featinv implements {value!r})")
    return DiffusionConfig(timesteps=cfg.get("num_train_timesteps", 1000), linear_start=cfg.get("beta_start", 0.00085),
                           linear_end=cfg.get("beta_end", 0.012))


RESNET_UNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
RESNET_VAE = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "query": "q", "to_k": "k", "key": "k", "to_v": "v", "value": "v",
            "to_out.0": "proj_out", "proj_attn": "proj_out"}
_PARAM = r"(weight|bias)"


def _resnet(table: dict[str, str], rest: str) -> str | None:
    layer, _, param = rest.rpartition(".")
    return f"{table[layer]}.{param}" if layer in table and param in ("weight", "bias") else None


def unet_key(key: str, n: int, up_attention: list[bool]) -> str | None:
    """A diffusers UNet key -> the reference key without prefix; None if no rule applies."""
    fixed = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
    layer, _, param = key.rpartition(".")
    if layer in fixed and param in ("weight", "bias"):
        return f"{fixed[layer]}.{param}"
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        side, i, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        block = 1 + i * (n + 1) + j if side == "down" else i * (n + 1) + j
        name = "input_blocks" if side == "down" else "output_blocks"
        sub = _resnet(RESNET_UNET, rest) if kind == "resnets" else rest  # attention keys are identical
        return f"{name}.{block}.{0 if kind == 'resnets' else 1}.{sub}" if sub else None
    if m := re.fullmatch(rf"down_blocks\.(\d+)\.downsamplers\.0\.conv\.{_PARAM}", key):
        return f"input_blocks.{(int(m[1]) + 1) * (n + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(rf"up_blocks\.(\d+)\.upsamplers\.0\.conv\.{_PARAM}", key):
        i = int(m[1])
        if i >= len(up_attention):
            return None
        return f"output_blocks.{i * (n + 1) + n}.{2 if up_attention[i] else 1}.conv.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.([01])\.(.+)", key):
        sub = _resnet(RESNET_UNET, m[2])
        return f"middle_block.{2 * int(m[1])}.{sub}" if sub else None
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    return None


def vae_key(key: str, levels: int) -> str | None:
    """A diffusers AutoencoderKL key -> the reference key without prefix; None if no rule applies."""
    layer, _, param = key.rpartition(".")
    if layer in ("quant_conv", "post_quant_conv", "encoder.conv_in", "encoder.conv_out", "decoder.conv_in",
                 "decoder.conv_out"):
        return key
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out", layer):
        return f"{m[1]}.norm_out.{param}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(resnets\.(\d+)\.(.+)|downsamplers\.0\.conv\.(weight|bias))",
                         key):
        sub = _resnet(RESNET_VAE, m[4]) if m[3] else f"conv.{m[5]}"
        return (f"encoder.down.{m[1]}." + (f"block.{m[3]}.{sub}" if m[3] else f"downsample.{sub}")) if sub else None
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)\.(.+)|upsamplers\.0\.conv\.(weight|bias))", key):
        level = levels - 1 - int(m[1])  # diffusers up_blocks.0 is the lowest resolution, LDM up.0 the highest
        sub = _resnet(RESNET_VAE, m[4]) if m[3] else f"conv.{m[5]}"
        if level < 0 or not sub:
            return None
        return f"decoder.up.{level}." + (f"block.{m[3]}.{sub}" if m[3] else f"upsample.{sub}")
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(.+)", key):
        sub = _resnet(RESNET_VAE, m[3])
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{sub}" if sub else None
    if (m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", layer)) and m[2] in VAE_ATTN:
        return f"{m[1]}.mid.attn_1.{VAE_ATTN[m[2]]}.{param}"
    return None


def translate(component: str, sd: dict[str, torch.Tensor], where: Path, **layout) -> dict[str, torch.Tensor]:
    """One component's diffusers state dict -> reference keys (with prefix); a key no rule covers is an error."""
    out = {}
    for key, value in sd.items():
        if component == "text_encoder":
            if key.removeprefix("text_model.") == "embeddings.position_ids":
                continue  # a buffer holding arange(77): nothing learnt
            new = key.removeprefix("text_model.")  # transformers < 5 saved the inner module's prefix
        elif component == "unet":
            new = unet_key(key, layout["n"], layout["up_attention"])
        else:
            new = vae_key(key, layout["levels"])
            if new and new.split(".")[-2] in ("q", "k", "v", "proj_out") and ".attn_1." in new and value.ndim == 2:
                value = value[:, :, None, None]  # Linear (C, C) -> 1x1 conv (C, C, 1, 1): the same map per pixel
        if new is None:
            raise ValueError(f"{where}: tensor {key!r} has no counterpart in featinv's {COMPONENTS[component]} "
                             "(an architecture featinv does not implement)")
        out[PREFIX[component] + new] = value
    return out


def component_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of one component folder: ``<name>.safetensors``, its sharded index, or a ``.bin`` pickle
    (read weights-only); a single ``<name>.<variant>.safetensors`` (e.g. fp16) if nothing else is there."""
    name = WEIGHTS[folder.name]
    single, index, pickle_file = (folder / f"{name}.safetensors", folder / f"{name}.safetensors.index.json",
                                  folder / f"{name}.bin")
    if single.is_file():
        return read_safetensors(single)[0]
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        sd = {}
        for shard in shards:
            sd.update(read_safetensors(folder / shard)[0])
        return sd
    if pickle_file.is_file():  # weights only: a file that needs code execution is refused
        try:
            return torch.load(pickle_file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(pickle_file))
        except (pickle.UnpicklingError, RuntimeError) as e:
            raise ValueError(f"{pickle_file}: not a weights-only PyTorch file ({str(e).splitlines()[0]})") from None
    variants = sorted(folder.glob(f"{name}.*.safetensors"))
    if len(variants) == 1:
        return read_safetensors(variants[0])[0]
    raise FileNotFoundError(f"{folder}: no weights ({name}.safetensors, its .index.json or {name}.bin"
                            + (f"; several variants: {[v.name for v in variants]}" if variants else "") + ")")


def read_pipeline(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """A diffusers SD pipeline folder -> (state dict with reference keys, ModelConfig from its configs).

    The adapter part of the config is the default (a pipeline has no FeatInv branch); latent_size is
    the UNet's ``sample_size``."""
    path = Path(path)
    index = read_json(path / "model_index.json")
    for comp, cls in COMPONENTS.items():
        entry = index.get(comp)
        if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            raise FileNotFoundError(f"{path}: model_index.json lists no {comp} (a Stable Diffusion pipeline "
                                    f"needs {', '.join(COMPONENTS)})")
        if entry[1] != cls:
            raise ValueError(f"{path / 'model_index.json'}: {comp} is a {entry[1]}; featinv reads a {cls}")
        if not (path / comp / "config.json").is_file():
            raise FileNotFoundError(f"{path}: component folder {comp}/ with config.json not found")
    where = {c: path / c / "config.json" for c in COMPONENTS}
    raw = {c: read_json(where[c]) for c in COMPONENTS}
    unet, up_attention = unet_config(raw["unet"], where["unet"])
    vae = vae_config(raw["vae"], where["vae"])
    text_raw = {k: v for k, v in raw["text_encoder"].items() if not k.startswith("_") and k not in TEXT_GENERIC}
    if raw["text_encoder"].get("architectures", ["CLIPTextModel"]) != ["CLIPTextModel"]:
        raise ValueError(f"{where['text_encoder']}: architectures {raw['text_encoder']['architectures']} not "
                         "supported (featinv reads a CLIPTextModel)")
    text = clip_text_config(text_raw, str(where["text_encoder"]))
    sched_file = path / "scheduler" / "scheduler_config.json"
    diffusion = scheduler_config(read_json(sched_file), sched_file) if sched_file.is_file() else DiffusionConfig()
    size = raw["unet"].get("sample_size", 32)
    size = size if isinstance(size, int) else 32
    cfg = ModelConfig(unet=unet, adapter=AdapterConfig(grid=size), vae=vae, text=text, diffusion=diffusion,
                      latent_size=size)
    layout = {"unet": {"n": unet.num_res_blocks, "up_attention": up_attention},
              "vae": {"levels": len(vae.ch_mult)}, "text_encoder": {}}
    sd = {}
    for comp in COMPONENTS:
        sd.update(translate(comp, component_weights(path / comp), path / comp, **layout[comp]))
    return sd, cfg
