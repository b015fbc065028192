"""The analyses as labelled pictures and tables: what ``featinv steer``, ``compose`` and ``perturb`` write.

Each ``*_report`` takes the model pair and input images, runs the analysis with fixed seeds and returns
``(picture, table, markdown)``; the table is JSON-ready. Reconstructions run in fixed-size chunks
(:data:`FIXED_BATCH`), so a row's pixels never depend on what else is in the call: α = 0, the ends of an
interpolation and a clean input reproduce the plain reconstruction bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from featinv.analysis.common import grid, heat_tiles, markdown_table, predict, tile
from featinv.analysis.compose import (
    arithmetic,
    feature_cosine,
    interpolate,
    keep_channels,
    paste,
    remove_channels,
    top_channels,
)
from featinv.analysis.perturb import corrupt, default_step_size, pgd
from featinv.analysis.steering import feature_scale, steer, steer_and_reconstruct
from featinv.diffusion.reconstruct import Reconstructor
from featinv.metrics import read_back
from featinv.pair import Pair

FIXED_BATCH = 8
ALPHA_UNIT = "α in units of the input's mean per-location feature norm"
LEVEL_UNIT = "level: qX = the X quantile of the concept's non-zero codes, a number = a code in feature units"


def count(n: int, noun: str) -> str:
    """``1 input``, ``3 inputs``."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def reconstructor(pair: Pair) -> Reconstructor:
    return Reconstructor(pair.model, pair.extractor, pair.sample_config, fixed_batch=FIXED_BATCH)


def _label(logits: torch.Tensor) -> str:
    """(classes,) logits -> 'top-1 (probability)'."""
    top, p, _ = predict(logits[None])
    return f"{int(top)} ({p.item():.2f})"


def sample_block(lead: Sequence[Image.Image | None], samples: torch.Tensor,
                 captions: Sequence[Sequence[Sequence[str]]]) -> list[list[Image.Image | None]]:
    """lead tiles + samples (N, K, 3, H, W) -> K rows (lead tiles on the first) and, for K > 1, a row of
    per-pixel spread maps (featinv.diffusion.reconstruct.uncertainty). captions[n][k]: the lines of tile (n, k)."""
    n, k = samples.shape[:2]
    gap = [None] * len(lead)
    rows = [(list(lead) if i == 0 else gap) + [tile(samples[j, i], captions[j][i]) for j in range(n)]
            for i in range(k)]
    if k > 1:
        rows.append(gap + heat_tiles(samples.cpu()))
    return rows


# ----- steering ------------------------------------------------------------------------------------

def order_alphas(alphas: Sequence[float]) -> list[float]:
    """α = 0 first (the plain reconstruction), then the others ascending; duplicates dropped."""
    rest = sorted({float(a) for a in alphas} - {0.0})
    return [0.0] + rest


def _strip_rows(column: str, values: Sequence, feats, edited, feats_r, logits_s, logits_r, direction, target
                ) -> list[dict]:
    """The table of a strip, a row per column of ``edited`` (B, A, C, h, w): the shift along the direction (if any)
    and the target's probability and top-1 share (if any), on the edited features and the reconstructions'."""
    rows = [{column: v} for v in values]
    if direction is not None:
        d = direction.to(feats).view(1, -1, 1, 1)
        scale = feature_scale(feats)
        proj = lambda f: (f * d).sum(dim=-3).mean(dim=(-2, -1))  # noqa: E731 -- (..., C, h, w) -> (...)
        base = proj(feats)
        shift_s = (proj(edited) - base[:, None]) / scale[:, None]
        shift_r = (proj(feats_r) - base[:, None, None]) / scale[:, None, None]
        for j, row in enumerate(rows):
            row.update(shift_features=shift_s[:, j].mean().item(), shift_reconstruction=shift_r[:, j].mean().item())
    if target is not None:
        for j, row in enumerate(rows):
            ps, pr = logits_s[:, j].softmax(-1)[..., target], logits_r[:, j].softmax(-1)[..., target]
            row.update(target_prob_features=ps.mean().item(), target_prob_reconstruction=pr.mean().item(),
                       target_features_share=(logits_s[:, j].argmax(-1) == target).float().mean().item(),
                       target_reconstruction_share=(logits_r[:, j].argmax(-1) == target).float().mean().item())
    return rows


def _strip_picture(ext, images, names, samples, logits_r, captions) -> tuple[list, list[str]]:
    """Per input: its tile, then its samples (B, A, K, 3, H, W) a column each, captioned -> (picture rows, labels)."""
    picture_rows, labels = [], []
    logits_in = ext.classify(images)
    k = samples.shape[2]
    for i in range(len(samples)):
        lead = [tile(images[i], ["input", _label(logits_in[i])])]
        caps = [[[caption, "rec " + _label(logits_r[i, j, s])] for s in range(k)] for j, caption in enumerate(captions)]
        block = sample_block(lead, samples[i], caps)
        picture_rows += block
        labels += [names[i]] + [""] * (len(block) - 1)
    return picture_rows, labels


