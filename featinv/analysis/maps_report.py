"""``featinv maps``' analysis: fit feature-space maps for each task (a manipulation, folder pairs, another network),
score them on held-out images, decode them with FeatInv, and draw what they do.

A :class:`MapTask` holds the input and target maps of the fit and held-out images (and the held-out images that
are decoded); :func:`fit_task_maps` fits the map types on it (the last :data:`VAL_SHARE` of the fit maps choose
ridge λ and stop the transformer); :func:`task_report` scores each map (:mod:`featinv.analysis.map_scores`) and
draws per decoded image: input | target | the target's own map decoded | each mapped map decoded.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import torch
from PIL import Image
from torch import Tensor

from featinv.analysis.common import grid, markdown_table, tile
from featinv.analysis.feature_maps import FeatureMapping, fit_map
from featinv.analysis.manipulations import manipulate
from featinv.analysis.map_scores import decoded_scores, feature_scores, linear_geometry, semantic_agreement
from featinv.metrics import read_back

VAL_SHARE = 0.15      # of the fit maps, held back to choose ridge λ and to early-stop the transformer
CHUNK = 1024          # maps per streamed batch


@dataclass
class MapTask:
    """One map to learn: input maps -> target maps, on fit and held-out images.

    fit_x/test_x: (N, C_in, h_in, w_in) input maps; fit_y/test_y: (N, C, h, w) target maps, in the decoder's
    space; before/after: the first held-out images (n, 3, S, S) in [0, 1] whose maps are decoded (input image,
    target image); keys: their names (they seed the noise); source: another network whose classifier also
    reads the reconstructions (the cross-network case), with its labels on the decoded images."""

    name: str
    fit_x: Tensor
    fit_y: Tensor
    test_x: Tensor
    test_y: Tensor
    before: Tensor
    after: Tensor
    keys: list[str]
    about: dict = field(default_factory=dict)
    source: object | None = None
    source_labels: Tensor | None = None

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9.]+", "_", self.name).strip("_")


def _maps(extractor, images: Tensor) -> Tensor:
    """Images (N, 3, S, S) in [0, 1] -> the extractor's maps (N, C, h, w) on the CPU (N = 0: an empty batch of the
    maps' shape, for a task that is only applied)."""
    if not len(images):
        return read_back(extractor, images.new_zeros(1, *images.shape[1:]))[0][:0].cpu()
    return read_back(extractor, images)[0].cpu()


def manipulation_task(extractor, spec: str, fit_images: Tensor, test_images: Tensor, names: Sequence[str],
                      n_decode: int, seed: int = 0) -> MapTask:
    """An image's map -> the map of the image after ``spec`` (featinv.analysis.manipulations), one network."""
    fit_after, test_after = manipulate(fit_images, spec, seed), manipulate(test_images, spec, seed + 1)
    return MapTask(spec, _maps(extractor, fit_images), _maps(extractor, fit_after), _maps(extractor, test_images),
                   _maps(extractor, test_after), test_images[:n_decode], test_after[:n_decode], list(names[:n_decode]),
                   about={"manipulation": spec, "seed": seed})


def pairs_task(extractor, before: Tensor, after: Tensor, names: Sequence[str], test: Tensor, n_decode: int,
               name: str = "folder pairs") -> MapTask:
    """Before/after image pairs (edited elsewhere) -> a task; ``test``: (N,) bool, the held-out pairs."""
    fx, fy = _maps(extractor, before[~test]), _maps(extractor, after[~test])
    tx, ty = _maps(extractor, before[test]), _maps(extractor, after[test])
    held = [n for n, t in zip(names, test.tolist()) if t]
    return MapTask(name, fx, fy, tx, ty, before[test][:n_decode], after[test][:n_decode], held[:n_decode],
                   about={"manipulation": name})


@torch.no_grad()
def network_task(source, target, fit_images: Tensor, test_images: Tensor, names: Sequence[str], n_decode: int,
                 source_name: str, target_name: str) -> MapTask:
    """Network B's map of an image -> the decoder's network A's map of the same image (FeatMap across networks):
    what B encodes, seen through A's decoder. B's labels on the decoded images are kept to score it."""
    shown = test_images[:n_decode]
    return MapTask(f"{source_name} -> {target_name}", _maps(source, fit_images), _maps(target, fit_images),
                   _maps(source, test_images), _maps(target, test_images), shown, shown, list(names[:n_decode]),
                   about={"source": source_name, "target": target_name}, source=source,
                   source_labels=read_back(source, shown)[1].argmax(1).cpu())


def fit_task_maps(task: MapTask, kinds: Sequence[str], device="cpu", **options) -> dict[str, FeatureMapping]:
    """Fit each map type on the task's fit maps (the last VAL_SHARE validating) -> {kind: fitted map}. ``identity``
    is skipped where the shapes differ (another network)."""
    n_val = max(1, round(VAL_SHARE * len(task.fit_x)))
    tx, ty, val = task.fit_x[:-n_val], task.fit_y[:-n_val], (task.fit_x[-n_val:], task.fit_y[-n_val:])
    same = task.fit_x.shape[1:] == task.fit_y.shape[1:]
    maps = {}
    for kind in kinds:
        if kind == "identity" and not same:
            continue
        fmap = fit_map(kind, lambda: zip(tx.split(CHUNK), ty.split(CHUNK)), val, device=device,
                       **options.get(kind, {}))
        fmap.about = dict(task.about)
        maps[kind] = fmap
    return maps


