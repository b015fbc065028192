"""Frozen classifier whose spatial feature maps FeatInv inverts (paper: "Backbones").

A :class:`FeatureExtractor` takes images in [0, 1], applies the classifier's own mean/std and
returns an NCHW feature map. timm models use ``forward_intermediates``, which works the same way
for ResNet, ConvNeXt, Swin(V2) and ViT (ViT prefix tokens are dropped); any other network can be
wrapped by passing a ``feature_fn``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from featinv.config import BACKBONE_PRESETS, BackboneConfig

FeatureFn = Callable[[nn.Module, Tensor], Tensor]
HeadFn = Callable[[nn.Module, Tensor], Tensor]  # (model, feats (B, C, h, w)) -> logits (B, num_classes)


def check_index(index: int, count: int, what: str, of: str) -> int:
    """``index`` if 0 <= index < count, else ValueError '<what> <index> out of range: <of> has <count> ...'."""
    if not 0 <= index < count:
        raise ValueError(f"{what} {index} out of range: {of} {count} (0..{count - 1})")
    return index


class FeatureExtractor(nn.Module):
    """Frozen classifier: images (B, 3, S, S) in [0, 1] -> feature map (B, C, h, w)."""

    def __init__(self, model: nn.Module, feature_fn: FeatureFn | None, mean: Sequence[float],
                 std: Sequence[float], image_size: int, layer: int = -1, head_fn: HeadFn | None = None):
        super().__init__()
        if feature_fn is None and not hasattr(model, "forward_intermediates"):
            raise ValueError(f"{type(model).__name__} has no forward_intermediates(); "
                             "pass feature_fn=lambda model, x: <(B, C, h, w) feature map>")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean/std need 3 channel values, got mean={tuple(mean)} std={tuple(std)}")
        self.model = model
        self.feature_fn = feature_fn
        self.layer = layer              # forward_intermediates index, used when feature_fn is None
        self.head_fn = head_fn          # feature map -> logits (the analyses); timm: forward_head
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self._feature_shape: tuple[int, int, int] | None = None
        self.model.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Switch the wrapper's mode; the classifier itself always stays in eval mode."""
        super().train(mode)
        self.model.eval()  # frozen: no dropout, BatchNorm uses its running statistics
        return self

    def normalize(self, images: Tensor) -> Tensor:
        """images: (B, 3, S, S) in [0, 1] -> classifier input (B, 3, S, S), mean/std normalised."""
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (self.image_size,) * 2:
            raise ValueError(f"backbone expects images (B, 3, {self.image_size}, {self.image_size}) "
                             f"in [0, 1], got {tuple(images.shape)}; resize them first "
                             "(e.g. F.interpolate(x, size, mode='bilinear', antialias=True))")
        return (images - self.mean) / self.std

    def forward(self, images: Tensor) -> Tensor:
        """images: (B, 3, S, S) in [0, 1] -> feats: (B, C, h, w)."""
        x = self.normalize(images)
        if self.feature_fn is not None:
            feats = self.feature_fn(self.model, x)
        else:
            # norm=True: the final stage then equals forward_features (ConvNeXt norm_pre, Swin's final
            # LayerNorm, ViT's final norm), i.e. "the final stage before pooling" of the paper.
            feats = self.model.forward_intermediates(
                x, indices=[self.layer], norm=True, stop_early=True,
                intermediates_only=True, output_fmt="NCHW")[0]
        if feats.ndim == 3:
            raise ValueError(f"feature map has shape {tuple(feats.shape)} = (B, N, C) tokens; an NCHW "
                             "(B, C, h, w) map is required: drop prefix tokens and reshape the patch "
                             "tokens to their grid in feature_fn")
        if feats.ndim != 4:
            raise ValueError(f"feature map must be NCHW (B, C, h, w), got shape {tuple(feats.shape)}")
        return feats

    def classify(self, images: Tensor) -> Tensor:
        """images: (B, 3, S, S) in [0, 1] -> logits (B, num_classes) of the full classifier."""
        return self.model(self.normalize(images))

    def logits_from_features(self, feats: Tensor) -> Tensor:
        """feats: (B, C, h, w), possibly edited -> logits (B, num_classes) of the classifier's head.

        ``head_fn`` if given; timm models: ``forward_head`` (only when the map is the final stage)."""
        if self.head_fn is not None:
            return self.head_fn(self.model, feats)
        if self.feature_fn is not None or not hasattr(self.model, "forward_head"):
            raise ValueError(f"{type(self.model).__name__}: no classifier head for feature maps; pass "
                             "head_fn=lambda model, feats: <(B, num_classes) logits> to FeatureExtractor")
        num_stages = len(getattr(self.model, "feature_info", []) or [])
        if num_stages and self.layer not in (-1, num_stages - 1):
            raise ValueError(f"backbone.layer={self.layer} is not the final stage ({num_stages - 1} or -1): "
                             "the classifier head only applies to the final stage's feature map")
        x = feats
        if getattr(self.model, "output_fmt", "NCHW") == "NHWC":  # Swin(V2): forward_head pools NHWC maps
            x = x.permute(0, 2, 3, 1)
        elif hasattr(self.model, "num_prefix_tokens"):  # ViT: forward_head takes (B, N, C) tokens
            if getattr(self.model, "global_pool", "token") not in ("avg", "avgmax", "max"):
                raise ValueError(f"{type(self.model).__name__} pools its class token, which the patch-token "
                                 "feature map does not hold; pass head_fn to FeatureExtractor")
            tokens = x.flatten(2).transpose(1, 2)
            prefix = tokens.new_zeros(tokens.shape[0], self.model.num_prefix_tokens, tokens.shape[2])
            x = torch.cat([prefix, tokens], dim=1)  # the head skips the prefix tokens when pooling
        return self.model.forward_head(x)

    def head_weight(self) -> Tensor:
        """(num_classes, C): the head's weight over pooled channels (class directions in feature space).

        timm: the final Linear's weight (a head norm such as ConvNeXt's LayerNorm is not folded in);
        otherwise the Jacobian of the logits w.r.t. a spatially constant map at zero, which is exactly
        the weight for global-average-pooling + Linear heads (the demo's DigitsCNN)."""
        c, h, w = self.feature_shape
        fc = self.model.get_classifier() if self.head_fn is None and hasattr(self.model, "get_classifier") else None
        if isinstance(fc, nn.Linear) and fc.in_features == c:
            return fc.weight.detach().clone()
        ref = self.mean
        with torch.enable_grad():
            v = torch.zeros(c, device=ref.device, dtype=ref.dtype, requires_grad=True)
            fn = lambda u: self.logits_from_features(u.view(1, c, 1, 1).expand(1, c, h, w))[0]  # noqa: E731
            return torch.autograd.functional.jacobian(fn, v).detach()

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the feature map, probed once with a zero image (works on the meta device)."""
        if self._feature_shape is None:
            probe = torch.zeros(1, 3, self.image_size, self.image_size,
                                device=self.mean.device, dtype=self.mean.dtype)
            with torch.no_grad():
                self._feature_shape = tuple(self(probe).shape[1:])
        return self._feature_shape


def _resolve_timm_name(name: str):
    """The timm pretrained config for ``name`` ('arch' or 'arch.tag'); ValueError if unknown."""
    import timm

    if not timm.is_model(name):
        raise ValueError(f"backbone.name: unknown timm model {name!r} "
                         "(see timm.list_models(pretrained=True))")
    try:
        return timm.get_pretrained_cfg(name)
    except RuntimeError as e:  # "Invalid pretrained tag (...)"
        raise ValueError(f"backbone.name {name!r}: {e}") from None


def _hub_files(pcfg) -> tuple[str, str | None, list[str]] | None:
    """(repo, revision, weight files in timm's order) if timm would download ``pcfg`` from the hub."""
    if pcfg is None or not pcfg.hf_hub_id or pcfg.source not in (None, "", "timm", "hf-hub") or pcfg.file:
        return None
    repo, _, revision = pcfg.hf_hub_id.partition("@")
    name = pcfg.hf_hub_filename or "pytorch_model.bin"
    if name.endswith(".safetensors"):
        return repo, revision or None, [name]
    safe = "model.safetensors" if name == "pytorch_model.bin" else name.removesuffix(".bin") + ".safetensors"
    return repo, revision or None, [safe, name]  # timm tries the safetensors alternative first


class WeightsUnavailable(ValueError):
    """A backbone's pretrained weights are neither cached nor downloadable: a user error (one line in the
    command faces)."""


def _first_line(e: Exception) -> str:
    """``Type: first line of the message``."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _weights_unavailable(cfg: BackboneConfig, pcfg, reason: str) -> WeightsUnavailable:
    """The one-line error: which backbone and weights, why they cannot be had, and what to do instead."""
    from huggingface_hub import constants

    weights = f"{pcfg.architecture}.{pcfg.tag}" if pcfg is not None else cfg.name
    hub = f", Hugging Face hub id {pcfg.hf_hub_id!r}" if pcfg is not None and pcfg.hf_hub_id else ""
    return WeightsUnavailable(
        f"backbone {cfg.name!r}: its pretrained weights ({weights}{hub}) are not in the local cache "
        f"({constants.HF_HUB_CACHE}) and cannot be downloaded ({reason}); give a local weights file with "
        "--backbone-checkpoint FILE (in a config: backbone.checkpoint=FILE), or run once with network access to "
        "cache them (HF_HOME sets the cache; HF_HUB_OFFLINE=1 then reads it without network)")


def _download_errors() -> tuple[type[Exception], ...]:
    """What timm's weight download raises when the file can be neither fetched nor found in the cache:
    huggingface_hub's LocalEntryNotFoundError (offline or unreachable: a FileNotFoundError) and HTTP errors
    (no such file, gated), urllib's URLError for weights at a plain URL (torch.hub)."""
    from urllib.error import URLError

    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    return LocalEntryNotFoundError, HfHubHTTPError, URLError


def _cached_weights_if_offline(cfg: BackboneConfig, pcfg) -> str | None:
    """Without a reachable hub: the cached weight file, else :class:`WeightsUnavailable` at once (not after
    a minute of download retries). None when the hub is reachable (or HF_HUB_OFFLINE is set)."""
    from huggingface_hub import constants, get_session, try_to_load_from_cache

    hub = _hub_files(pcfg)
    if hub is None or constants.HF_HUB_OFFLINE:  # offline mode: the hub library reads its cache at once
        return None
    repo, revision, files = hub
    try:
        get_session().head(constants.ENDPOINT, timeout=5)
        return None
    except Exception as e:  # any transport error: DNS, refused, timeout, proxy
        unreachable = _first_line(e)
    for name in files:
        cached = try_to_load_from_cache(repo, name, revision=revision)
        if isinstance(cached, str):
            return cached
    raise _weights_unavailable(cfg, pcfg, f"the hub {constants.ENDPOINT} is unreachable: {unreachable}")


def build_backbone(cfg: BackboneConfig) -> FeatureExtractor:
    """A frozen timm classifier from ``cfg``; never falls back to random weights silently.

    Pretrained weights that are neither cached nor downloadable (offline) are a :class:`WeightsUnavailable`
    (a ValueError) naming the backbone and the way out. Weights not loaded (all, with ``pretrained=false``)
    are initialised from ``cfg.seed``: the same in every process, and the global RNG state is not touched."""
    import timm

    pcfg = _resolve_timm_name(cfg.name)
    kwargs = {}
    if pcfg is not None and pcfg.fixed_input_size:
        kwargs["img_size"] = cfg.image_size  # ViT / Swin: position embeddings and windows depend on it
    if cfg.checkpoint:
        if not Path(cfg.checkpoint).is_file():
            raise FileNotFoundError(f"backbone.checkpoint: weights file {cfg.checkpoint!r} not found")
        kwargs["pretrained_cfg_overlay"] = dict(file=str(cfg.checkpoint))
    load = cfg.pretrained or bool(cfg.checkpoint)
    if load and not cfg.checkpoint:
        cached = _cached_weights_if_offline(cfg, pcfg)
        if cached:  # hub unreachable: load the cached file directly, as timm would after its retries
            kwargs["pretrained_cfg_overlay"] = dict(file=cached)
    try:
        # Random initialisation from backbone.seed, so every process (train, reconstruct, evaluate)
        # builds the same network; forked, so the caller's global RNG state is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = timm.create_model(cfg.name, pretrained=load, **kwargs)
    except Exception as e:
        if cfg.checkpoint:
            raise ValueError(f"could not load backbone.checkpoint {cfg.checkpoint!r} into timm model "
                             f"{cfg.name!r}: {_first_line(e)}") from e
        if not load or not isinstance(e, _download_errors()):
            raise  # not a download failure: a bug, with its traceback
        from huggingface_hub import constants

        reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _first_line(e)
        raise _weights_unavailable(cfg, pcfg, reason) from e

    num_stages = len(getattr(model, "feature_info", []) or [])
    if num_stages and not -num_stages <= cfg.layer < num_stages:
        raise ValueError(f"backbone.layer={cfg.layer} out of range for {cfg.name!r} "
                         f"({num_stages} feature stages: -{num_stages}..{num_stages - 1})")
    data_cfg = model.pretrained_cfg or {}
    mean = data_cfg.get("mean") or timm.data.IMAGENET_DEFAULT_MEAN
    std = data_cfg.get("std") or timm.data.IMAGENET_DEFAULT_STD
    return FeatureExtractor(model, None, mean, std, cfg.image_size, layer=cfg.layer)


def resolve_backbone(name: str | None, checkpoint: str | None, size: int | None,
                     base: BackboneConfig) -> BackboneConfig:
    """A backbone named as users name it (a key of :data:`featinv.config.BACKBONE_PRESETS` or a timm model
    name, pretrained), with an optional local weights file and input size, onto ``base`` (what a run or
    config already says)."""
    cfg = base
    if name:
        preset = BACKBONE_PRESETS.get(name)
        cfg = preset if preset is not None else dataclasses.replace(base, name=name, pretrained=True)
    if checkpoint:
        cfg = dataclasses.replace(cfg, checkpoint=checkpoint)
    if size:
        cfg = dataclasses.replace(cfg, image_size=size)
    return cfg
