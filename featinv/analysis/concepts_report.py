"""The concept atlas: what ``featinv concepts`` writes (picture, JSON table, Markdown table).

One row per concept: its most activating images with the concept's heat map laid over them, a few held-out
images steered along its atom (reconstructed with the same seeds for every α), the held-out images it is
most present in, reconstructed as they are and with the concept removed, and the classes whose logit
falls most when it is removed. Reconstructions run in fixed-size chunks (reports.FIXED_BATCH), so a row's
pixels never depend on what else is in the call.

Codes are never held for all images at once: the fit images are indexed in one streamed pass
(:func:`featinv.analysis.concept_index.concept_index`: frequency, mean code, top images and their grids, first-order
importance), and so are the held-out images (importance, quality, the images each concept is most present in).
Pictures, and the exact logit drop on removal, are made only for the concepts drawn; every concept has a table row.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from featinv.analysis.common import TILE, features_of, grid, markdown_table, predict, tile
from featinv.analysis.concept_edits import heat_map, nonzero_quantile, remove, set_code, steer_concept
from featinv.analysis.concept_index import ConceptIndex, concept_index, exact_removal, feature_batches
from featinv.analysis.concepts import ConceptBasis
from featinv.analysis.reports import reconstructor
from featinv.config import EDIT_DEFAULTS
from featinv.diffusion.reconstruct import Reconstructor
from featinv.metrics import read_back
from featinv.nets.backbone import FeatureExtractor
from featinv.pair import Pair
from featinv.visualize import heatmap

TOP_CLASSES = 3
HTML_EXEMPLARS = 5   # top images per concept the index keeps for the HTML atlas


@dataclass(frozen=True)
class AtlasImages:
    """The atlas's three image sets, each (N, 3, S, S) in [0, 1] at the backbone's size.

    fit: where the exemplars come from (the images the basis was fitted on; indexed, with fit_labels (N,) or the
    classifier's top-1); held (M images) with labels (M,) (None: the classifier's own top-1): importance,
    completeness and the removal columns; steer (B images): steered along every concept drawn."""

    fit: Tensor
    fit_names: Sequence[str]
    held: Tensor
    held_labels: Tensor | None
    steer: Tensor
    steer_names: Sequence[str]
    fit_labels: Tensor | None = None


@dataclass(frozen=True)
class AtlasConfig:
    """What each row shows: the steering strengths (α = 0, the plain reconstruction, is shown once on top), the
    quantile of the concept's non-zero fit codes its code is set to (a code edit of the steered images), the most
    activating images and the held-out images reconstructed without the concept; a title suffix."""

    alphas: Sequence[float] = (1.0, 2.0)
    exemplars: int = 3
    removals: int = 2
    description: str = ""
    draw: int | Sequence[int] | None = None   # concepts drawn: indices, the top N by importance, None: see drawn()
    set_quantile: float = EDIT_DEFAULTS["set"][0]


@dataclass(frozen=True)
class _Atlas:
    """What every row reads: the inputs, the indexes of the fit and held-out images, the importance tables."""

    basis: ConceptBasis
    rec: Reconstructor
    ext: FeatureExtractor
    images: AtlasImages
    held_labels: Tensor          # (M,) given or the classifier's top-1
    fit_index: ConceptIndex      # the fit images: frequency, mean code, top images (exemplars)
    held_index: ConceptIndex     # the held-out images: gradient importance, quality, where each concept is most present
    removal: Tensor              # (k, classes) exact logit drop on removal on the held-out images; NaN rows: not drawn
    f_held: Tensor               # (M, C, h, w)
    f_steer: Tensor              # (B, C, h, w)
    steer_keys: list[str]
    alphas: list[float]          # without 0
    set_levels: dict[int, float]  # the drawn concepts' code-edit levels
    cfg: AtlasConfig


@dataclass(frozen=True)
class AtlasResult:
    """What :func:`build_atlas` makes: the picture, table.json's dict, table.md, the fit images' index and the
    concepts drawn."""

    picture: Image.Image
    table: dict
    markdown: str
    index: ConceptIndex
    shown: set[int]


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
def build_atlas(pair: Pair, basis: ConceptBasis, images: AtlasImages, cfg: AtlasConfig = AtlasConfig()) -> AtlasResult:
    """The atlas of ``basis`` on ``images``: the picture of the concepts drawn, a table row for every concept."""
    ext, rec = pair.extractor, reconstructor(pair)
    fit_index = concept_index(basis, ext, feature_batches(ext, images.fit), images.fit_labels,
                              top=max(cfg.exemplars, HTML_EXEMPLARS))
    f_held = features_of(ext, images.held)
    held_labels = images.held_labels
    if held_labels is None:
        held_labels = torch.cat([ext.logits_from_features(c).argmax(1) for c in f_held.split(256)])
    held_index = concept_index(basis, ext, f_held, held_labels, top=cfg.removals, quality=True)
    shown = drawn(basis.k, held_index.importance, cfg.draw)
    removal = torch.full_like(held_index.importance, float("nan"))   # exact drops: the concepts drawn only
    removal[sorted(shown)] = exact_removal(basis, ext, f_held, held_labels, sorted(shown), removal.shape[1])
    set_levels = _set_levels(basis, ext, images.fit, sorted(shown), cfg.set_quantile)
    f_steer = rec.features(images.steer)
    steer_names = images.steer_names
    steer_keys = [f"steer{j}:{n}" for j, n in enumerate(steer_names)]
    plain = rec.from_features(f_steer, steer_keys)                          # (B, K, 3, H, W)
    alphas = [float(a) for a in cfg.alphas if float(a) != 0.0]
    atlas = _Atlas(basis, rec, ext, images, held_labels, fit_index, held_index, removal, f_held, f_steer, steer_keys,
                   alphas, set_levels, cfg)
    rows = [[None] * cfg.exemplars + [tile(plain[j, 0], ["alpha=0", steer_names[j][:10]]) for j in range(len(plain))]]
    labels, table_rows = ["plain"], []
    for i in range(basis.k):  # every concept in the table; pictures (reconstructions) for those drawn
        if i in shown:
            row, entry = _concept_row(atlas, i)
            rows.append(row)
            labels.append(f"concept {i}")
        else:
            entry = _concept_entry(atlas, i)
        table_rows.append({**entry, "drawn": i in shown})
    title, md = _texts(atlas, len(shown), table_rows)
    table = {"method": basis.method, "k": basis.k, "source": basis.source,
             "stats": {key: v for key, v in basis.stats.items() if key != "index"},
             "completeness": held_index.quality, "alphas": alphas, "held_out": len(images.held),
             "fit_images": fit_index.images, "class_counts": held_index.class_counts, "importance_removal": removal,
             "importance_gradient": held_index.importance, "drawn": sorted(shown), "rows": table_rows}
    return AtlasResult(grid(rows, title, labels), table, md, fit_index, shown)


def concepts_report(pair: Pair, basis: ConceptBasis, images: AtlasImages,
                    cfg: AtlasConfig = AtlasConfig()) -> tuple[Image.Image, dict, str]:
    """The atlas of ``basis`` on ``images`` -> (picture, table, markdown) (see :func:`build_atlas`)."""
    atlas = build_atlas(pair, basis, images, cfg)
    return atlas.picture, atlas.table, atlas.markdown


def _texts(atlas: _Atlas, drawn_count: int, table_rows: list[dict]) -> tuple[list[str], str]:
    """The picture's title lines and table.md."""
    basis, comp, cfg, alphas = atlas.basis, atlas.held_index.quality, atlas.cfg, atlas.alphas
    held_count = atlas.held_index.images
    title = [f"featinv concepts: {basis.k} concepts ({basis.method}) of {basis.source or 'the feature map'}"
             + (f"; {cfg.description}" if cfg.description else ""),
             f"variance explained {comp['variance_explained']:.1%}, L0 {comp['l0']:.1f}, dead {comp['dead']}, "
             f"decoded-map agreement {comp['agreement']:.1%} ({held_count} held-out images); rows: "
             f"{drawn_count} of {basis.k} concepts",
             f"per row: {cfg.exemplars} most activating images (heat = the concept's code); held-out images steered "
             f"along the atom (alpha {', '.join(f'{a:g}' for a in alphas)}), then with its code set to its "
             f"q{cfg.set_quantile:g} level (a code edit); held-out images it is most present in: "
             "reconstruction / with it removed",
             "tile captions: rec = the classifier's top-1 on the reconstruction"]
    columns = [("concept", "concept"), ("top_classes", "classes it matters most for (logit drop when removed)"),
               ("removal_top", "logit drop, top class"), ("gradient_top", "gradient x code, top class"),
               ("active_share", "locations where active"), ("exemplars", "most activating images")]
    md = (f"# featinv concepts\n\n{basis.k} concepts ({basis.method}) of {basis.source or 'the feature map'}; "
          f"variance explained {comp['variance_explained']:.1%} (FVU {comp['fvu']:.3f}), L0 {comp['l0']:.2f} active "
          f"concepts per location, {comp['dead']} dead, decoded-map agreement {comp['agreement']:.1%} on "
          f"{held_count} held-out images; pictures of {drawn_count} of {basis.k} concepts. Logit drop: the class's "
          "logit minus its logit with the concept removed, mean over the class's held-out images: exact for the "
          "concepts drawn, else its first-order estimate (gradient x code). Activity and exemplars: on the "
          f"{atlas.fit_index.images} fit images; atlas.html lists every concept.\n\n"
          + markdown_table(table_rows, columns))
    return title, md


