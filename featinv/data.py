"""Image folders, the reference training/eval transforms and a loader that skips bad files.

One crop per image feeds both sides of FeatInv (paper: "Training"): the backbone input at the
backbone's resolution in [0, 1] (the backbone normalises itself) and the diffusion target, the same
crop resized to 256x256 in [-1, 1]. Decoding and augmentation run in DataLoader workers.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff")
UNLABELED = -1  # label of images from a plain (class-less) folder

Item = tuple[str, int]  # (image path, class index or UNLABELED)


class UnreadableImagesError(ValueError):
    """Too few readable images to train on once the unreadable files are skipped."""


def data_source(root: str) -> str:
    """How an error names the training data: ``--data ROOT``, or "the training dataset" without a root."""
    return f"--data {root}" if root else "the training dataset"


def too_few_images(n: int, batch_size: int, root: str = "", world_size: int = 1, skipped: int = 0) -> str | None:
    """Why ``n`` images (not counting ``skipped`` unreadable ones) give a rank no full training batch, as one
    line; None when every rank gets one. Batches are whole (``drop_last``, so that a resumed run sees the same
    batches), and an epoch without one would train nothing and export the initial weights."""
    if n // world_size >= batch_size:
        return None
    without = f" (skipping {skipped} unreadable)" if skipped else ""
    ranks = f" per device ({n} over {world_size} devices)" if world_size > 1 else ""
    images = f"{n} image{'s' * (n != 1)}{without}"
    return f"{data_source(root)}: {images} < data.batch_size {batch_size}{ranks}, so no training batch"


def _images_in(folder: Path) -> list[Path]:
    """Image files below ``folder`` (recursive, extension case-insensitive), sorted."""
    return sorted(p for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def find_images(root: str | Path) -> tuple[list[Item], list[str]]:
    """Images of ``<root>/<class>/<image>`` (labels = sorted class folders) or of a plain folder.

    A folder without (non-hidden) subfolders is a plain folder: every image gets label
    ``UNLABELED`` (-1) and ``class_names`` is empty, so accuracy metrics must skip such images.
    With class folders, images lying directly in ``root`` are ignored (with a warning).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.root: image folder {str(root)!r} does not exist")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if class_dirs:
        class_names = [p.name for p in class_dirs]
        items = [(str(f), i) for i, d in enumerate(class_dirs) for f in _images_in(d)]
        loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        if loose:
            warnings.warn(f"{root}: ignoring {len(loose)} images outside the class folders "
                          f"(e.g. {loose[0].name})", stacklevel=2)
    else:
        class_names = []
        items = [(str(f), UNLABELED) for f in _images_in(root)]
    if not items:
        raise FileNotFoundError(f"data.root: no images ({' '.join(IMAGE_EXTENSIONS)}) found "
                                f"in {str(root)!r} or its class folders")
    return items, class_names


def crop_transform(backbone_size: int, train: bool) -> v2.Transform:
    """PIL image -> PIL crop (S, S): reference augmentation (train) or Resize + CenterCrop (eval)."""
    if train:
        return v2.Compose([v2.RandomResizedCrop(backbone_size, antialias=True),
                           v2.RandomHorizontalFlip(0.5), v2.RandomVerticalFlip(0.5)])
    return v2.Compose([v2.Resize(backbone_size, antialias=True), v2.CenterCrop(backbone_size)])


class ImageDataset(Dataset):
    """Image folder -> dicts ``feat_input`` (3, S, S) in [0, 1], ``image`` (3, 256, 256) in [-1, 1],
    ``label`` int64, ``index``; ``None`` for an unreadable file (see :func:`collate_skip`)."""

    def __init__(self, root_or_items: str | Path | Sequence[Item], backbone_size: int,
                 image_size: int = 256, train: bool = True):
        if isinstance(root_or_items, (str, Path)):
            self.items, self.class_names = find_images(root_or_items)
        else:
            self.items, self.class_names = [(str(p), int(c)) for p, c in root_or_items], []
            if not self.items:
                raise ValueError("ImageDataset: the list of (path, label) items is empty")
        self.backbone_size = backbone_size
        self.image_size = image_size
        self.train = train
        self.crop = crop_transform(backbone_size, train)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        path, label = self.items[index]
        try:
            with Image.open(path) as f:
                pil = f.convert("RGB")  # forces a full decode, so truncated files fail here
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            warnings.warn(f"skipping unreadable image {path}: {type(e).__name__}: {e}", stacklevel=2)
            return None
        crop = TF.to_dtype(TF.to_image(self.crop(pil)), torch.float32, scale=True)  # (3, S, S) in [0, 1]
        crop = crop.as_subclass(torch.Tensor)  # plain tensor, not a tv_tensors.Image
        image = TF.resize(crop, [self.image_size] * 2, antialias=True).clamp(0, 1)
        return {"feat_input": crop, "image": image * 2 - 1, "label": torch.tensor(label),
                "index": index}


def collate_skip(batch: list[dict | None]) -> dict[str, Any]:
    """Stack the readable items; ``skipped`` = number of unreadable ones dropped from this batch.

    If every item was unreadable the batch holds zero items: ``{"skipped": n, "index": (0,),
    "label": (0,)}`` without image tensors. Callers skip it when ``batch["index"].numel() == 0``
    (a Lightning ``training_step`` returns ``None``).
    """
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        empty = torch.empty(0, dtype=torch.int64)
        return {"index": empty, "label": empty.clone(), "skipped": skipped}
    out = default_collate(good)
    out["skipped"] = skipped
    return out


class _Numbered(Dataset):
    """``(i, dataset[i])``, so that a batch can name the items it dropped."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, dict[str, Any] | None]:
        return index, self.dataset[index]


def _collate_numbered(batch: list[tuple[int, dict | None]]) -> dict[str, Any]:
    """:func:`collate_skip` of the items, plus ``unreadable``: the dataset indices of the dropped ones."""
    out = collate_skip([item for _, item in batch])
    out["unreadable"] = [i for i, item in batch if item is None]
    return out


def make_loader(dataset: Dataset, batch_size: int, num_workers: int = 0, shuffle: bool = True,
                seed: int = 0, drop_last: bool = False, sampler: Sampler | None = None) -> DataLoader:
    """DataLoader of :func:`collate_skip` batches that also list the dataset indices of their unreadable
    items (``unreadable``); the seed fixes shuffling and the workers' RNGs.

    With ``num_workers=0`` the augmentations draw from the global torch RNG (seed it yourself,
    e.g. ``lightning.seed_everything``). A ``sampler`` (e.g. a per-rank DistributedSampler)
    replaces ``shuffle``.
    """
    return DataLoader(_Numbered(dataset), batch_size=batch_size, shuffle=shuffle if sampler is None else None,
                      sampler=sampler, num_workers=num_workers,
                      collate_fn=_collate_numbered, pin_memory=torch.cuda.is_available(),
                      drop_last=drop_last, persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(seed))
