"""Typed configuration: one frozen dataclass per component, the shared names, strict merging.

Field names are permanent once written into a checkpoint's metadata, so they follow the
LDM names where those exist (``model_channels``, ``attention_resolutions``, ...).

The named presets are written in code at the end (runs: :data:`PRESETS`; classifiers: :data:`BACKBONE_PRESETS`).
This module imports only :mod:`featinv.registry` (torch-free, like this one), so every module may import it and
``--help`` texts list presets without loading a network. Merging mappings onto a config (strictly: an unknown key
is an error naming it) and reading YAML files, reference-style ones included, is :mod:`featinv.checkpoint.config_file`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from featinv.registry import SAMPLERS, STOCHASTIC_SAMPLERS


def _check_range(cfg: Any, **bounds: tuple[float | None, float | None]) -> None:
    """ValueError naming the first field of ``cfg`` outside its [low, high] (None: unbounded)."""
    for name, (low, high) in bounds.items():
        value = getattr(cfg, name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{type(cfg).__name__}.{name} must be a finite number, got {value!r}")
        if (low is not None and value < low) or (high is not None and value > high):
            want = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise ValueError(f"{type(cfg).__name__}.{name} must be {want}, got {value!r}")


class SettingError(ValueError):
    """A bad or missing setting. The message names settings as ``{name}`` (a config field, e.g.
    ``{run_dir}``): printed, it shows the field name (``run_dir``); a command face shows its flag
    (``--run-dir``) through :meth:`render`. Library errors so speak of settings, faces of flags."""

    def __init__(self, template: str):
        self.template = template
        super().__init__(self.render(lambda name: name))

    def render(self, name: Callable[[str], str]) -> str:
        return re.sub(r"\{([a-z_]+)\}", lambda m: name(m.group(1)), self.template)


class SettingNotFound(SettingError, FileNotFoundError):
    """A setting names a file or folder that does not exist."""


@dataclass(frozen=True)
class UNetConfig:
    """The SD-1.x UNet (and, by construction, its ControlNet copy)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling factors with attention
    num_heads: int = 8                                   # dim_head = channels // num_heads
    context_dim: int = 768
    gradient_checkpointing: bool = False                 # non-reentrant, per block


@dataclass(frozen=True)
class AdapterConfig:
    """Feature-map adapter: bilinear upsample to the latent grid -> conv stack -> zero conv."""

    in_channels: int = 1024  # channels of the classifier's feature map
    width: int = 512         # intermediate width (reference: 512)
    grid: int = 32           # target spatial size = latent size (reference: 32)
    pooled: bool = False     # the paper's ablation: the map's spatial mean copied to every position (absent = False)


