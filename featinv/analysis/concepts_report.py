"""The concept atlas: what ``featinv concepts`` writes (picture, JSON table, Markdown table).

One row per concept: its most activating images with the concept's heat map laid over them, a few held-out
images steered along its atom (reconstructed with the same seeds for every α), the held-out images it is
most present in, reconstructed as they are and with the concept removed, and the classes whose logit
falls most when it is removed. Reconstructions run in fixed-size chunks (reports.FIXED_BATCH), so a row's
pixels never depend on what else is in the call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from featinv.analysis.common import TILE, features_of, grid, markdown_table, predict, tile
from featinv.analysis.concept_edits import heat_map, remove, steer_concept
from featinv.analysis.concept_scores import completeness, concept_importance
from featinv.analysis.concepts import ConceptBasis
from featinv.analysis.reports import reconstructor
from featinv.diffusion.reconstruct import Reconstructor
from featinv.metrics import read_back
from featinv.nets.backbone import FeatureExtractor
from featinv.pair import Pair
from featinv.visualize import heatmap

TOP_CLASSES = 3


@dataclass(frozen=True)
class AtlasImages:
    """The atlas's three image sets, each (N, 3, S, S) in [0, 1] at the backbone's size.

    fit: where the exemplars come from (the images the basis was fitted on); held (M images) with labels (M,)
    (None: the classifier's own top-1): importance, completeness and the removal columns; steer (B images):
    steered along every concept."""

    fit: Tensor
    fit_names: Sequence[str]
    held: Tensor
    held_labels: Tensor | None
    steer: Tensor
    steer_names: Sequence[str]


@dataclass(frozen=True)
class AtlasConfig:
    """What each row shows: the steering strengths (α = 0, the plain reconstruction, is shown once on top),
    the most activating images and the held-out images reconstructed without the concept; a title suffix."""

    alphas: Sequence[float] = (1.0, 2.0)
    exemplars: int = 3
    removals: int = 2
    description: str = ""
    draw: int | Sequence[int] | None = None   # concepts drawn: indices, the top N by importance, None: see drawn()


@dataclass(frozen=True)
class _Atlas:
    """What every row reads: the inputs, their feature maps and codes, the importance table."""

    basis: ConceptBasis
    rec: Reconstructor
    ext: FeatureExtractor
    images: AtlasImages
    held_labels: Tensor          # (M,) given or the classifier's top-1
    imp: dict                    # concept_importance
    codes_fit: Tensor            # (N, k, h, w)
    strength_fit: Tensor         # (N, k) the code's peak over the grid, CPU
    f_held: Tensor               # (M, C, h, w)
    codes_held: Tensor           # (M, k, h, w)
    strength_held: Tensor        # (M, k)
    f_steer: Tensor              # (B, C, h, w)
    steer_keys: list[str]
    alphas: list[float]          # without 0
    cfg: AtlasConfig


def overlay(image: torch.Tensor, heat: torch.Tensor, vmax: float) -> torch.Tensor:
    """image (3, H, W) in [0, 1] + heat (TILE, TILE) -> (3, TILE, TILE): the image with the hot colour map
    blended in where the concept's code is high (half and half at the concept's vmax)."""
    x = image.detach().float().cpu()[None]
    mode = "nearest" if x.shape[-1] < TILE else "bilinear"
    x = F.interpolate(x, size=(TILE, TILE), mode=mode)[0]
    weight = (heat.cpu() / vmax).clamp(0, 1)[None] * 0.6 if vmax > 0 else torch.zeros(1, TILE, TILE)
    return x * (1 - weight) + heatmap(heat.cpu(), vmax=vmax) * weight


def _read(extractor, samples: torch.Tensor) -> torch.Tensor:
    """Reconstructions (N, K, 3, H, W) -> the classifier's top-1 (N, K), on the CPU."""
    return read_back(extractor, samples, clamp=True)[1].argmax(-1).cpu()