@torch.no_grad()
def task_report(pair, task: MapTask, maps: dict[str, FeatureMapping], reconstructor, show: int = 4
                ) -> tuple[list[dict], Image.Image, dict[str, list[float]]]:
    """Score each fitted map on the task's held-out maps and decode the first images -> (table rows, picture,
    {kind: singular values} of the linear maps)."""
    ext, dev = pair.extractor, pair.device
    own_rec, rows, recs, spectra = None, [], {}, {}
    for kind, fmap in maps.items():
        pred = torch.cat([fmap(x.to(dev)).cpu() for x in task.test_x.split(CHUNK)])
        row = {"task": task.name, "map": kind, **feature_scores(pred, task.test_y),
               "semantic_agreement": semantic_agreement(ext, pred.to(dev), task.test_y.to(dev))}
        n = len(task.keys)
        if n:
            scores, recs[kind], own_rec = decoded_scores(reconstructor, ext, pred[:n].to(dev), task.test_y[:n].to(dev),
                                                         task.keys, own_rec)
            row.update(scores)
            if task.source is not None:
                for which, rec in (("mapped", recs[kind]), ("own", own_rec)):
                    labels = read_back(task.source, rec)[1].argmax(1).cpu()
                    row[f"source_agreement_{which}"] = float((labels == task.source_labels).float().mean())
        if kind == "linear":
            geom = linear_geometry(fmap, task.test_x.to(dev))
            spectra[task.name] = geom.pop("singular_values")
            row.update(geom)
        row.update({k: v for k, v in fmap.fit_info.items() if k in ("ridge", "epochs", "val_r2")})
        rows.append(row)
    return rows, _picture(pair, task, recs, own_rec, show), spectra


def _caption(ext, images: Tensor, names: Sequence[str]) -> list[list[str]]:
    labels = read_back(ext, images)[1].argmax(1).tolist()
    return [[name, f"class {c}"] for name, c in zip(names, labels)]


def _picture(pair, task: MapTask, recs: dict[str, Tensor], own_rec: Tensor | None, show: int) -> Image.Image:
    """Per shown image: input | target | the target's own map decoded | each map's decoded prediction."""
    n = min(show, len(task.keys))
    ext = pair.extractor
    cross = task.source is not None
    columns = [("input", task.before[:n]), *([] if cross else [("target", task.after[:n])])]
    if own_rec is not None:
        columns.append(("own map", own_rec[:n]))
    columns += [(kind, rec[:n]) for kind, rec in recs.items()]
    captions = {name: _caption(ext, images, [name] * n) for name, images in columns}
    rows = [[tile(images[i], captions[name][i]) for name, images in columns] for i in range(n)]
    what = ("B's map mapped into A's space by each map type" if cross
            else "the input's map mapped towards the target's by each map type")
    return grid(rows, title=[f"featinv maps: {task.name}", f"columns: {', '.join(c for c, _ in columns)}",
                             f"(own map: the target's map, decoded; then {what}, decoded;",
                             " captions: the decoder's classifier's label)"])


COLUMNS = [("task", "task"), ("map", "map"), ("r2", "R²"), ("cosine", "cosine"), ("rel_error", "rel. error"),
           ("semantic_agreement", "label agreement (maps)"), ("decoded_agreement_mapped", "decoded agreement"),
           ("decoded_agreement_own", "own map decoded"), ("decoded_cosine_mapped", "decoded cosine"),
           ("ssim_to_own", "SSIM to own"), ("effective_rank", "eff. rank"), ("bias_share", "bias share"),
           ("ridge", "ridge λ"), ("epochs", "epochs")]
SOURCE_COLUMNS = [("source_agreement_mapped", "B agrees (mapped)"), ("source_agreement_own", "B agrees (A's own)")]


def maps_markdown(rows: list[dict], n_test: int, n_decoded: int) -> str:
    """The table of every task and map, with what its columns mean."""
    cols = COLUMNS + (SOURCE_COLUMNS if any("source_agreement_mapped" in r for r in rows) else [])
    return (markdown_table(rows, cols) +
            f"\nFeature-space scores on {n_test} held-out images; decoded scores on the first {n_decoded} (one sample "
            "each, the same seeds for the mapped and the own map). R²: of the target maps, around their channel "
            "means; label agreement: the classifier's head on mapped maps vs on the target maps; decoded agreement: "
            "its label on the reconstruction vs on the target image; SSIM to own: the mapped map's reconstruction "
            "against the own map's (LPIPS, which FeatMap also reports, is not measured: its weights cannot be had "
            "offline); bias share: |b| / (|W·x| + |b|), mean over positions.\n")