@dataclass(frozen=True)
class VAEConfig:
    """The KL autoencoder (AutoencoderKL, no attention in the down/up levels)."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    scale_factor: float = 0.18215


@dataclass(frozen=True)
class TextConfig:
    """CLIP text transformer (ViT-L/14 by default), HF CLIPTextModel layout."""

    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    context_length: int = 77
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True)
class DiffusionConfig:
    """Scaled-linear β schedule: β_t = linspace(√start, √end, T)²."""

    timesteps: int = 1000
    linear_start: float = 0.00085
    linear_end: float = 0.012


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a FeatInv model (and nothing about training)."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    latent_size: int = 32  # latent grid (image size = latent_size * 2**(len(vae.ch_mult)-1))

    def __post_init__(self):
        # The latent grid is also adapter.grid (the hint is added to latent-grid activations); both
        # fields are kept because checkpoint metadata names both, and checked together here.
        if self.adapter.grid != self.latent_size:
            raise ValueError(f"ModelConfig: adapter.grid ({self.adapter.grid}) must equal latent_size "
                             f"({self.latent_size}); set both to the latent grid size")

    @property
    def image_size(self) -> int:
        return self.latent_size * 2 ** (len(self.vae.ch_mult) - 1)


@dataclass(frozen=True)
class BackboneConfig:
    """The frozen classifier whose feature maps are inverted."""

    name: str = "convnext_base.fb_in22k_ft_in1k"  # timm model name with its pretrained tag
    pretrained: bool = True
    checkpoint: str = ""      # optional local weights file (offline use)
    layer: int = -1           # index into forward_intermediates (-1: final stage, pre-pooling)
    image_size: int = 288
    seed: int = 0             # initialises the weights timm does not load (all of them if pretrained=false)


@dataclass(frozen=True)
class DataConfig:
    root: str = ""            # ImageNet-layout folder (<root>/<class>/<image>) or a plain image folder
    batch_size: int = 8
    num_workers: int = 4

    def __post_init__(self):
        _check_range(self, batch_size=(1, None), num_workers=(0, None))


PROMPT = "a high-quality, detailed, and professional image"  # the reference's training prompt
INFERENCE_PROMPT = PROMPT + ", "  # the reference samples with the training prompt followed by ", "
UNCOND_MODES = ("prompt", "features")
# The names of what jobs write and read, one place each.
WEIGHTS_FILE = "featinv.safetensors"  # a run's trained weights (also an exported folder's and the demo's)
RUN_CONFIG = "config.yaml"            # a run's config as trained (also in an exported folder)
MANIFEST = "manifest.json"            # a reconstruction folder's record of its job
EVAL_DIR = "eval"                     # featinv evaluate's outputs inside a reconstruction folder
DEMO_OUT = "featinv_demo"             # the demo's default folder (its cache/ holds the demo pair)
LOCK_NAME = ".featinv.lock"           # a job's lock file inside its output folder (featinv.jobs.lock)
MAX_SAMPLES = 64                      # reconstructions per input a command takes (each one multiplies the work)
STEER_CLAMP = "channel"               # the default clamp of steering (featinv steer, the app): per channel
# Code edits' defaults (featinv steer --edit, featinv.registry.EDITS): kind -> (quantile of a concept's non-zero codes
# that sets its level, concepts an image set moves), chosen for the TopK SAE on the training digits by
# `benchmarks/bench_concepts.py --only-edits` (benchmarks/RESULTS.md, "Code edits a -> b").
EDIT_DEFAULTS = {"set": (0.99, 5), "swap": (0.9, 3)}
# Image manipulations' default values (featinv maps, featinv.registry.MANIPULATIONS, whose help says what each value
# means): strong enough to move a feature map clearly, mild enough that the image keeps its object. hflip takes no
# value but 1; grayscale and invert are at full strength (1). blur's 1.0 is perturb's middle severity.
MANIPULATION_DEFAULTS = {"hflip": 1.0, "rotate": 30.0, "translate": 0.25, "crop": 0.6, "blur": 1.0,
                         "grayscale": 1.0, "jitter": 0.4, "invert": 1.0, "occlude": 0.4}
SAMPLER_NAMES = tuple(SAMPLERS)       # featinv.registry.SAMPLERS (its STOCHASTIC_SAMPLERS take eta != 0)
SPACINGS = ("reference", "trailing")  # featinv.diffusion.samplers.ddim_timesteps spacings


def check_eta(sampler: str, eta: float, name: str = "eta") -> None:
    """The eta rule, for SampleConfig and the deterministic samplers alike: only the registry's
    STOCHASTIC_SAMPLERS take eta != 0."""
    if eta != 0 and sampler not in STOCHASTIC_SAMPLERS:
        raise ValueError(f"{name}={eta} needs a stochastic sampler ({', '.join(STOCHASTIC_SAMPLERS)}); "
                         f"{sampler!r} is deterministic")


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 1e-5
    max_steps: int = 480_000
    prompt: str = PROMPT
    drop_prob: float = 0.15          # joint dropout of feature map and prompt
    unlock_decoder: bool = False     # reference sd_locked=False: also train UNet output blocks
    precision: str = "auto"          # auto: bf16-mixed on GPU, 32 on CPU
    log_images_every: int = 2000
    log_images_count: int = 4
    log_images_steps: int = 20
    checkpoint_every: int = 5000
    seed: int = 0

    def __post_init__(self):
        _check_range(self, lr=(0, None), max_steps=(1, None), drop_prob=(0, 1), log_images_every=(0, None),
                     log_images_count=(1, None), log_images_steps=(1, None), checkpoint_every=(0, None))


@dataclass(frozen=True)
class SampleConfig:
    """Sampling settings; defaults are the reference's inference settings."""

    steps: int = 50
    eta: float = 0.0            # stochastic samplers only (featinv.registry.STOCHASTIC_SAMPLERS)
    sampler: str = "ddim"       # a name of featinv.registry.SAMPLERS; "ddim" is the reference's
    spacing: str = "reference"  # timesteps: "reference" (its list, S+1 steps if S does not divide 1000) or "trailing"
    guidance_scale: float = 1.75
    prompt: str = INFERENCE_PROMPT
    uncond: str = "prompt"      # "prompt": uncond branch keeps the features (reference); "features": drops both
    guess_mode: bool = False    # reference guess mode: ramp 0.825**(12-i), uncond without control (overrides uncond)
    num_samples: int = 1        # K reconstructions per image
    seed: int = 100

    def __post_init__(self):
        if self.sampler not in SAMPLER_NAMES:
            raise ValueError(f"SampleConfig.sampler must be one of {SAMPLER_NAMES}, got {self.sampler!r}")
        if self.spacing not in SPACINGS:
            raise ValueError(f"SampleConfig.spacing must be one of {SPACINGS}, got {self.spacing!r}")
        check_eta(self.sampler, self.eta, f"{type(self).__name__}.eta")
        if self.uncond not in UNCOND_MODES:
            raise ValueError(f"SampleConfig.uncond must be one of {UNCOND_MODES}, got {self.uncond!r}")
        for name in ("eta", "guidance_scale"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"SampleConfig.{name} must be a finite number, got {getattr(self, name)!r}")
        if self.steps < 1 or self.num_samples < 1:
            raise ValueError(f"SampleConfig: steps ({self.steps}) and num_samples ({self.num_samples}) must be >= 1")