@torch.no_grad()
def concepts_report(pair: Pair, basis: ConceptBasis, images: AtlasImages,
                    cfg: AtlasConfig = AtlasConfig()) -> tuple[Image.Image, dict, str]:
    """The atlas of ``basis`` on ``images`` -> (picture, table, markdown)."""
    ext, rec = pair.extractor, reconstructor(pair)
    exemplars = cfg.exemplars
    f_fit, f_held = features_of(ext, images.fit), features_of(ext, images.held)
    codes_fit, codes_held = basis.encode(f_fit), basis.encode(f_held)
    held_labels = images.held_labels
    if held_labels is None:
        held_labels = torch.cat([ext.logits_from_features(c).argmax(1) for c in f_held.split(256)])
    imp = concept_importance(basis, ext, f_held, held_labels, codes_held)
    comp = completeness(basis, f_held, ext, codes_held)
    f_steer = rec.features(images.steer)
    steer_names = images.steer_names
    steer_keys = [f"steer{j}:{n}" for j, n in enumerate(steer_names)]
    plain = rec.from_features(f_steer, steer_keys)                          # (B, K, 3, H, W)
    alphas = [float(a) for a in cfg.alphas if float(a) != 0.0]
    atlas = _Atlas(basis, rec, ext, images, held_labels, imp, codes_fit, codes_fit.amax(dim=(2, 3)).cpu(), f_held,
                   codes_held, codes_held.amax(dim=(2, 3)).cpu(), f_steer, steer_keys, alphas, cfg)
    rows, labels, table_rows = [], [], []
    head = [None] * exemplars + [tile(plain[j, 0], ["alpha=0", steer_names[j][:10]]) for j in range(len(plain))]
    rows.append(head)
    labels.append("plain")
    shown = drawn(basis.k, imp["removal"], cfg.draw)
    for i in range(basis.k):  # every concept in the table; pictures (reconstructions) for those drawn
        if i in shown:
            row, entry = _concept_row(atlas, i)
            rows.append(row)
            labels.append(f"concept {i}")
        else:
            entry = _concept_entry(atlas, i, atlas.strength_fit[:, i].argsort(descending=True)[:cfg.exemplars])
        table_rows.append({**entry, "drawn": i in shown})
    held_count = len(images.held)
    title = [f"featinv concepts: {basis.k} concepts ({basis.method}) of {basis.source or 'the feature map'}"
             + (f"; {cfg.description}" if cfg.description else ""),
             f"variance explained {comp['variance_explained']:.1%}, L0 {comp['l0']:.1f}, dead {comp['dead']}, "
             f"decoded-map agreement {comp['agreement']:.1%} ({held_count} held-out images); rows: "
             f"{len(shown)} of {basis.k} concepts",
             f"per row: {exemplars} most activating images (heat = the concept's code); held-out images steered "
             f"along the atom (alpha {', '.join(f'{a:g}' for a in alphas)}); held-out images it is most present in: "
             "reconstruction / with it removed",
             "tile captions: rec = the classifier's top-1 on the reconstruction"]
    columns = [("concept", "concept"), ("top_classes", "classes it matters most for (logit drop when removed)"),
               ("removal_top", "logit drop, top class"), ("gradient_top", "gradient x code, top class"),
               ("active_share", "locations where active"), ("exemplars", "most activating images")]
    md = (f"# featinv concepts\n\n{basis.k} concepts ({basis.method}) of {basis.source or 'the feature map'}; "
          f"variance explained {comp['variance_explained']:.1%} (FVU {comp['fvu']:.3f}), L0 {comp['l0']:.2f} active "
          f"concepts per location, {comp['dead']} dead, decoded-map agreement {comp['agreement']:.1%} on "
          f"{held_count} held-out images; pictures of {len(shown)} of {basis.k} concepts. Logit drop: the class's "
          "logit minus its logit with the concept "
          "removed, mean over the class's held-out images.\n\n" + markdown_table(table_rows, columns))
    table = {"method": basis.method, "k": basis.k, "source": basis.source, "stats": basis.stats,
             "completeness": comp, "alphas": alphas, "held_out": held_count, "class_counts": imp["count"],
             "importance_removal": imp["removal"], "importance_gradient": imp["gradient"], "rows": table_rows}
    return grid(rows, title, labels), table, md