@torch.no_grad()
def steer_report(pair: Pair, images: torch.Tensor, names: Sequence[str], direction: torch.Tensor | None,
                 alphas: Sequence[float] = (), target: int | None = None, mask: torch.Tensor | None = None,
                 clamp=None, description: str = "", *, edited: torch.Tensor | None = None,
                 levels: Sequence[str] = (), extra: dict | None = None) -> tuple[Image.Image, dict, str]:
    """Steer each input's feature map along ``direction`` for every α and reconstruct with the same seeds.

    target: the class steered towards (its probability is reported), if any. Per α the table gives the
    target's probability and top-1 share on the steered features and on the reconstructions' features, and
    the shift along the direction (⟨f, d⟩ averaged over locations, minus the input's, in units of its
    feature norm) for both: does the picture carry what the features were moved towards?

    Or a strip of maps edited otherwise (a code edit, :func:`featinv.analysis.directions.edit_maps`): ``edited``
    (B, 1 + L, C, h, w), the inputs' unedited maps first, one column per entry of ``levels`` (L labels, e.g. 'q0.9');
    direction None (no shift columns); ``extra``: more entries for the JSON table."""
    ext, rec = pair.extractor, reconstructor(pair)
    keys = [f"{i}:{n}" for i, n in enumerate(names)]
    if edited is None:
        alphas = order_alphas(alphas)
        feats = rec.features(images)
        edited = steer(feats, direction.to(feats), alphas, mask, clamp)                # (B, A, C, h, w)
        column, values, captions = "alpha", alphas, [f"alpha={a:g}" for a in alphas]
    else:
        feats = edited[:, 0]
        column, values = "level", ["unedited", *levels]
        captions = ["unedited", *(f"level={v}" for v in levels)]
    samples = steer_and_reconstruct(rec, feats, direction, alphas, keys, steered=edited)  # (B, A, K, 3, H, W)
    b, a, k = samples.shape[:3]
    logits_s = ext.logits_from_features(edited.flatten(0, 1)).view(b, a, -1)
    feats_r, logits_r = read_back(ext, samples, clamp=True)
    rows = _strip_rows(column, values, feats, edited, feats_r, logits_s, logits_r, direction, target)
    picture_rows, labels = _strip_picture(ext, images, names, samples, logits_r, captions)
    kind = "no" if clamp is None else ("per channel and location" if clamp[0].ndim == 3 else "per channel")
    unit = ALPHA_UNIT if direction is not None else LEVEL_UNIT
    title = [f"featinv steer: {description}", f"{unit.replace('α', 'alpha')}; mask: "  # the bitmap font: no Greek
             f"{'yes' if mask is not None else 'no'}; clamp to the backbone's range: {kind}",
             "tile: rec = the classifier's top-1 (probability) on the reconstruction; same seeds in each row"
             + ("; last row: per-pixel spread over the K samples" if k > 1 else "")]
    what = "steered" if direction is not None else "edited"
    columns = [(column, "α" if column == "alpha" else "level")]
    if direction is not None:
        columns += [("shift_features", "shift along d, steered features"),
                    ("shift_reconstruction", "shift along d, reconstruction's features")]
    if target is not None:
        columns += [("target_prob_features", f"p(class {target}), {what} features"),
                    ("target_prob_reconstruction", f"p(class {target}), reconstruction"),
                    ("target_features_share", f"top-1 = {target}, {what} features"),
                    ("target_reconstruction_share", f"top-1 = {target}, reconstruction")]
    md = (f"# featinv steer\n\n{description}; {unit}; clamp to the backbone's range: {kind}; "
          f"{count(b, 'input')} x {count(k, 'sample')}, same seeds for every {'α' if column == 'alpha' else 'level'}."
          "\n\n" + markdown_table(rows, columns))
    table = {"description": description, "target": target, f"{column}s": values, **(extra or {}),
             "inputs": list(names), "samples": k, "masked": mask is not None, "clamp": kind, "rows": rows}
    return grid(picture_rows, title, labels), table, md


# ----- composite features --------------------------------------------------------------------------

@dataclass
class Composite:
    """One composed feature map: its name, the source images shown beside it, and the map (1, C, h, w)."""

    name: str
    sources: list[int]
    feats: torch.Tensor
    note: str = ""
    group: str = ""


