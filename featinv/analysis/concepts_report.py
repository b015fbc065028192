"""The concept atlas: what ``featinv concepts`` writes (picture, JSON table, Markdown table).

One row per concept: its most activating images with the concept's heat map laid over them, a few held-out
images steered along its atom (reconstructed with the same seeds for every α), the held-out images it is
most present in, reconstructed as they are and with the concept removed, and the classes whose logit
falls most when it is removed. Reconstructions run in fixed-size chunks (reports.FIXED_BATCH), so a row's
pixels never depend on what else is in the call.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from featinv.analysis.common import TILE, features_of, grid, markdown_table, predict, tile
from featinv.analysis.concept_scores import completeness, concept_importance
from featinv.analysis.concepts import ConceptBasis, heat_map, remove, steer_concept
from featinv.analysis.reports import reconstructor
from featinv.pair import Pair
from featinv.visualize import heatmap

TOP_CLASSES = 3


def overlay(image: torch.Tensor, heat: torch.Tensor, vmax: float) -> torch.Tensor:
    """image (3, H, W) in [0, 1] + heat (TILE, TILE) -> (3, TILE, TILE): the image with the hot colour map
    blended in where the concept's code is high (half and half at the concept's vmax)."""
    x = image.detach().float().cpu()[None]
    mode = "nearest" if x.shape[-1] < TILE else "bilinear"
    x = F.interpolate(x, size=(TILE, TILE), mode=mode)[0]
    weight = (heat.cpu() / vmax).clamp(0, 1)[None] * 0.6 if vmax > 0 else torch.zeros(1, TILE, TILE)
    return x * (1 - weight) + heatmap(heat.cpu(), vmax=vmax) * weight


def _read(extractor, samples: torch.Tensor) -> torch.Tensor:
    """Reconstructions (N, K, 3, H, W) -> the classifier's top-1 (N, K)."""
    x = samples.flatten(0, 1)
    if x.shape[-1] != extractor.image_size:
        x = F.interpolate(x, size=(extractor.image_size,) * 2, mode="bilinear", antialias=True).clamp(0, 1)
    with torch.no_grad():
        top = torch.cat([extractor.classify(c.to(extractor.mean.device)).argmax(1).cpu() for c in x.split(256)])
    return top.view(samples.shape[:2])


@torch.no_grad()
def concepts_report(pair: Pair, basis: ConceptBasis, fit_images: torch.Tensor, fit_names: Sequence[str],
                    held_images: torch.Tensor, held_labels: torch.Tensor | None, steer_images: torch.Tensor,
                    steer_names: Sequence[str], alphas: Sequence[float] = (1.0, 2.0), exemplars: int = 3,
                    removals: int = 2, description: str = "") -> tuple[Image.Image, dict, str]:
    """The atlas of ``basis`` -> (picture, table, markdown).

    fit_images (N, 3, S, S): where the exemplars come from; held_images (M, 3, S, S) with labels (M,) (None:
    the classifier's own top-1): importance, completeness and the removal columns; steer_images (B, 3, S, S):
    steered along every concept at ``alphas`` (α = 0, the plain reconstruction, is shown once on top)."""
    ext, rec = pair.extractor, reconstructor(pair)
    f_fit, f_held = features_of(ext, fit_images), features_of(ext, held_images)
    codes_fit, codes_held = basis.encode(f_fit), basis.encode(f_held)
    if held_labels is None:
        held_labels = torch.cat([ext.logits_from_features(c).argmax(1) for c in f_held.split(256)])
    imp = concept_importance(basis, ext, f_held, held_labels, codes_held)
    comp = completeness(basis, f_held, ext, codes_held)
    strength_fit, strength_held = codes_fit.amax(dim=(2, 3)).cpu(), codes_held.amax(dim=(2, 3)).cpu()
    f_steer = rec.features(steer_images)
    steer_keys = [f"steer{j}:{n}" for j, n in enumerate(steer_names)]
    plain = rec.from_features(f_steer, steer_keys)                          # (B, K, 3, H, W)
    alphas = [float(a) for a in alphas if float(a) != 0.0]
    rows, labels, table_rows = [], [], []
    head = [None] * exemplars + [tile(plain[j, 0], ["alpha=0", steer_names[j][:10]]) for j in range(len(plain))]
    rows.append(head)
    labels.append("plain")
    for i in range(basis.k):
        row, entry = _concept_row(i, basis, pair, rec, ext, imp, fit_images, fit_names, codes_fit, strength_fit,
                                  held_images, held_labels, f_held, codes_held, strength_held, f_steer, steer_keys,
                                  alphas, exemplars, removals)
        rows.append(row)
        labels.append(f"concept {i}")
        table_rows.append(entry)
    title = [f"featinv concepts: {basis.k} concepts ({basis.method}) of {basis.source or 'the feature map'}"
             + (f"; {description}" if description else ""),
             f"variance explained {comp['variance_explained']:.1%}, decoded-map agreement {comp['agreement']:.1%} "
             f"({len(held_images)} held-out images)",
             f"per row: {exemplars} most activating images (heat = the concept's code); held-out images steered "
             f"along the atom (alpha {', '.join(f'{a:g}' for a in alphas)}); held-out images it is most present in: "
             "reconstruction / with it removed",
             "tile captions: rec = the classifier's top-1 on the reconstruction"]
    columns = [("concept", "concept"), ("top_classes", "classes it matters most for (logit drop when removed)"),
               ("removal_top", "logit drop, top class"), ("gradient_top", "gradient x code, top class"),
               ("active_share", "locations where active"), ("exemplars", "most activating images")]
    md = (f"# featinv concepts\n\n{basis.k} concepts ({basis.method}) of {basis.source or 'the feature map'}; "
          f"variance explained {comp['variance_explained']:.1%}, decoded-map agreement {comp['agreement']:.1%} on "
          f"{len(held_images)} held-out images. Logit drop: the class's logit minus its logit with the concept "
          "removed, mean over the class's held-out images.\n\n" + markdown_table(table_rows, columns))
    table = {"method": basis.method, "k": basis.k, "source": basis.source, "stats": basis.stats,
             "completeness": comp, "alphas": alphas, "held_out": len(held_images), "class_counts": imp["count"],
             "importance_removal": imp["removal"], "importance_gradient": imp["gradient"], "rows": table_rows}
    return grid(rows, title, labels), table, md


