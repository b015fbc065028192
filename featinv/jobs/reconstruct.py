"""The ImageNet-val folder job: reconstruct the first N images of every class folder into an output
folder, resumably, on one or many devices (Lightning prediction); what ``featinv reconstruct`` runs.

Layout written: ``<out>/<class>/<stem>.png`` (the crop at the model's image size),
``<out>/<class>/reconstructed_<stem>_<k>.png`` and ``<out>/manifest.json``.
"""
from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from featinv.checkpoint.config_file import to_dict
from featinv.config import MANIFEST, ReconstructJob
from featinv.data import ImageDataset, find_images
from featinv.diffusion.reconstruct import Reconstructor
from featinv.io import atomic_write_text, check_writable
from featinv.jobs.state import (
    check_same_settings,
    checkpoint_identity,
    clear_outputs,
    drop_undecodable,
    original_path,
    read_manifest,
    reconstruction_path,
)
from featinv.nets.backbone import FeatureExtractor
from featinv.nets.model import FeatInv
from featinv.pair import check_channels, load_resolved, resolve_source
from featinv.runtime import progress_bar, quiet_lightning, resolve_precision, stderr_line
from featinv.visualize import save_png  # module attribute: tests wrap it to count writes

_note0 = rank_zero_only(stderr_line)  # one copy of the job's notes (stderr: stdout keeps results) under DDP


@dataclass(frozen=True)
class FolderItem:
    """One source image of the job and where its outputs go."""

    path: str
    label: int
    class_name: str
    stem: str

    @property
    def key(self) -> str:
        return f"{self.class_name}/{self.stem}"

    def outputs(self, out: Path, k: int) -> list[Path]:
        """[original, reconstruction 0, ..., reconstruction K-1] under ``out``."""
        return ([original_path(out, self.class_name, self.stem)]
                + [reconstruction_path(out, self.class_name, self.stem, i) for i in range(k)])

    def complete(self, out: Path, k: int) -> bool:
        return all(p.exists() for p in self.outputs(out, k))


def plan_items(root: str | Path, per_class: int | None = 10) -> tuple[list[FolderItem], list[str]]:
    """The first ``per_class`` images (sorted) of every class folder of ``root`` (all if None or 0)."""
    paths, class_names = find_images(root)
    if not class_names:
        raise ValueError(f"--data: {str(root)!r} has no class folders; expected <root>/<class>/<image>")
    by_class: dict[int, list[str]] = defaultdict(list)
    for path, label in paths:
        by_class[label].append(path)
    items = []
    for label in sorted(by_class):
        chosen = by_class[label][:per_class] if per_class else by_class[label]
        stems = [Path(p).stem for p in chosen]
        dupes = sorted({s for s in stems if stems.count(s) > 1})
        if dupes:
            raise ValueError(f"--data: class {class_names[label]!r} has several images named {dupes[0]!r}.*; "
                             "output names are <stem>.png, so stems must be unique per class")
        items += [FolderItem(p, label, class_names[label], s) for p, s in zip(chosen, stems)]
    return items, class_names