@dataclass(frozen=True)
class PairSource:
    """Where a pair (a FeatInv model and the classifier it inverts) comes from; see featinv.pair.load_pair.

    With ``checkpoint`` None: the demo's digits pair, trained and cached under ``demo_out`` on first use.
    Else the model from ``checkpoint`` (a weights file or a folder holding featinv.safetensors) and its
    backbone from ``backbone`` over ``config`` over the run's config.yaml (``run_dir``, else beside the
    weights); with none of them the loader refuses rather than guess. ``minisd``: the miniSD checkpoint that
    a ``checkpoint`` holding a control branch alone (``control_model.*``, the adapter) is paired with."""

    checkpoint: str | None = None
    minisd: str | None = None              # miniSD (UNet, VAE, text encoder) for a control-branch-only checkpoint
    config: str | None = None              # preset name or YAML: model and backbone
    run_dir: str | None = None             # the training run whose config.yaml names the backbone
    backbone: str | None = None            # a backbone preset or timm name (pretrained)
    backbone_checkpoint: str | None = None  # local backbone weights (offline use)
    backbone_size: int | None = None       # backbone input size (default: the preset's)
    demo_out: str = DEMO_OUT               # the demo pair's folder (its cache/ holds the pair)
    demo_seed: int = 0
    demo_quick: bool = True                # the quick demo pair (what the analyses and the app use)


@dataclass(frozen=True)
class ReconstructJob:
    """One ``reconstruct`` job over an ImageNet-style folder; see featinv.jobs.reconstruct.reconstruct_folder."""

    source: PairSource
    data: str                              # <root>/<class>/<image>
    out: str                               # the job's folder
    per_class: int | None = 10             # the first N images of each class (None: all)
    sample: SampleConfig = field(default_factory=SampleConfig)
    batch_size: int = 8                    # images per batch per device (x K samples x 2 branches)
    num_workers: int = 0
    accelerator: str = "auto"              # Lightning's
    devices: int | str | tuple = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "auto"                # auto: bf16-mixed on GPUs, else 32-true
    overwrite: bool = False                # start the folder over (else a folder of another job is refused)

    def __post_init__(self):
        _check_range(self, batch_size=(1, None), num_workers=(0, None), num_nodes=(1, None))
        if self.per_class is not None:
            _check_range(self, per_class=(1, None))