def composites(ext, feats: torch.Tensor, names: Sequence[str], ts: Sequence[float], mask: torch.Tensor,
               k: int, cls: int | None, ops: Sequence[str]) -> list[Composite]:
    """The composites ``ops`` of inputs A = 0, B = 1, C = 2 (feats (N, C, h, w)), in picture order."""
    out = []
    if "interpolate" in ops:
        path = interpolate(feats[0], feats[1], ts)
        out += [Composite(f"t={t:g}", [0, 1], path[i:i + 1], "A -> B", "interpolate") for i, t in enumerate(ts)]
    if "paste" in ops:
        out.append(Composite("A<-B in mask", [0, 1], paste(feats[:1], feats[1:2], mask), "paste", "paste"))
    if "channels" in ops:
        c = int(ext.logits_from_features(feats[:1]).argmax()) if cls is None else cls
        idx = top_channels(ext, feats[:1], c, k)
        out.append(Composite(f"keep top {k}", [0], keep_channels(feats[:1], idx), f"class {c}", "channels"))
        out.append(Composite(f"remove top {k}", [0], remove_channels(feats[:1], idx), f"class {c}", "channels"))
    if "arithmetic" in ops and len(feats) >= 3:
        out.append(Composite("A-B+C", [0, 1, 2], arithmetic(feats[:1], feats[1:2], feats[2:3]), "arithmetic",
                             "arithmetic"))
    return out


@torch.no_grad()
def compose_report(pair: Pair, images: torch.Tensor, names: Sequence[str], ts: Sequence[float],
                   mask: torch.Tensor, k_channels: int, cls: int | None = None,
                   ops: Sequence[str] = ("interpolate", "paste", "channels", "arithmetic")
                   ) -> tuple[Image.Image, dict, str]:
    """Compose the inputs' feature maps (A, B[, C] = the first inputs) and reconstruct every composite with
    the same seed. Per composite: the cosine between the reconstruction's features and the composed target,
    and the classifier's top-1 on the target (through its head) and on the reconstruction."""
    ext, rec = pair.extractor, reconstructor(pair)
    feats = rec.features(images)
    comps = composites(ext, feats, names, ts, mask, k_channels, cls, ops)
    target = torch.cat([c.feats for c in comps])
    samples = rec.from_features(target, ["compose"] * len(comps))          # one seed for every composite
    feats_r, logits_r = read_back(ext, samples, clamp=True)               # (N, K, C, h, w), (N, K, classes)
    logits_t = ext.logits_from_features(target)
    logits_in = ext.classify(images)
    rows, picture_rows, labels = [], [], []
    kk = samples.shape[1]
    for i, c in enumerate(comps):
        cos = feature_cosine(feats_r[i], target[i:i + 1].expand_as(feats_r[i]))
        top_r = logits_r[i].argmax(-1)
        top_t = int(logits_t[i].argmax())
        rows.append({"composite": f"{c.group}: {c.name}" + (f" ({c.note})" if c.note else ""),
                     "cosine": cos.mean().item(), "target_top1": _label(logits_t[i]),
                     "reconstruction_top1": _label(logits_r[i, 0]),
                     "agree_share": (top_r == top_t).float().mean().item()})
    for group in dict.fromkeys(c.group for c in comps):
        members = [i for i, c in enumerate(comps) if c.group == group]
        src = comps[members[0]].sources
        lead = [tile(images[s], [f"{'ABC'[s]}: {names[s]}"[:12], _label(logits_in[s])]) for s in src]
        lead += [None] * (3 - len(lead))
        caps = [[[comps[i].name, "rec " + _label(logits_r[i, s])] for s in range(kk)] for i in members]
        block = sample_block(lead, samples[members], caps)
        picture_rows += block
        labels += [group] + [""] * (len(block) - 1)
    title = ["featinv compose: composite feature maps of the inputs A, B, C, reconstructed with one seed",
             "tile: rec = the classifier's top-1 (probability) on the reconstruction"
             + ("; spread rows: per-pixel std over the K samples" if kk > 1 else "")]
    md = ("# featinv compose\n\nA, B, C = " + ", ".join(names[:3])
          + f"; {count(kk, 'sample')} per composite, one seed.\n\n"
          + markdown_table(rows, [("composite", "composite"), ("cosine", "feature cosine, reconstruction vs. target"),
                                  ("target_top1", "top-1 on the target (head)"),
                                  ("reconstruction_top1", "top-1 on the reconstruction"),
                                  ("agree_share", "reconstructions with the target's top-1")]))
    table = {"inputs": list(names[:3]), "samples": kk, "rows": rows}
    return grid(picture_rows, title, labels), table, md


# ----- perturbed inputs ----------------------------------------------------------------------------

@dataclass
class Attack:
    """PGD settings (featinv.analysis.perturb.pgd); step_size None: 2.5·eps/steps; target None: untargeted.

    What the default budget does to the demo classifier: benchmarks/RESULTS.md (bench_analyses)."""

    eps: float = 0.15
    steps: int = 20
    step_size: float | None = None
    target: int | None = None

    @property
    def step(self) -> float:
        return self.step_size if self.step_size is not None else default_step_size(self.eps, self.steps)


