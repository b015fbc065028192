"""Reference-style YAML (``target:``/``params:`` blocks, e.g. ``models/cldm_featinv_convnext.yaml``) -> ModelConfig.

It parses the blocks it knows and rejects the rest; no ``target`` string is ever imported.
"""
from __future__ import annotations

from featinv.config import AdapterConfig, DiffusionConfig, ModelConfig, TextConfig, UNetConfig, VAEConfig

_UNET_KEYS = {"in_channels", "out_channels", "model_channels", "attention_resolutions", "num_res_blocks",
              "channel_mult", "num_heads", "context_dim", "use_checkpoint", "hint_channels"}
_UNET_IGNORED = {"image_size", "use_spatial_transformer", "transformer_depth", "legacy"}  # fixed in SD-1.x
_TOP_IGNORED = {"num_timesteps_cond", "log_every_t", "first_stage_key", "cond_stage_key", "control_key",
                "image_size", "channels", "cond_stage_trainable", "conditioning_key", "monitor", "use_ema",
                "only_mid_control", "scale_factor", "linear_start", "linear_end", "timesteps",
                "control_stage_config", "unet_config", "first_stage_config", "cond_stage_config", "sd_locked",
                "learning_rate"}


def _params(block: dict, where: str, allowed: set[str]) -> dict:
    if not isinstance(block, dict) or "target" not in block:
        raise ValueError(f"{where}: expected a mapping with 'target' and 'params'")
    params = dict(block.get("params") or {})
    unknown = set(params) - allowed
    if unknown:
        raise ValueError(f"{where}.params: unknown key(s) {sorted(unknown)}")
    return params


# HF CLIPTextConfig keys: those read into TextConfig, and those that do not change the frozen encoder's
# last hidden state (dropouts are off in eval; the projection, pooling token ids and init are unused).
_CLIP_KEYS = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "max_position_embeddings", "layer_norm_eps", "hidden_act"}
_CLIP_IGNORED = {"dropout", "attention_dropout", "initializer_range", "initializer_factor", "projection_dim",
                 "pad_token_id", "bos_token_id", "eos_token_id", "model_type", "architectures", "torch_dtype",
                 "transformers_version"}


def clip_text_config(clip: dict, where: str) -> TextConfig:
    """clip_text_config -> TextConfig; unknown keys and activations other than CLIP's quick_gelu fail.

    Exact GELU is refused rather than supported: every SD-1.x / miniSD text encoder (CLIP ViT-L/14)
    uses quick_gelu, and a TextConfig field for it would be permanent in checkpoint metadata."""
    unknown = set(clip) - _CLIP_KEYS - _CLIP_IGNORED
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}")
    act = clip.get("hidden_act", "quick_gelu")
    if act != "quick_gelu":
        raise ValueError(f"{where}: hidden_act {act!r} is not supported; the text encoder is CLIP's, with "
                         "hidden_act quick_gelu (x * sigmoid(1.702 x))")
    return TextConfig(vocab_size=clip.get("vocab_size", 49408), width=clip["hidden_size"],
                      layers=clip["num_hidden_layers"], heads=clip["num_attention_heads"],
                      mlp_width=clip["intermediate_size"], context_length=clip.get("max_position_embeddings", 77),
                      layer_norm_eps=clip.get("layer_norm_eps", 1e-5))


def _unet_fields(p: dict, where: str) -> dict:
    if p.get("transformer_depth", 1) != 1 or p.get("use_spatial_transformer", True) is not True:
        raise ValueError(f"{where}: only transformer_depth 1 with spatial transformers (SD-1.x) is supported")
    return dict(in_channels=p.get("in_channels", 4), out_channels=p.get("out_channels", 4),
                model_channels=p["model_channels"], channel_mult=tuple(p["channel_mult"]),
                num_res_blocks=p["num_res_blocks"], attention_resolutions=tuple(p["attention_resolutions"]),
                num_heads=p["num_heads"], context_dim=p["context_dim"],
                gradient_checkpointing=bool(p.get("use_checkpoint", False)))


def config_from_reference_yaml(data: dict, source: str = "yaml") -> ModelConfig:
    """Translate a reference ``cldm`` YAML (as a dict) into a ModelConfig; unknown keys fail.

    The reference hard-codes the adapter (width 512, 32x32 grid); its ``image_size`` keys are unused."""
    top = _params(data["model"], f"{source}: model", _TOP_IGNORED)
    unet_p = _params(top["unet_config"], f"{source}: unet_config", _UNET_KEYS | _UNET_IGNORED | {"out_channels"})
    ctrl_p = _params(top["control_stage_config"], f"{source}: control_stage_config", _UNET_KEYS | _UNET_IGNORED)
    unet = UNetConfig(**_unet_fields(unet_p, f"{source}: unet_config"))
    ctrl = _unet_fields({**ctrl_p, "out_channels": unet.out_channels}, f"{source}: control_stage_config")
    if ctrl != {k: v for k, v in vars(unet).items()}:
        raise ValueError(f"{source}: control_stage_config must mirror unet_config (got {ctrl} vs {vars(unet)})")
    vae_p = _params(top["first_stage_config"], f"{source}: first_stage_config",
                    {"embed_dim", "monitor", "ddconfig", "lossconfig", "ckpt_path"})
    dd = vae_p["ddconfig"]
    unknown = set(dd) - {"double_z", "z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult",
                         "num_res_blocks", "attn_resolutions", "dropout"}
    if unknown or dd.get("attn_resolutions"):
        raise ValueError(f"{source}: first_stage_config.params.ddconfig: unsupported key(s) "
                         f"{sorted(unknown) or 'attn_resolutions (must be empty)'}")
    vae = VAEConfig(in_channels=dd.get("in_channels", 3), out_channels=dd.get("out_ch", 3), ch=dd["ch"],
                    ch_mult=tuple(dd["ch_mult"]), num_res_blocks=dd["num_res_blocks"],
                    z_channels=dd["z_channels"], embed_dim=vae_p["embed_dim"],
                    scale_factor=top.get("scale_factor", 0.18215))
    cond = top["cond_stage_config"]
    clip = ((cond or {}).get("params") or {}).get("clip_text_config")
    text = clip_text_config(clip, f"{source}: cond_stage_config.params.clip_text_config") if clip else TextConfig()
    diffusion = DiffusionConfig(timesteps=top.get("timesteps", 1000), linear_start=top.get("linear_start", 0.00085),
                                linear_end=top.get("linear_end", 0.012))
    return ModelConfig(unet=unet, adapter=AdapterConfig(in_channels=ctrl_p["hint_channels"]), vae=vae, text=text,
                       diffusion=diffusion, latent_size=32)