@dataclass(frozen=True)
class FeatureGuidanceConfig:
    """Training-free feature guidance (``featinv.diffusion.guidance.feature_guided_eps_fn``): each guided step
    decodes the predicted clean image and steers the latent down the gradient of the classifier's
    feature distance to the target map. Off by default; it needs no trained control branch."""

    scale: float = 0.0   # guidance strength s >= 0 (0: off, the plain sampler bit for bit)
    t_min: int = 0       # steps whose timestep t lies in [t_min, t_max] are guided
    t_max: int = 999

    def __post_init__(self):
        if not 0 <= self.scale < float("inf"):  # also refuses NaN
            raise ValueError(f"FeatureGuidanceConfig.scale must be a finite number >= 0, got {self.scale!r}")
        _check_range(self, t_min=(0, None))
        if self.t_max < self.t_min:
            raise ValueError(f"FeatureGuidanceConfig.t_max ({self.t_max}) must be >= t_min ({self.t_min})")


@dataclass(frozen=True)
class FeatInvConfig:
    """A full run: model, backbone, data and training."""

    model: ModelConfig = field(default_factory=ModelConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# The tiny model of the reference fixtures (``shared/reference/tiny_config.yaml``): the tests' model, and
# the one the demo varies (featinv.demo.stages.model_config).
TINY_MODEL = ModelConfig(
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                    num_heads=2, context_dim=32),
    adapter=AdapterConfig(in_channels=16, width=512, grid=32),
    vae=VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1),
    text=TextConfig(width=32, layers=1, heads=2, mlp_width=64),
    latent_size=32,
)

PRESETS: dict[str, FeatInvConfig] = {
    # miniSD + ConvNeXt-base at 288 px (feature map 1024x9x9), the paper's main setting.
    "featinv_convnext": FeatInvConfig(),
    # The reference fixtures' tiny model: tests and CPU experiments.
    "tiny": FeatInvConfig(
        model=TINY_MODEL,
        backbone=BackboneConfig(name="resnet18", pretrained=False, image_size=64),
        data=DataConfig(batch_size=4, num_workers=0),
        train=TrainConfig(lr=1e-4, max_steps=100, log_images_every=0, checkpoint_every=50),
    ),
}

# The paper's backbones at their evaluation resolution: name -> (config, one line of help).
_BACKBONES: dict[str, tuple[BackboneConfig, str]] = {
    "convnext_base": (BackboneConfig(),  # the config's default
                      "ConvNeXt-B (ImageNet-22k, fine-tuned on 1k) at 288 px: 1024x9x9, the paper's main setting"),
    "resnet50": (BackboneConfig(name="resnet50.a1_in1k", image_size=224),
                 "ResNet-50 (ImageNet-1k) at 224 px: 2048x7x7"),
    "swinv2": (BackboneConfig(name="swinv2_base_window8_256.ms_in1k", image_size=256),
               "SwinV2-B (window 8, ImageNet-1k) at 256 px: 1024x8x8"),
    "vit": (BackboneConfig(name="vit_base_patch16_224.augreg2_in21k_ft_in1k", image_size=224),
            "ViT-B/16 (ImageNet-21k, fine-tuned on 1k) at 224 px: 768x14x14 (prefix tokens dropped)"),
}
BACKBONE_PRESETS: dict[str, BackboneConfig] = {name: cfg for name, (cfg, _) in _BACKBONES.items()}
BACKBONE_HELP: dict[str, str] = {name: text for name, (_, text) in _BACKBONES.items()}
