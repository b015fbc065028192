"""The panels' callbacks, without the web page: library calls in, pictures and tables out.

Every function takes the :class:`~featinv.app.session.Session`, the panel's inputs and a
SampleConfig, calls the library (``featinv.diffusion.reconstruct``, ``featinv.analysis``) and formats the
result: gallery items ``(PIL image, caption)`` and pandas tables. User mistakes raise a one-line
``ValueError``; :mod:`featinv.app.ui` turns those into messages in the page.
``progress(fraction, desc)`` reports coarse progress (the page's progress bar).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from featinv.analysis import common, compose, perturb, steering
from featinv.analysis import concepts as concepts_lib
from featinv.app.session import Session, number
from featinv.config import SampleConfig
from featinv.diffusion.reconstruct import uncertainty
from featinv.visualize import heatmap

TOP_K = 5
KEY = "featinv-app"  # every request seeds its noise from this key: reruns give the same pixels
DISPLAY_PX = 160     # small images are shown enlarged (nearest) to at least this many pixels
NBSP = "\u00a0"      # captions wrap between their parts, never inside "91 %" or "cos 0.927"


def _no_progress(fraction: float, desc: str = "") -> None:
    return None


# ----- formatting ---------------------------------------------------------------------------------

def tile(image01: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> PIL image, enlarged by an integer factor (nearest) when smaller than DISPLAY_PX."""
    factor = max(1, -(-DISPLAY_PX // image01.shape[-1]))
    return common.tile(image01, size=image01.shape[-1] * factor)


@torch.no_grad()
def classify(session: Session, images01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """images (N, 3, H, W) in [0, 1] -> (feature maps (N, C, h, w), class probabilities (N, classes)).

    Reconstructions come at the model's output size; they are resized (antialiased) to the
    backbone's input size, as ``featinv evaluate`` does."""
    x = images01.to(session.device).float()
    size = session.image_size
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    feats = session.extractor(x).float()
    return feats, session.extractor.classify(x).float().softmax(dim=-1)


def label(session: Session, probs: torch.Tensor) -> str:
    """(classes,) probabilities -> "name (p %)" of the top-1 class (a no-break space before the %)."""
    p, i = probs.max(dim=-1)
    return f"{session.class_names[int(i)]} ({100 * float(p):.0f}{NBSP}%)"


def topk_table(session: Session, probs: torch.Tensor, columns: list[str]) -> pd.DataFrame:
    """probs (N, classes) -> a table with one row per rank (top-5) and one column per image."""
    k = min(TOP_K, probs.shape[-1])
    values, indices = probs.topk(k, dim=-1)
    data = {"rank": [str(r + 1) for r in range(k)]}
    for n, column in enumerate(columns):
        data[column] = [f"{session.class_names[int(i)]} ({100 * float(v):.1f} %)"
                        for v, i in zip(values[n], indices[n])]
    return pd.DataFrame(data)


# ----- Reconstruct --------------------------------------------------------------------------------

@dataclass
class ReconstructOutput:
    gallery: list[tuple[Image.Image, str]]  # K reconstructions, captioned with top-1 and feature cosine
    uncertainty: Image.Image                # per-pixel std over the K samples, hot colour map
    table: pd.DataFrame                     # top-5 of the original and of each reconstruction
    cosine: list[float]                     # feature cosine of each reconstruction to the original's features
    original: Image.Image


def reconstruct(session: Session, path: str | None, cfg: SampleConfig, progress=_no_progress) -> ReconstructOutput:
    """One uploaded image -> K reconstructions from its feature map, their uncertainty and top-5 table."""
    image = session.load_image(path)
    progress(0.05, "feature map")
    rec = session.reconstructor(cfg)
    feats = rec.features(image)
    progress(0.15, f"sampling {cfg.num_samples} reconstructions ({cfg.steps} DDIM steps)")
    samples = rec.from_features(feats, [KEY])                       # (1, K, 3, H, W)
    progress(0.9, "classifying")
    rec_feats, rec_probs = classify(session, samples[0])
    _, probs = classify(session, image)
    cosine = compose.feature_cosine(rec_feats, feats.expand_as(rec_feats)).tolist()
    k = cfg.num_samples
    gallery = [(tile(samples[0, i]), f"sample {i + 1}: {label(session, rec_probs[i])}, cos{NBSP}{cosine[i]:.3f}")
               for i in range(k)]
    spread = uncertainty(samples)[0]
    table = topk_table(session, torch.cat([probs, rec_probs]),
                       ["original"] + [f"sample {i + 1}" for i in range(k)])
    return ReconstructOutput(gallery=gallery, uncertainty=tile(heatmap(spread)), table=table, cosine=cosine,
                             original=tile(image[0]))


# ----- regions ------------------------------------------------------------------------------------

REGIONS = ("whole map", "box", "cell")


def _numbers(text: str, n: int, what: str) -> list[float]:
    try:
        values = [float(v) for v in str(text).replace(",", " ").split()]
    except ValueError:
        values = []
    if len(values) != n:
        raise ValueError(f"{what}: expected {n} numbers, got {text!r}")
    return values


def region_mask(session: Session, region: str, coords: str) -> torch.Tensor | None:
    """The region a panel edits -> (h, w) cell weights in [0, 1], or None for the whole map.

    box: "x0, y0, x1, y1" in pixels of the S x S input; cell: "row, col" of the feature grid."""
    _, h, w = session.extractor.feature_shape
    size = session.image_size
    if region == "whole map":
        return None
    if region == "box":
        return steering.box_mask(_numbers(coords, 4, "box x0, y0, x1, y1"), size, (h, w))
    if region == "cell":
        row, col = (int(v) for v in _numbers(coords, 2, "cell row, col"))
        if not (0 <= row < h and 0 <= col < w):
            raise ValueError(f"cell ({row}, {col}) is outside the {h}x{w} feature grid (rows 0..{h - 1}, cols 0..{w - 1})")
        # A cell is the box that covers exactly that cell of the grid.
        box = (col * size / w, row * size / h, (col + 1) * size / w, (row + 1) * size / h)
        return steering.box_mask(box, size, (h, w))
    raise ValueError(f"region {region!r}: choose one of {', '.join(REGIONS)}")


# ----- Steer --------------------------------------------------------------------------------------

STRIP = 5            # tiles per strip: strengths 0, s/4, ..., s
MAX_STRENGTH = 4.0   # |strength|, in units of the map's mean feature norm


def direction(session: Session, kind: str, class_name: str, channel) -> tuple[torch.Tensor, str]:
    """The steering direction (C,) chosen in the page and its name."""
    if kind == "class":
        if class_name not in session.class_names:
            raise ValueError(f"class {class_name!r} is not one of the classifier's classes")
        cls = session.class_names.index(class_name)
        return steering.class_direction(session.extractor, cls).to(session.device), f"class {class_name}"
    if kind == "channel":
        c = session.extractor.feature_shape[0]
        index = int(number(channel, "channel", 0, c - 1, whole=True))
        return steering.channel_direction(c, index).to(session.device), f"channel {index}"
    raise ValueError(f"direction {kind!r}: choose class or channel")


@dataclass
class SteerOutput:
    strip: list[tuple[Image.Image, str]]  # one reconstruction per strength, captioned with its top-1
    table: pd.DataFrame                   # per strength: the head's top-1 on the steered map and the picture's


def steer(session: Session, path: str | None, kind: str, class_name: str, channel, strength: float,
          clamp: str, region: str, coords: str, cfg: SampleConfig, progress=_no_progress) -> SteerOutput:
    """A strip over strengths 0..``strength`` (units of the map's mean feature norm, see
    ``featinv.analysis.steering``), one sample each with the same noise, so only the steering differs.

    clamp (a key of :data:`featinv.app.session.CLAMPS`): keep the edited entries inside the range of
    features the backbone produces (:meth:`Session.feature_range`); without it a strong edit leaves that
    range (negative values after a ReLU) and the reconstructions stop following it."""
    image = session.load_image(path)
    d, name = direction(session, kind, class_name, channel)
    strength = number(strength, "strength", -MAX_STRENGTH, MAX_STRENGTH)
    mask = region_mask(session, region, coords)
    alphas = torch.linspace(0, strength, STRIP).tolist()
    rec = session.reconstructor(dataclasses.replace(cfg, num_samples=1))  # one sample per strength
    feats = rec.features(image)
    bounds = session.feature_range(clamp, feats)
    progress(0.1, f"steering along {name}: {STRIP} strengths")
    with torch.no_grad():
        steered = steering.steer(feats, d, alphas, mask=mask, clamp=bounds)        # (1, A, C, h, w)
        map_probs = session.extractor.logits_from_features(steered[0]).float().softmax(dim=-1)
    samples = steering.steer_and_reconstruct(rec, feats, d, alphas, [KEY], steered=steered)  # (1, A, 1, 3, H, W)
    progress(0.9, "classifying")
    _, probs = classify(session, samples[0, :, 0])
    strip = [(tile(samples[0, a, 0]), f"α {alpha:+.2f}: {label(session, probs[a])}") for a, alpha in enumerate(alphas)]
    table = pd.DataFrame({"strength α": [f"{a:+.2f}" for a in alphas],
                          f"head on the map steered along {name}": [label(session, p) for p in map_probs],
                          "classifier on the reconstruction": [label(session, p) for p in probs]})
    return SteerOutput(strip=strip, table=table)


# ----- Compose ------------------------------------------------------------------------------------

@dataclass
class ComposeOutput:
    gallery: list[tuple[Image.Image, str]]  # image A, image B, then K reconstructions of the composite
    table: pd.DataFrame                     # top-5: head on the composed map, classifier on each reconstruction
    cosine: list[float]                     # feature cosine of each reconstruction to the composed map


def compose_maps(session: Session, path_a: str | None, path_b: str | None, t: float, region: str,
                 coords: str, cfg: SampleConfig, progress=_no_progress) -> ComposeOutput:
    """(1 − t)·A + t·B, then B's feature cells pasted into the region -> K reconstructions of that map."""
    image_a, image_b = session.load_image(path_a, "image A"), session.load_image(path_b, "image B")
    t = number(t, "interpolation t", 0, 1)
    rec = session.reconstructor(cfg)
    fa, fb = rec.features(image_a), rec.features(image_b)
    target = compose.interpolate(fa, fb, [t])[:, 0]                           # (1, C, h, w)
    mask = region_mask(session, region, coords)
    if mask is not None:
        target = compose.paste(target, fb, mask.to(target))
    progress(0.1, f"sampling {cfg.num_samples} reconstructions of the composite")
    samples = rec.from_features(target, [KEY])[0]                                 # (K, 3, H, W)
    progress(0.9, "classifying")
    rec_feats, probs = classify(session, samples)
    cosine = compose.feature_cosine(rec_feats, target.expand_as(rec_feats)).tolist()
    with torch.no_grad():
        target_probs = session.extractor.logits_from_features(target).float().softmax(dim=-1)
    _, input_probs = classify(session, torch.cat([image_a, image_b]))
    gallery = [(tile(image_a[0]), f"A: {label(session, input_probs[0])}"),
               (tile(image_b[0]), f"B: {label(session, input_probs[1])}")]
    gallery += [(tile(s), f"sample {i + 1}: {label(session, p)}, cos{NBSP}{c:.3f}")
                for i, (s, p, c) in enumerate(zip(samples, probs, cosine))]
    table = topk_table(session, torch.cat([target_probs, probs]),
                       ["composed map (head)"] + [f"sample {i + 1}" for i in range(len(samples))])
    return ComposeOutput(gallery=gallery, table=table, cosine=cosine)


# ----- Perturb ------------------------------------------------------------------------------------

PGD = "PGD attack"
PERTURBATIONS = tuple(perturb.CORRUPTIONS) + (PGD,)
MAX_EPS_255 = 128     # PGD budget, in 1/255 steps of intensity (8x8 digits need ~32)
MAX_PGD_STEPS = 100


@dataclass
class PerturbOutput:
    clean: list[tuple[Image.Image, str]]      # clean input, then its K reconstructions
    perturbed: list[tuple[Image.Image, str]]  # perturbed input, then its K reconstructions
    table: pd.DataFrame                       # top-5 of the four kinds of picture


def perturb_image(session: Session, path: str | None, kind: str, severity, eps_255, steps,
                  target: str, cfg: SampleConfig, progress=_no_progress) -> PerturbOutput:
    """A corruption (severity 1-3) or an L∞ PGD attack (budget eps/255, ``steps`` steps, optionally
    towards ``target``) -> clean and perturbed inputs with their reconstructions and labels."""
    image = session.load_image(path)
    _, clean_probs = classify(session, image)
    if kind == PGD:
        eps_255 = number(eps_255, "PGD budget eps (/255)", 1, MAX_EPS_255)
        steps = number(steps, "PGD steps", 1, MAX_PGD_STEPS, whole=True)
        eps = eps_255 / 255
        goal = None
        if target and target != "untargeted":
            if target not in session.class_names:
                raise ValueError(f"target class {target!r} is not one of the classifier's classes")
            goal = torch.tensor([session.class_names.index(target)], device=session.device)
        progress(0.05, f"PGD: {int(steps)} steps, eps {eps_255:g}/255")
        attacked = perturb.pgd(session.extractor, image, clean_probs.argmax(dim=-1), eps, int(steps), target=goal)
        what = f"PGD eps {eps_255:g}/255" + (f" → {target}" if goal is not None else "")
    else:
        severity = number(severity, "corruption severity", 1, 3, whole=True)
        generator = torch.Generator().manual_seed(cfg.seed)
        attacked = perturb.corrupt(image, kind, int(severity), generator=generator)
        what = f"{kind} severity {int(severity)}"
    progress(0.2, f"sampling {cfg.num_samples} reconstructions of each")
    rec = session.reconstructor(cfg)
    samples = rec.from_features(rec.features(torch.cat([image, attacked])), [KEY, KEY])  # (2, K, 3, H, W)
    progress(0.9, "classifying")
    _, attacked_probs = classify(session, attacked)
    _, rec_probs = classify(session, samples.flatten(0, 1))
    k = cfg.num_samples
    clean = [(tile(image[0]), f"clean: {label(session, clean_probs[0])}")]
    clean += [(tile(samples[0, i]), f"clean sample {i + 1}: {label(session, rec_probs[i])}") for i in range(k)]
    bad = [(tile(attacked[0]), f"{what}: {label(session, attacked_probs[0])}")]
    bad += [(tile(samples[1, i]), f"perturbed sample {i + 1}: {label(session, rec_probs[k + i])}") for i in range(k)]
    table = topk_table(session, torch.cat([clean_probs, rec_probs[:1], attacked_probs, rec_probs[k:k + 1]]),
                       ["clean", "clean sample 1", "perturbed", "perturbed sample 1"])
    return PerturbOutput(clean=clean, perturbed=bad, table=table)


# ----- Concepts -----------------------------------------------------------------------------------

@dataclass
class ConceptsOutput:
    heat: Image.Image                       # the input with the concept's code over the grid laid over it
    strip: list[tuple[Image.Image, str]]    # steered along the concept's atom, strengths 0..strength
    removed: list[tuple[Image.Image, str]]  # the plain reconstruction, then the one without the concept
    table: pd.DataFrame                     # per concept: its code on this image, the head without it


def concepts(session: Session, path: str | None, basis_path: str | None, index, strength: float,
             cfg: SampleConfig, progress=_no_progress) -> ConceptsOutput:
    """One concept of a basis written by ``featinv concepts`` on the uploaded image: where it sits, a steering
    strip along its atom, and the reconstruction without it (one sample each, the same noise)."""
    image = session.load_image(path)
    if not basis_path:
        raise ValueError("no concept basis: upload a concepts.safetensors written by `featinv concepts`")
    basis = concepts_lib.ConceptBasis.load(basis_path)
    i = int(number(index, "concept", 0, basis.k - 1, whole=True))
    strength = number(strength, "strength", -MAX_STRENGTH, MAX_STRENGTH)
    rec = session.reconstructor(dataclasses.replace(cfg, num_samples=1))
    feats = rec.features(image)
    codes = basis.encode(feats)                                                   # (1, k, h, w)
    heat = concepts_lib.heat_map(codes, i, image.shape[-1])[0].cpu()
    vmax = float(heat.max())
    weight = (heat / vmax).clamp(0, 1) * 0.6 if vmax > 0 else torch.zeros_like(heat)
    overlaid = image[0].cpu() * (1 - weight) + heatmap(heat, vmax=vmax) * weight
    alphas = torch.linspace(0, float(strength), STRIP).tolist()
    progress(0.1, f"steering along concept {i}: {STRIP} strengths")
    samples = steering.steer_and_reconstruct(rec, feats, concepts_lib.concept_direction(basis, i), alphas, [KEY])
    progress(0.6, f"removing concept {i}")
    with torch.no_grad():
        without = [concepts_lib.remove(feats, basis, j, codes) for j in range(basis.k)]
        head = session.extractor.logits_from_features(torch.cat(without)).float().softmax(dim=-1)
    pair = rec.from_features(torch.cat([feats, without[i]]), [KEY, KEY])           # (2, 1, 3, H, W)
    _, probs = classify(session, torch.cat([samples[0, :, 0], pair[:, 0]]))
    strip = [(tile(samples[0, a, 0]), f"α {alpha:+.2f}: {label(session, probs[a])}") for a, alpha in enumerate(alphas)]
    removed = [(tile(pair[0, 0]), f"reconstruction: {label(session, probs[STRIP])}"),
               (tile(pair[1, 0]), f"without concept {i}: {label(session, probs[STRIP + 1])}")]
    peak = codes.amax(dim=(2, 3))[0]
    table = pd.DataFrame({"concept": [str(j) for j in range(basis.k)],
                          "code on this image (max over the grid)": [f"{float(v):.2f}" for v in peak],
                          "head on the map without it": [label(session, p) for p in head]})
    return ConceptsOutput(heat=tile(overlaid), strip=strip, removed=removed, table=table)
