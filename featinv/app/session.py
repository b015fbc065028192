"""What the app serves: one model pair (FeatInv + its classifier), its default settings and examples.

A :class:`Session` is built once at start-up around a :class:`featinv.pair.Pair` (the demo's trained
pair, or a FeatInv checkpoint plus its backbone, both through :func:`featinv.pair.load_pair`); the
callbacks only read it. Uploaded files are checked here (:meth:`Session.load_image`) before any
pixel is decoded, so a text file or a decompression bomb becomes a one-line ``ValueError``.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from featinv.config import UNCOND_MODES, PairSource, SampleConfig
from featinv.data import crop_transform
from featinv.diffusion.reconstruct import Reconstructor
from featinv.pair import Pair, load_pair
from featinv.visualize import save_png

MAX_FILE_BYTES = 20 * 1024 * 1024    # uploads larger than this are refused unread
MAX_PIXELS = 40_000_000              # ... and images with more pixels than this (read from the header only)
# K per request. Lower than the commands' cap (featinv.config.MAX_SAMPLES): the page serves requests one at a
# time to everyone who opens it (a shared server), so one request must answer while the next one waits; a
# command's K is the choice of whoever runs it, on their own machine.
MAX_APP_SAMPLES = 8
MAX_STEPS = 200                      # sampler steps
MAX_GUIDANCE = 30.0
CLAMPS = {"none": None, "per channel": "channel", "per channel and location": "location"}  # Steer's clamp choices


def number(value, label: str, lo: float, hi: float, whole: bool = False) -> float:
    """A value from the page (slider, number box, or an API call) -> float in [lo, hi].

    ValueError naming the setting for no value, text, NaN/inf, a value out of range, or (``whole``)
    a fraction."""
    if value is None or value == "":
        raise ValueError(f"{label}: no value; give a number in [{lo}, {hi}]")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{label} = {value!r} is not a number") from None
    if not math.isfinite(x):
        raise ValueError(f"{label} = {value!r} is not a finite number")
    if not lo <= x <= hi:
        raise ValueError(f"{label} = {value!r} is out of range [{lo}, {hi}]")
    if whole and x != int(x):
        raise ValueError(f"{label} = {value!r}: give a whole number")
    return x


@dataclass
class Session:
    """The served pair and the examples offered; the pair's ``sample_config`` holds the defaults the
    Advanced section starts from."""

    pair: Pair
    examples: list[str] = field(default_factory=list)  # image files offered as examples
    _references: torch.Tensor | None = field(default=None, repr=False)  # feature maps of the clamp's references
    maps: dict = field(default_factory=dict, repr=False)  # the Maps panel's fitted maps by (manipulation spec, type)

    model = property(lambda self: self.pair.model)
    extractor = property(lambda self: self.pair.extractor)
    sample_config = property(lambda self: self.pair.sample_config)
    class_names = property(lambda self: self.pair.class_names)
    name = property(lambda self: self.pair.name)
    device = property(lambda self: self.pair.device)
    image_size = property(lambda self: self.pair.extractor.image_size)

    def load_image(self, path: str | Path | None, what: str = "image") -> torch.Tensor:
        """An uploaded file -> (1, 3, S, S) in [0, 1] at the backbone's size (Resize + CenterCrop).

        ValueError (one line, naming the file) for no file, a file that is not an image, or one
        that is too large; the size is read from the header before the pixels are decoded."""
        if path is None or str(path) == "":
            raise ValueError(f"no {what}: upload an image or pick an example")
        path = Path(path)
        name = path.name
        if not path.is_file():
            raise ValueError(f"{what} {name!r}: file not found")
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ValueError(f"{what} {name!r}: file is {size / 2**20:.1f} MB; the limit is {MAX_FILE_BYTES // 2**20} MB")
        try:
            with warnings.catch_warnings():  # the size check below is ours; PIL's bomb warning is noise
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    w, h = im.size
                    if w * h > MAX_PIXELS:
                        raise ValueError(f"{what} {name!r}: {w}x{h} = {w * h / 1e6:.0f} megapixels; "
                                         f"the limit is {MAX_PIXELS / 1e6:.0f} megapixels")
                    im = im.convert("RGB")
        except Image.DecompressionBombError:
            raise ValueError(f"{what} {name!r}: far more than {MAX_PIXELS / 1e6:.0f} megapixels") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise ValueError(f"{what} {name!r} is not an image this app can read "
                             f"(PNG, JPEG, WebP, BMP, ...): {type(e).__name__}") from None
        crop = crop_transform(self.image_size, train=False)(im)  # same crop as the evaluation pipeline
        x = torch.frombuffer(bytearray(crop.tobytes()), dtype=torch.uint8).view(crop.height, crop.width, 3)
        return (x.permute(2, 0, 1).float() / 255)[None].to(self.device)

    def sample_config_from(self, steps, guidance, uncond, seed, samples) -> SampleConfig:
        """The Advanced section's values -> SampleConfig; ValueError naming the setting out of range."""
        steps = number(steps, "steps", 1, MAX_STEPS, whole=True)
        guidance = number(guidance, "guidance scale", 0.0, MAX_GUIDANCE)
        seed = number(seed, "seed", 0, 2**31 - 1, whole=True)
        samples = number(samples, "K (samples)", 1, MAX_APP_SAMPLES, whole=True)
        if uncond not in UNCOND_MODES:
            raise ValueError(f"unconditional mode {uncond!r}: choose one of {', '.join(UNCOND_MODES)}")
        return dataclasses.replace(self.sample_config, steps=int(steps), guidance_scale=guidance,
                                   uncond=uncond, seed=int(seed), num_samples=int(samples))

    @torch.no_grad()
    def feature_range(self, clamp: str, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Steer's clamp choice (a key of CLAMPS) -> (lo, hi) of :func:`featinv.analysis.steering.feature_range`
        over reference features, or None for "none". References, as ``featinv steer --clamp`` takes them: the
        demo's training digits, else the examples offered; always also ``feats`` (1, C, h, w), the input's map."""
        if clamp not in CLAMPS:
            raise ValueError(f"clamp {clamp!r}: choose one of {', '.join(CLAMPS)}")
        if CLAMPS[clamp] is None:
            return None
        from featinv.analysis.steering import feature_range

        refs = torch.cat([self.references().to(feats.device), feats.float()])
        return feature_range(refs, per_location=CLAMPS[clamp] == "location")

    @torch.no_grad()
    def references(self) -> torch.Tensor:
        """Feature maps (M, C, h, w) float32 of the reference images that Steer's clamp and the Concepts panel's
        code levels read: the demo's training digits, else the examples offered (M = 0 without either);
        computed once."""
        from featinv.analysis.common import features_of

        if self._references is None:
            data = self.pair.data
            if data is not None:
                self._references = features_of(self.extractor, data["x_train"].expand(-1, 3, -1, -1))
            elif self.examples:
                examples = torch.cat([self.load_image(path, "example") for path in self.examples])
                self._references = features_of(self.extractor, examples)
            else:
                self._references = torch.zeros(0, *self.extractor.feature_shape, device=self.device)
        return self._references

    def reconstructor(self, cfg: SampleConfig) -> Reconstructor:
        return self.pair.reconstructor(cfg)


def demo_session(out: str | Path, seed: int = 0, quick: bool = True, device: str = "cpu", log=print) -> Session:
    """The demo's digits pair (trained and cached on first use) with a few held-out digits as examples."""
    from featinv.demo.digits import rgb

    pair = load_pair(PairSource(demo_out=str(out), demo_seed=seed, demo_quick=quick), device, log=log)
    folder = pair.folder / "app_examples"
    x, y = pair.data["x_test"], pair.data["y_test"]
    examples = []
    for digit in range(10):  # the first held-out example of each digit, at its native 8x8
        i = int((y == digit).nonzero()[0])
        path = folder / f"digit{digit}.png"
        if not path.exists():
            save_png(rgb(x[i:i + 1])[0], path)
        examples.append(str(path))
    return Session(pair, examples)


def checkpoint_session(source: PairSource, device: str = "cpu", examples: list[str] | None = None) -> Session:
    """A trained FeatInv checkpoint (file, or a run folder holding featinv.safetensors and config.yaml) and
    its backbone, as :func:`featinv.pair.load_pair` resolves them; served with K = 4 by default."""
    pair = load_pair(source, device)
    pair.sample_config = SampleConfig(num_samples=4)
    return Session(pair, list(examples or []))