class RankStridedSampler(Sampler[int]):
    """Indices rank, rank+W, ... of n items, minus those ``keep`` rejects; never pads or repeats.

    (Lightning's DistributedSampler pads with duplicates, which would write some files twice.)"""

    def __init__(self, n: int, rank: int, world_size: int, keep=None):
        self.indices = [i for i in range(rank, n, world_size) if keep is None or keep(i)]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class _Indexed(Dataset):
    """Pairs each item of ``ImageDataset`` with its index, so unreadable ones stay identifiable."""

    def __init__(self, dataset: ImageDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return i, self.dataset[i]


def _collate(batch: list) -> dict:
    good = [(i, d) for i, d in batch if d is not None]
    out = default_collate([d for _, d in good]) if good else {}
    out["index"] = torch.tensor([i for i, _ in good], dtype=torch.int64)
    out["unreadable"] = [i for i, d in batch if d is None]
    return out


class ReconstructionPredictor(pl.LightningModule):
    """Lightning prediction: each rank reconstructs its stride of the items and writes their PNGs."""

    def __init__(self, reconstructor: Reconstructor, items: list[FolderItem], out: str | Path,
                 backbone_size: int, batch_size: int = 8, num_workers: int = 0):
        super().__init__()
        self.model, self.backbone = reconstructor.model, reconstructor.backbone  # moved by the Trainer
        self.reconstructor = reconstructor
        self.items, self.out = items, Path(out)
        self.backbone_size, self.batch_size, self.num_workers = backbone_size, batch_size, num_workers
        self.allow_zero_length_dataloader_with_multiple_devices = True  # a rank may have nothing left
        self._bar = None

    def predict_dataloader(self) -> DataLoader:
        k = self.reconstructor.cfg.num_samples
        sampler = RankStridedSampler(len(self.items), self.trainer.global_rank, self.trainer.world_size,
                                     keep=lambda i: not self.items[i].complete(self.out, k))
        dataset = ImageDataset([(it.path, it.label) for it in self.items], self.backbone_size,
                               image_size=self.model.cfg.image_size, train=False)
        if self.trainer.is_global_zero:
            self._bar = progress_bar(total=len(sampler), unit="img",
                                     desc=f"reconstruct (rank 0 of {self.trainer.world_size})")
        return DataLoader(_Indexed(dataset), batch_size=self.batch_size, sampler=sampler,
                          num_workers=self.num_workers, collate_fn=_collate)

    def predict_step(self, batch: dict, batch_idx: int) -> int:
        """Reconstruct and write one batch; returns the number of source images done."""
        items = [self.items[i] for i in batch["index"].tolist()]
        if items:
            samples = self.reconstructor(batch["feat_input"], [it.key for it in items])
            for item, original, recons in zip(items, (batch["image"] + 1) / 2, samples):
                # Only missing files are written: a resumed item keeps its existing files untouched.
                for path, image in zip(item.outputs(self.out, len(recons)), [original, *recons]):
                    if not path.exists():
                        save_png(image, path)
        if self._bar is not None:
            self._bar.update(len(items) + len(batch["unreadable"]))
        return len(items)  # not None: Lightning warns about None; return_predictions=False keeps nothing

    def on_predict_end(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _write_manifest(out: Path, items: list[FolderItem], k: int, done_before: int, info: dict) -> dict:
    """Summarise the folder from what is on disk: an incomplete item after a finished run was unreadable.

    ``verified``: the items whose files are known to decode (checked, or written by this job), which
    a later run does not check again."""
    missing = [it for it in items if not it.complete(out, k)]
    manifest = {**info, "status": "finished", "items": len(items), "complete": len(items) - len(missing),
                "already_complete": done_before, "reconstructed": len(items) - len(missing) - done_before,
                "unreadable": [it.path for it in missing],
                "verified": [it.key for it in items if it not in missing]}
    atomic_write_text(json.dumps(manifest, indent=2) + "\n", out / MANIFEST)
    return manifest


def _prepare_folder(out: Path, items: list[FolderItem], k: int, info: dict, previous: dict | None,
                    overwrite: bool, rank: int) -> set[str]:
    """Start the folder over (``overwrite``, rank 0) or check that it holds this job; make outputs that do
    not decode missing. Returns the keys of the items whose files the manifest records as whole."""
    if overwrite:
        if rank == 0:
            removed = clear_outputs(out)
            _note0(f"--overwrite: deleted {len(removed)} file(s) of the earlier job from {out} (its originals, "
                   "reconstructions, eval/ and manifest.json)")
        previous = None
    else:
        check_same_settings(out, previous, info, items, k)
    verified = set(previous.get("verified", [])) if previous else set()
    redo = drop_undecodable(out, items, k, verified)
    if redo:
        _note0(f"note: {len(redo)} output file(s) in {out} do not decode (e.g. {redo[0]}); they are made again")
    return verified


def reconstruct_folder(job: ReconstructJob, *, model: FeatInv | None = None,
                       extractor: FeatureExtractor | None = None) -> dict:
    """Run ``job``: reconstruct the first ``per_class`` images of each class of ``job.data`` into ``job.out``
    (resumable); returns the manifest. ``model`` / ``extractor``: Python objects instead of the job's
    checkpoint / backbone (then the manifest records none for them).

    Layout: ``<out>/<class>/<stem>.png`` (the Resize+CenterCrop crop at the model's image size) and
    ``<out>/<class>/reconstructed_<stem>_<k>.png``; ``<out>/manifest.json``.
    A folder holds one job: rerun with other settings (checkpoint, backbone, sampling, per_class) it
    refuses, naming the setting, unless ``overwrite`` deletes the earlier job's files first. Outputs
    that do not decode count as missing (see :func:`drop_undecodable`).
    Pixels are bitwise reproducible for one batch size, device and software stack, whatever the
    resume history or number of ranks (see :class:`Reconstructor` ``fixed_batch``)."""
    if model is not None and extractor is None:
        raise ValueError("reconstruct_folder: a model object needs its extractor too")
    resolved = None if model is not None else resolve_source(job.source, need_backbone=extractor is None)
    items, class_names = plan_items(job.data, job.per_class)
    out, k = check_writable(job.out, "out"), job.sample.num_samples
    out.mkdir(parents=True, exist_ok=True)
    rank = getattr(rank_zero_only, "rank", 0)  # set by Lightning from RANK / LOCAL_RANK / SLURM_PROCID
    previous = read_manifest(out)
    ckpt_name = str(resolved.weights) if resolved else None
    bcfg = resolved.backbone if resolved and extractor is None else None
    info = {"checkpoint": ckpt_name, "checkpoint_file": checkpoint_identity(ckpt_name, previous) if ckpt_name else None,
            "data": str(job.data), "per_class": job.per_class, "classes": class_names,
            "sample": dataclasses.asdict(job.sample), "backbone": to_dict(bcfg) if bcfg else None,
            "batch_size": job.batch_size}  # not compared: it moves at most a few pixels by 1/255 (Reconstructor)
    if resolved and resolved.minisd:  # a control branch shipped alone: its miniSD is part of the model
        known = {"checkpoint_file": (previous or {}).get("minisd_file")}
        info["minisd_file"] = checkpoint_identity(resolved.minisd, known) if Path(resolved.minisd).is_file() \
            else {"path": str(resolved.minisd)}
    verified = _prepare_folder(out, items, k, info, previous, job.overwrite, rank)
    done_before = sum(it.complete(out, k) for it in items)
    if done_before == len(items):  # nothing to do: no model is loaded
        _note0(f"all {len(items)} items in {out} are complete")
        return _write_manifest(out, items, k, done_before, info) if rank == 0 else info

    if model is None:
        pair = load_resolved(resolved, extractor=extractor)  # checks the channels
        model, extractor = pair.model, pair.extractor
    else:
        check_channels(extractor, model)
    s = job.sample
    _note0(f"reconstructing {len(items) - done_before} of {len(items)} items into {out}: {s.sampler}, {s.steps} "
           f"steps, guidance {s.guidance_scale}, {s.num_samples} sample(s) per image, seed {s.seed}")
    if rank == 0:  # the settings are on disk before any image is: a killed job's folder still says them
        atomic_write_text(json.dumps({**info, "status": "running", "verified": sorted(verified)}, indent=2) + "\n",
                          out / MANIFEST)
    # fixed_batch: pixels do not depend on which items share a batch (resume, rank split, last batch)
    reconstructor = Reconstructor(model, extractor, job.sample, fixed_batch=job.batch_size)
    predictor = ReconstructionPredictor(reconstructor, items, out, extractor.image_size, job.batch_size,
                                        job.num_workers)
    precision = resolve_precision(job.precision, job.accelerator)
    quiet_lightning()
    trainer = pl.Trainer(accelerator=job.accelerator, devices=job.devices, num_nodes=job.num_nodes,
                         strategy=job.strategy, precision=precision, use_distributed_sampler=False, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.predict(predictor, return_predictions=False)
    trainer.strategy.barrier("featinv-reconstruct")  # every rank's files are on disk before the manifest
    info.update(precision=precision, world_size=trainer.world_size)
    return _write_manifest(out, items, k, done_before, info) if trainer.is_global_zero else info
