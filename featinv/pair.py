"""One pair, one loader: a FeatInv model, the classifier whose feature map it inverts, how to sample.

Every face gets its model here: the reconstruct job, the analyses, the app and the benchmarks call
:func:`load_pair` with a :class:`~featinv.config.PairSource` (the demo pair, a weights file, or a folder
holding ``featinv.safetensors``, or an exported folder's Hub id; a control branch shipped alone with its
``minisd``). :func:`check_channels` is the one check that a backbone fits a model.
Errors name the setting at fault (``checkpoint``, ``run_dir``, ``backbone``); faces show their flags.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from featinv.checkpoint.config_file import load_config
from featinv.config import (
    BACKBONE_PRESETS,
    RUN_CONFIG,
    BackboneConfig,
    ModelConfig,
    PairSource,
    SampleConfig,
    SettingError,
    SettingNotFound,
)
from featinv.diffusion.reconstruct import Reconstructor
from featinv.nets.backbone import FeatureExtractor, build_backbone, resolve_backbone
from featinv.nets.model import FeatInv
from featinv.registry import DEMO_PAIR
from featinv.runtime import stderr_line


@dataclass
class Pair:
    """A FeatInv model and the classifier it inverts, with the settings it samples with by default."""

    model: FeatInv                   # eval mode
    extractor: FeatureExtractor      # eval mode, on the model's device
    sample_config: SampleConfig
    name: str                        # shown in reports and the app's header
    data: dict | None = None         # the demo's digits splits (featinv.demo.digits.load_digits_split), else None
    folder: Path | None = None       # where the pair's files live (the demo's cache folder, a run folder)
    labels: list[str] | None = None  # class names, when the source knows them

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @functools.cached_property
    def class_names(self) -> list[str]:
        return self.labels if self.labels is not None else imagenet_class_names(self.extractor)

    def reconstructor(self, cfg: SampleConfig | None = None, **kwargs) -> Reconstructor:
        """A Reconstructor over this pair (bf16 on CUDA); ``cfg`` defaults to the pair's sample_config."""
        return Reconstructor(self.model, self.extractor, cfg or self.sample_config,
                             bf16=self.device.type == "cuda", **kwargs)


@dataclass(frozen=True)
class ResolvedSource:
    """A checkpoint source resolved without reading weights: the file, and where its settings come from."""

    weights: Path
    model_config: ModelConfig | None  # None: the checkpoint's own metadata
    backbone: BackboneConfig | None   # None: not needed (the caller brings its extractor)
    description: str
    minisd: str | None = None         # the miniSD a control-branch-only ``weights`` file is paired with


def weights_file(checkpoint: str | Path) -> Path:
    """A weights file, a folder holding ``featinv.safetensors`` (a run, an export) or the Hub id of an
    exported folder -> the weights file (see :func:`featinv.checkpoint.load.resolve_featinv_source`)."""
    from featinv.checkpoint.load import resolve_featinv_source

    path = Path(checkpoint)
    if not path.exists() and path.suffix:  # a file name: say it is missing (not "no such Hub id")
        raise SettingNotFound(f"{{checkpoint}}: {str(path)!r} not found")
    try:
        return resolve_featinv_source(checkpoint)[0]
    except FileNotFoundError as e:
        raise SettingNotFound(f"{{checkpoint}}: {e}") from None