def drawn(k: int, importance: Tensor, draw: int | Sequence[int] | None) -> set[int]:
    """The concepts whose pictures are drawn: ``draw`` indices (ValueError naming one out of range), or the top
    ``draw`` by importance (k, classes) (the largest logit drop of any class on removal, or its first-order
    estimate); None: all up to 20, else the top 10. Every concept is in the table either way."""
    if draw is None:
        draw = k if k <= 20 else 10
    if isinstance(draw, int):
        score = torch.nan_to_num(importance, nan=float("-inf")).amax(dim=1)
        return set(score.argsort(descending=True)[:draw].tolist())
    bad = [i for i in draw if not 0 <= i < k]
    if bad:
        raise ValueError(f"--draw: concept {bad[0]} out of range: the basis has {k} concepts (0..{k - 1})")
    return set(draw)


def _concept_entry(atlas: _Atlas, i: int) -> dict:
    """Concept i's table entry without pictures: the classes it matters for (by the exact drop where drawn, else
    the first-order estimate), how active and its exemplars (fit images)."""
    gradient = atlas.held_index.importance[i]
    exact = bool(torch.isfinite(atlas.removal[i]).any())
    drops = atlas.removal[i] if exact else gradient
    ranked = [c for c in drops.argsort(descending=True).tolist() if torch.isfinite(drops[c])][:TOP_CLASSES]
    fit = atlas.fit_index
    order = [n for n in fit.top_images[i, :atlas.cfg.exemplars].tolist() if n >= 0]
    return {"concept": i, "top_classes": ", ".join(f"{c} ({drops[c]:+.2f})" for c in ranked),
            "classes": ranked, "removal_top": float(drops[ranked[0]]) if ranked and exact else None,
            "gradient_top": float(gradient[ranked[0]]) if ranked else None,
            "active_share": float(fit.frequency[i]), "mean_code": float(fit.mean_code[i]),
            "exemplars": " ".join(atlas.images.fit_names[n] for n in order)}


