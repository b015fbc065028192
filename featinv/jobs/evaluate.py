"""Evaluation of a reconstruction folder with FeatInv's metrics (arXiv 2505.21032): feature cosine similarity, the
classifier's accuracy on reconstructions, agreement with its predictions on the originals, FID.

Reads the layout that :func:`featinv.jobs.reconstruct.reconstruct_folder` writes. The metrics are
:mod:`featinv.metrics` (pure functions); FID comes from torchmetrics (an established implementation) or is
reported as unavailable.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from featinv.config import EVAL_DIR, MANIFEST, BackboneConfig
from featinv.diffusion.reconstruct import uncertainty
from featinv.io import atomic_write_text
from featinv.jobs.state import RECONSTRUCTION, original_path
from featinv.metrics import backbone_outputs, compare_outputs, frechet_distance, gaussian_stats, make_fid, topk_correct
from featinv.nets.backbone import FeatureExtractor, build_backbone
from featinv.runtime import progress_bar
from featinv.visualize import heatmap, image_grid, save_png

# ----- reading the reconstruct layout -------------------------------------------------------------------

@dataclass(frozen=True)
class Record:
    """An original image and its K reconstructions."""

    class_name: str
    label: int
    stem: str
    original: Path
    reconstructions: tuple[Path, ...]


def sample_index(path: Path) -> int:
    """k of ``reconstructed_<stem>_<k>.png``."""
    return int(RECONSTRUCTION.fullmatch(path.name).group(2))


def read_layout(out_dir: str | Path) -> tuple[list[Record], list[str]]:
    """Records of ``<out>/<class>/<stem>.png`` + ``reconstructed_<stem>_<k>.png``; class list.

    Labels are indices into the sorted class list of ``manifest.json`` (the data root's classes),
    else into the sorted class folders: for ImageNet this is the standard label order."""
    out = Path(out_dir)
    manifest = out / MANIFEST
    folders = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name != EVAL_DIR and not p.name.startswith("."))
    classes = folders
    if manifest.is_file():
        classes = json.loads(manifest.read_text()).get("classes") or folders
    index = {c: i for i, c in enumerate(classes)}
    records = []
    for name in folders:
        if name not in index:
            raise ValueError(f"{out / name}: class folder not in {manifest}'s class list")
        recons: dict[str, dict[int, Path]] = {}
        for p in (out / name).glob("reconstructed_*.png"):
            m = RECONSTRUCTION.fullmatch(p.name)
            if m:
                recons.setdefault(m.group(1), {})[int(m.group(2))] = p
        for stem in sorted(recons):
            original = original_path(out, name, stem)
            if original.is_file():
                ks = sorted(recons[stem])
                records.append(Record(name, index[name], stem, original, tuple(recons[stem][k] for k in ks)))
    if not records:
        raise FileNotFoundError(f"{out}: no <class>/<stem>.png with reconstructed_<stem>_<k>.png found")
    return records, classes


def load_image(path: Path) -> torch.Tensor:
    """PNG -> (3, H, W) float32 in [0, 1]."""
    with Image.open(path) as f:
        array = np.asarray(f.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255


# ----- evaluation -------------------------------------------------------------------------------------


def load_records(batch: list[Record], unreadable: list[str]) -> tuple[list[Record], list[torch.Tensor],
                                                                    list[torch.Tensor]]:
    """The records of ``batch`` whose files all decode, with their originals and reconstructions;
    the first file that does not decode of each other record is appended to ``unreadable``."""
    good, originals, recons = [], [], []
    for r in batch:
        images = []
        for path in (r.original, *r.reconstructions):
            try:
                images.append(load_image(path))
            except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for a bad or cut-short file
                unreadable.append(f"{path} ({type(e).__name__})")
                break
        else:
            good.append(r)
            originals.append(images[0])
            recons += images[1:]
    return good, originals, recons


def _evaluate_batch(batch: list[Record], extractor: FeatureExtractor, fid_metric, pooled: dict,
                    unreadable: list[str]) -> list[dict]:
    """Per-reconstruction rows for the readable records of a batch; updates FID state and the pooled features."""
    batch, originals, recons = load_records(batch, unreadable)
    if not batch:
        return []
    originals, recons = torch.stack(originals), torch.stack(recons)
    owner = torch.tensor([i for i, r in enumerate(batch) for _ in r.reconstructions])
    f_orig, l_orig = backbone_outputs(extractor, originals)
    f_rec, l_rec = backbone_outputs(extractor, recons)
    labels = torch.tensor([r.label for r in batch])
    ks = (1, min(5, l_orig.shape[1]))
    hit_o, hit_r = topk_correct(l_orig, labels, ks), topk_correct(l_rec, labels[owner], ks)
    m = compare_outputs(f_orig[owner], l_orig[owner], f_rec, l_rec)
    pooled["original"].append(f_orig.mean(dim=(2, 3)))
    pooled["reconstruction"].append(f_rec.mean(dim=(2, 3)))
    if fid_metric is not None:
        device = fid_metric.device
        fid_metric.update(originals.to(device), real=True)
        fid_metric.update(recons.to(device), real=False)
    ks_of = [sample_index(p) for r in batch for p in r.reconstructions]
    rows = []
    for j, (i, k) in enumerate(zip(owner.tolist(), ks_of)):
        r = batch[i]
        rows.append({"class": r.class_name, "label": r.label, "image": r.stem, "k": k,
                     "cos_pooled": round(m["cos_pooled"][j].item(), 6),
                     "cos_spatial": round(m["cos_spatial"][j].item(), 6),
                     "pred_original": m["pred_original"][j].item(),
                     "pred_reconstruction": m["pred_reconstruction"][j].item(),
                     "top1": int(hit_r[1][j]), "top5": int(hit_r[ks[1]][j]), "agree": int(m["agree"][j]),
                     "original_top1": int(hit_o[1][i]), "original_top5": int(hit_o[ks[1]][i])})
    return rows


def contact_sheet(records: list[Record], rows: int = 8) -> tuple[Image.Image, float]:
    """Rows original | K reconstructions | uncertainty heat map (when K > 1) for up to ``rows`` classes.

    Heat maps share one scale, the largest per-pixel std on the sheet, which is returned."""
    classes = sorted({r.class_name for r in records})
    picks = sorted({round(i) for i in np.linspace(0, len(classes) - 1, min(rows, len(classes)))})
    chosen = [next(r for r in records if r.class_name == classes[i]) for i in picks]
    lines, heats = [], []
    for r in chosen:
        samples = torch.stack([load_image(p) for p in r.reconstructions])
        lines.append([load_image(r.original), *samples])
        heats.append(uncertainty(samples[None])[0] if len(samples) > 1 else None)
    u_max = max([h.max().item() for h in heats if h is not None], default=0.0)
    lines = [line + ([heatmap(h, vmax=u_max)] if h is not None else [])
             for line, h in zip(lines, heats)]
    size = lines[0][0].shape[-1]
    tiles = torch.zeros(len(lines), max(map(len, lines)), 3, size, size)  # short rows stay black
    for row, line in enumerate(lines):
        for col, img in enumerate(line):
            if img.shape[-2:] != (size, size):
                img = F.interpolate(img[None], size=(size, size), mode="bilinear", antialias=True)[0]
            tiles[row, col] = img
    return image_grid(tiles, pad=0), u_max  # the project's one grid and rounding rule (to_uint8)


def _summarise(rows: list[dict], pooled: dict, fid_metric, fid_note: str | None, backbone: str) -> dict:
    mean = lambda key: float(np.mean([r[key] for r in rows]))  # noqa: E731
    firsts = list({(r["class"], r["image"]): r for r in rows}.values())  # one row per original
    summary = {"images": len(firsts), "reconstructions": len(rows), "backbone": backbone,
               "cos_pooled": mean("cos_pooled"), "cos_spatial": mean("cos_spatial"),
               "top1": mean("top1"), "top5": mean("top5"), "agreement": mean("agree"),
               "original_top1": float(np.mean([r["original_top1"] for r in firsts])),
               "original_top5": float(np.mean([r["original_top5"] for r in firsts]))}
    po, pr = torch.cat(pooled["original"]), torch.cat(pooled["reconstruction"])
    # Fréchet distance in the backbone's pooled feature space (not FID): needs >= 2 samples per side.
    summary["backbone_fd"] = (frechet_distance(*gaussian_stats(po), *gaussian_stats(pr))
                              if len(po) > 1 and len(pr) > 1 else None)
    summary["fid"] = float(fid_metric.compute()) if fid_metric is not None else None
    summary["fid_note"] = fid_note
    summary["labels"] = "class index = position in the sorted class list (ImageNet: folder order)"
    return summary


def markdown(summary: dict) -> str:
    names = [("images", "original images"), ("reconstructions", "reconstructions"),
             ("cos_pooled", "cosine similarity, pooled features"), ("cos_spatial", "cosine similarity, spatial"),
             ("top1", "top-1 accuracy on reconstructions"), ("top5", "top-5 accuracy on reconstructions"),
             ("original_top1", "top-1 accuracy on originals"), ("original_top5", "top-5 accuracy on originals"),
             ("agreement", "top-1 agreement with originals"),
             ("backbone_fd", "Fréchet distance, pooled backbone features"),
             ("fid", "FID (torchmetrics, Inception-v3)")]
    lines = [f"# Evaluation ({summary['backbone']})", "", "| metric | value |", "|---|---|"]
    for key, label in names:
        v = summary[key]
        lines.append(f"| {label} | {'n/a' if v is None else (f'{v:.4f}' if isinstance(v, float) else v)} |")
    if summary["fid_note"]:
        lines += ["", summary["fid_note"]]
    if summary.get("unreadable"):
        lines += ["", f"Skipped {len(summary['unreadable'])} image(s) whose file does not decode (rerun "
                      f"`featinv reconstruct` on the folder to make them again): " + ", ".join(summary["unreadable"])]
    return "\n".join(lines) + "\n"


def evaluate_folder(out_dir: str | Path, backbone: FeatureExtractor | BackboneConfig, batch_size: int = 16,
                    fid: bool = True, device: str | None = None, fid_weights: str | None = None,
                    sheet_rows: int = 8) -> dict:
    """Evaluate a reconstruct folder; writes ``<out>/eval/{per_image.csv, summary.json, summary.md,
    contact_sheet.png}`` and returns the summary."""
    out = Path(out_dir)
    records, _ = read_layout(out)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    extractor = build_backbone(backbone) if isinstance(backbone, BackboneConfig) else backbone
    extractor = extractor.to(device).eval()
    name = backbone.name if isinstance(backbone, BackboneConfig) else type(extractor.model).__name__
    fid_metric, fid_note = make_fid(device, fid_weights) if fid else (None, "FID not requested (--no-fid)")
    rows, pooled, unreadable = [], {"original": [], "reconstruction": []}, []
    for start in progress_bar(range(0, len(records), batch_size), unit="batch", desc="evaluate"):
        rows += _evaluate_batch(records[start:start + batch_size], extractor, fid_metric, pooled, unreadable)
    if not rows:
        raise ValueError(f"{out}: no image decodes ({len(unreadable)} unreadable, e.g. {unreadable[0]})")
    summary = _summarise(rows, pooled, fid_metric, fid_note, name)
    summary["unreadable"] = unreadable  # skipped images: reported, not fatal
    bad = {u.rsplit(" (", 1)[0] for u in unreadable}
    readable = [r for r in records if not bad & {str(p) for p in (r.original, *r.reconstructions)}]
    sheet, u_max = contact_sheet(readable, sheet_rows)
    summary["contact_sheet_uncertainty_max"] = u_max
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(buf.getvalue(), out / EVAL_DIR / "per_image.csv")
    atomic_write_text(json.dumps(summary, indent=2) + "\n", out / EVAL_DIR / "summary.json")
    atomic_write_text(markdown(summary), out / EVAL_DIR / "summary.md")
    save_png(sheet, out / EVAL_DIR / "contact_sheet.png")
    return summary