SHORT = {"gaussian_noise": "noise"}  # names that fit under a tile


def perturbations(ext, images: torch.Tensor, labels: torch.Tensor | None, corruptions: Sequence[str],
                  severities: Sequence[int], attack: Attack | None, seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    """[(name, perturbed images (N, 3, S, S))]: each corruption at each severity, then PGD if asked."""
    out = []
    for kind in corruptions:
        for s in severities:
            out.append((f"{SHORT.get(kind, kind)} s{s}", corrupt(images, kind, s, torch.Generator().manual_seed(seed))))
    if attack is not None:
        clean = ext.classify(images).argmax(1) if labels is None else labels.to(images.device)
        target = None if attack.target is None else torch.full_like(clean, attack.target)
        name = f"pgd eps={attack.eps:g}" + ("" if target is None else f" ->{attack.target}")
        out.append((name, pgd(ext, images, clean, attack.eps, attack.steps, attack.step, target)))
    return out


@torch.no_grad()
def perturb_report(pair: Pair, images: torch.Tensor, names: Sequence[str], labels: torch.Tensor | None,
                   corruptions: Sequence[str], severities: Sequence[int], attack: Attack | None
                   ) -> tuple[Image.Image, dict, str]:
    """Reconstruct clean and perturbed inputs with the same seeds. Per perturbation: accuracy (with known
    labels), how often the perturbation flips the classifier, and how often the reconstruction of the
    perturbed input is classified as the perturbed input is, and as the clean one is."""
    ext, rec = pair.extractor, reconstructor(pair)
    keys = [f"{i}:{n}" for i, n in enumerate(names)]
    variants = [("clean", images)] + perturbations(ext, images, labels, corruptions, severities, attack)
    samples = torch.stack([rec(x, keys) for _, x in variants], dim=1)     # (B, V, K, 3, H, W)
    logits_x = torch.stack([ext.classify(x) for _, x in variants], dim=1)  # (B, V, classes)
    _, logits_r = read_back(ext, samples, clamp=True)                     # (B, V, K, classes)
    pred_x, pred_r = logits_x.argmax(-1), logits_r.argmax(-1)
    rows = []
    for v, (name, _) in enumerate(variants):
        row = {"input": name, "flipped_share": (pred_x[:, v] != pred_x[:, 0]).float().mean().item(),
               "rec_as_input_share": (pred_r[:, v] == pred_x[:, v, None]).float().mean().item(),
               "rec_as_clean_share": (pred_r[:, v] == pred_x[:, 0, None]).float().mean().item()}
        if labels is not None:
            row["accuracy_share"] = (pred_x[:, v].cpu() == labels).float().mean().item()
            row["rec_accuracy_share"] = (pred_r[:, v].cpu() == labels[:, None]).float().mean().item()
        rows.append(row)
    picture_rows, row_labels = [], []
    kk = samples.shape[2]
    for i in range(len(images)):
        top = [tile(x[i], [name[:13], "in " + _label(logits_x[i, v])], lines=2) for v, (name, x) in enumerate(variants)]
        caps = [[["rec " + _label(logits_r[i, v, s])] for s in range(kk)] for v in range(len(variants))]
        block = [top] + sample_block([], samples[i], caps)
        picture_rows += block
        row_labels += [names[i], "reconstructions"] + [""] * (len(block) - 2)
    title = ["featinv perturb: inputs (first row) and their reconstructions from the classifier's features,"
             " same seeds in every column",
             "in / rec = the classifier's top-1 (probability) on the input / on its reconstruction"]
    columns = [("input", "input"), ("flipped_share", "prediction changed vs. clean"),
               ("rec_as_input_share", "reconstruction read as the input is"),
               ("rec_as_clean_share", "reconstruction read as the clean input is")]
    if labels is not None:
        columns[1:1] = [("accuracy_share", "accuracy"), ("rec_accuracy_share", "accuracy on reconstructions")]
    md = (f"# featinv perturb\n\n{count(len(images), 'input')} x {count(kk, 'sample')}; "
          f"severities {list(severities)}"
          + (f"; PGD L-inf eps {attack.eps:g}, {attack.steps} steps of {attack.step:g}"
             + ("" if attack.target is None else f", targeted at class {attack.target}") if attack else "")
          + ".\n\n" + markdown_table(rows, columns))
    table = {"inputs": list(names), "samples": kk, "severities": list(severities),
             "attack": None if attack is None else {**vars(attack), "step_size": attack.step}, "rows": rows}
    return grid(picture_rows, title, row_labels), table, md