def drawn(k: int, removal: Tensor, draw: int | Sequence[int] | None) -> set[int]:
    """The concepts whose pictures are drawn: ``draw`` indices (ValueError naming one out of range), or the top
    ``draw`` by importance (the largest logit drop of any class on removal); None: all up to 20, else the top 10.
    Every concept is in the table either way."""
    if draw is None:
        draw = k if k <= 20 else 10
    if isinstance(draw, int):
        score = torch.nan_to_num(removal, nan=float("-inf")).amax(dim=1)
        return set(score.argsort(descending=True)[:draw].tolist())
    bad = [i for i in draw if not 0 <= i < k]
    if bad:
        raise ValueError(f"--draw: concept {bad[0]} out of range: the basis has {k} concepts (0..{k - 1})")
    return set(draw)


def _concept_entry(atlas: _Atlas, i: int, order: Tensor) -> dict:
    """Concept i's table entry without pictures: the classes it matters for, how active, its exemplars."""
    drops = atlas.imp["removal"][i]
    ranked = [c for c in drops.argsort(descending=True).tolist() if torch.isfinite(drops[c])][:TOP_CLASSES]
    return {"concept": i, "top_classes": ", ".join(f"{c} ({drops[c]:+.2f})" for c in ranked),
            "classes": ranked, "removal_top": float(drops[ranked[0]]) if ranked else None,
            "gradient_top": float(atlas.imp["gradient"][i, ranked[0]]) if ranked else None,
            "active_share": float((atlas.codes_fit[:, i] > 0).float().mean()),
            "exemplars": " ".join(atlas.images.fit_names[n] for n in order.tolist())}


def _concept_row(atlas: _Atlas, i: int) -> tuple[list[Image.Image], dict]:
    """Concept i's tiles and table entry (see concepts_report)."""
    basis, rec, ext, images, cfg = atlas.basis, atlas.rec, atlas.ext, atlas.images, atlas.cfg
    codes_fit, strength_fit, held_labels = atlas.codes_fit, atlas.strength_fit, atlas.held_labels
    fit_names = images.fit_names
    order = strength_fit[:, i].argsort(descending=True)[:cfg.exemplars]
    heats = heat_map(codes_fit[order], i, TILE)
    vmax = float(heats.max()) if len(heats) else 0.0
    row = [tile(overlay(images.fit[n], heats[j], vmax), [fit_names[n][:10], f"code {strength_fit[n, i]:.2f}"])
           for j, n in enumerate(order.tolist())]
    steered = steer_concept(atlas.f_steer, basis, i, atlas.alphas)                     # (B, A, C, h, w)
    for a, alpha in enumerate(atlas.alphas):
        samples = rec.from_features(steered[:, a], atlas.steer_keys)
        top = _read(ext, samples)
        row += [tile(samples[j, 0], [f"alpha={alpha:g}", f"rec {int(top[j, 0])}"]) for j in range(len(samples))]
    present = atlas.strength_held[:, i].argsort(descending=True)[:cfg.removals]
    keys = [f"held{n}" for n in present.tolist()]
    f = atlas.f_held[present]
    before = rec.from_features(f, keys)
    after = rec.from_features(remove(f, basis, i, atlas.codes_held[present]), keys)
    top_b, top_a = _read(ext, before), _read(ext, after)
    for j, n in enumerate(present.tolist()):
        y = int(held_labels[n])
        row += [tile(before[j, 0], [f"class {y}", f"rec {int(top_b[j, 0])}"]),
                tile(after[j, 0], [f"without {i}", f"rec {int(top_a[j, 0])}"])]
    _, _, probs = predict(ext.logits_from_features(f))
    entry = {**_concept_entry(atlas, i, order),
             "removal_shown": [{"held_index": n, "label": int(held_labels[n]), "rec_before": int(top_b[j, 0]),
                                "rec_after": int(top_a[j, 0]), "p_label": float(probs[j, int(held_labels[n])])}
                               for j, n in enumerate(present.tolist())]}
    return row, entry