def _concept_row(i, basis, pair, rec, ext, imp, fit_images, fit_names, codes_fit, strength_fit, held_images,
                 held_labels, f_held, codes_held, strength_held, f_steer, steer_keys, alphas, exemplars, removals):
    """One concept's tiles and table entry (see concepts_report)."""
    order = strength_fit[:, i].argsort(descending=True)[:exemplars]
    heats = heat_map(codes_fit[order], i, TILE)
    vmax = float(heats.max()) if len(heats) else 0.0
    row = [tile(overlay(fit_images[n], heats[j], vmax), [fit_names[n][:10], f"code {strength_fit[n, i]:.2f}"])
           for j, n in enumerate(order.tolist())]
    steered = steer_concept(f_steer, basis, i, alphas)                                  # (B, A, C, h, w)
    for a, alpha in enumerate(alphas):
        samples = rec.from_features(steered[:, a], steer_keys)
        top = _read(ext, samples)
        row += [tile(samples[j, 0], [f"alpha={alpha:g}", f"rec {int(top[j, 0])}"]) for j in range(len(samples))]
    present = strength_held[:, i].argsort(descending=True)[:removals]
    keys = [f"held{n}" for n in present.tolist()]
    f = f_held[present]
    before = rec.from_features(f, keys)
    after = rec.from_features(remove(f, basis, i, codes_held[present]), keys)
    top_b, top_a = _read(ext, before), _read(ext, after)
    for j, n in enumerate(present.tolist()):
        y = int(held_labels[n])
        row += [tile(before[j, 0], [f"class {y}", f"rec {int(top_b[j, 0])}"]),
                tile(after[j, 0], [f"without {i}", f"rec {int(top_a[j, 0])}"])]
    drops = imp["removal"][i]
    ranked = [c for c in drops.argsort(descending=True).tolist() if torch.isfinite(drops[c])][:TOP_CLASSES]
    _, _, probs = predict(ext.logits_from_features(f_held[present]))
    entry = {"concept": i, "top_classes": ", ".join(f"{c} ({drops[c]:+.2f})" for c in ranked),
             "classes": ranked, "removal_top": float(drops[ranked[0]]) if ranked else None,
             "gradient_top": float(imp["gradient"][i, ranked[0]]) if ranked else None,
             "active_share": float((codes_fit[:, i] > 0).float().mean()),
             "exemplars": " ".join(fit_names[n] for n in order.tolist()),
             "removal_shown": [{"held_index": n, "label": int(held_labels[n]), "rec_before": int(top_b[j, 0]),
                                "rec_after": int(top_a[j, 0]), "p_label": float(probs[j, int(held_labels[n])])}
                               for j, n in enumerate(present.tolist())]}
    return row, entry