def resolve_source(source: PairSource, need_backbone: bool = True) -> ResolvedSource:
    """Where a checkpoint source's weights, model config and backbone come from (nothing is loaded).

    ``config`` gives model and backbone; else the model comes from the checkpoint's metadata and the
    backbone from the training run's config.yaml (``run_dir``, else beside the weights); ``backbone``
    (and ``backbone_checkpoint``, ``backbone_size``) override it. With no backbone known the error names
    the settings that would give one: never a silent fall-back to another backbone."""
    if source.checkpoint is None:
        raise SettingError("{checkpoint}: none given (a PairSource without one is the demo pair)")
    path = weights_file(source.checkpoint)
    minisd = source.minisd
    if minisd is not None and not Path(minisd).exists() and Path(minisd).suffix:  # a file name, not a Hub id
        raise SettingNotFound(f"{{minisd}}: {str(minisd)!r} not found")
    if source.config:
        full = load_config(source.config)
        model_cfg, base, desc = full.model, full.backbone, source.config
    else:
        run_file = Path(source.run_dir or path.parent) / RUN_CONFIG
        model_cfg, desc = None, "model: the checkpoint's metadata"
        if run_file.is_file():
            base, desc = load_config(str(run_file)).backbone, f"{desc}; backbone: {run_file}"
        elif source.run_dir:
            raise SettingNotFound(f"{{run_dir}}: {run_file} not found (a training run folder holds config.yaml)")
        elif need_backbone and not source.backbone:
            raise SettingError(f"no backbone known for {path} (no config.yaml beside it): pass {{backbone}} "
                               f"(a preset: {', '.join(BACKBONE_PRESETS)}, or a timm name), or {{run_dir}} / {{config}}")
        else:
            base = BackboneConfig()
    if not need_backbone:
        return ResolvedSource(path, model_cfg, None, desc, minisd)
    backbone = resolve_backbone(source.backbone, source.backbone_checkpoint, source.backbone_size, base)
    return ResolvedSource(path, model_cfg, backbone, desc, minisd)


def check_channels(extractor: FeatureExtractor, model: FeatInv, where: str = "the model") -> None:
    """ValueError unless the backbone's feature map has the channels the model's adapter takes."""
    channels, expected = extractor.feature_shape[0], model.cfg.adapter.in_channels
    if channels != expected:
        raise ValueError(f"backbone feature map has {channels} channels but {where}'s adapter expects "
                         f"adapter.in_channels = {expected}")


def load_pair(source: PairSource = PairSource(), device: str | torch.device = "cpu", *,
              extractor: FeatureExtractor | None = None, log: Callable[[str], None] = stderr_line) -> Pair:
    """The pair ``source`` names, in eval mode on ``device``.

    ``extractor``: your own feature extractor instead of the source's backbone (a checkpoint source only).
    ``log``: progress lines (the demo pair trains its stages on first use; its progress goes to stderr)."""
    if source.checkpoint is None:
        return DEMO_PAIR.load()(source, device, log)
    return load_resolved(resolve_source(source, need_backbone=extractor is None), device, extractor=extractor)


def load_resolved(resolved: ResolvedSource, device: str | torch.device = "cpu", *,
                  extractor: FeatureExtractor | None = None) -> Pair:
    """The pair of a source :func:`resolve_source` already resolved (a job that resolved it to record its
    settings does not resolve it twice); ``extractor`` as in :func:`load_pair`."""
    from featinv.checkpoint.load import load_featinv

    model = load_featinv(resolved.weights, resolved.model_config, device=device, minisd=resolved.minisd).eval()
    extractor = extractor if extractor is not None else build_backbone(resolved.backbone)
    check_channels(extractor, model, resolved.weights.name)
    arch = getattr(extractor.model, "default_cfg", {}).get("architecture", "backbone")
    return Pair(model, extractor.to(device).eval(), SampleConfig(), f"{resolved.weights.name} + {arch}",
                folder=resolved.weights.parent)


def imagenet_class_names(extractor: FeatureExtractor) -> list[str]:
    """ImageNet-1k descriptions from timm's bundled table when the head has 1000 classes, else 'class i'."""
    with torch.no_grad():
        probe = torch.zeros(1, 3, extractor.image_size, extractor.image_size, device=extractor.mean.device)
        classes = extractor.classify(probe).shape[-1]
    try:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        if info.num_classes() == classes:
            return [info.index_to_description(i) for i in range(classes)]
    except Exception:  # the table is optional display sugar
        pass
    return [f"class {i}" for i in range(classes)]