def _set_levels(basis: ConceptBasis, ext, fit: Tensor, concepts: list[int], quantile: float) -> dict[int, float]:
    """The drawn concepts' code-edit levels: each one's ``quantile`` of its non-zero codes on the fit images (a
    second pass over them, keeping only these concepts' codes) -> {concept: level}."""
    if not concepts:
        return {}
    cols = torch.tensor(concepts)
    codes = torch.cat([basis.encode(f)[:, cols.to(f.device)].cpu() for f in feature_batches(ext, fit)])
    levels = nonzero_quantile(codes.transpose(0, 1).flatten(1), quantile)
    return dict(zip(concepts, levels.tolist()))


def _concept_row(atlas: _Atlas, i: int) -> tuple[list[Image.Image], dict]:
    """Concept i's tiles and table entry (see build_atlas)."""
    basis, rec, ext, images, cfg = atlas.basis, atlas.rec, atlas.ext, atlas.images, atlas.cfg
    fit, held_labels, fit_names = atlas.fit_index, atlas.held_labels, images.fit_names
    count = int((fit.top_images[i, :cfg.exemplars] >= 0).sum())           # fewer when fewer images were read
    heats = heat_map(fit.top_grids[i, :count, None], 0, TILE)
    vmax = float(heats.max()) if len(heats) else 0.0
    row = [tile(overlay(images.fit[n], heats[j], vmax), [fit_names[n][:10], f"code {fit.top_peaks[i, j]:.2f}"])
           for j, n in enumerate(fit.top_images[i, :count].tolist())]
    steered = steer_concept(atlas.f_steer, basis, i, atlas.alphas)                     # (B, A, C, h, w)
    for a, alpha in enumerate(atlas.alphas):
        samples = rec.from_features(steered[:, a], atlas.steer_keys)
        top = _read(ext, samples)
        row += [tile(samples[j, 0], [f"alpha={alpha:g}", f"rec {int(top[j, 0])}"]) for j in range(len(samples))]
    level = atlas.set_levels[i]
    samples = rec.from_features(set_code(atlas.f_steer, basis, i, level), atlas.steer_keys)
    set_top = _read(ext, samples)
    row += [tile(samples[j, 0], [f"set {level:.2f}", f"rec {int(set_top[j, 0])}"]) for j in range(len(samples))]
    held = atlas.held_index
    present = held.top_images[i, :int((held.top_images[i, :cfg.removals] >= 0).sum())]
    keys = [f"held{n}" for n in present.tolist()]
    f = atlas.f_held[present.to(atlas.f_held.device)]
    before = rec.from_features(f, keys)
    after = rec.from_features(remove(f, basis, i), keys)
    top_b, top_a = _read(ext, before), _read(ext, after)
    for j, n in enumerate(present.tolist()):
        y = int(held_labels[n])
        row += [tile(before[j, 0], [f"class {y}", f"rec {int(top_b[j, 0])}"]),
                tile(after[j, 0], [f"without {i}", f"rec {int(top_a[j, 0])}"])]
    _, _, probs = predict(ext.logits_from_features(f))
    entry = {**_concept_entry(atlas, i), "set_level": level, "set_rec": set_top[:, 0].tolist(),
             "removal_shown": [{"held_index": n, "label": int(held_labels[n]), "rec_before": int(top_b[j, 0]),
                                "rec_after": int(top_a[j, 0]), "p_label": float(probs[j, int(held_labels[n])])}
                               for j, n in enumerate(present.tolist())]}
    return row, entry


def write_atlas_files(out: str | Path, atlas: AtlasResult, fit_images: Tensor, fit_names: Sequence[str]) -> dict:
    """Write ``<out>/atlas.html`` (every concept, sortable and filterable, drawn ones marked) and
    ``<out>/index.json`` (the fit images' whole index, with their names), atomically -> their paths."""
    from featinv.analysis.atlas_html import write_atlas_html
    from featinv.io import atomic_write_text

    table = atlas.table
    title = f"featinv concepts: {table['k']} concepts ({table['method']}) of {table['source'] or 'the feature map'}"
    html = write_atlas_html(Path(out) / "atlas.html", atlas.index, fit_images, fit_names, atlas.shown, title,
                            exemplars=HTML_EXEMPLARS)
    index = atomic_write_text(json.dumps(atlas.index.to_json(fit_names), allow_nan=False) + "\n",
                              Path(out) / "index.json")
    return {"html": str(html), "index": str(index)}
