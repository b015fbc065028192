"""Training FeatInv: a thin LightningModule over the pure model, loss and sampler.

FeatInv (arXiv 2505.21032), training recipe: ε-prediction MSE, AdamW lr 1e-5, joint 15 % dropout of feature map and
prompt, only the control branch trains. Differences from the reference, on purpose:
- the frozen backbone runs on the accelerator over the whole batch (not per image in the dataset);
- frozen parameters have ``requires_grad=False``, so no weight gradients are computed for the
  ~511 M UNet decoder weights, while gradients still flow through the decoder to the residuals;
- the randomness of a step (t, noise, dropout, posterior sample) comes from a generator seeded
  by (seed, step, rank), and checkpoints carry the RNG states, so a resumed run is exact --
  also from a mid-epoch checkpoint or one written where max_steps stopped: the data position
  (shuffling epoch, batches consumed) is saved, and the resumed epoch skips the batches already trained on
  (bit for bit with ``num_workers=0``; with workers the data order is still exact, but the workers'
  augmentation RNGs start afresh after a resume).
"""
from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from featinv.checkpoint.config_file import to_dict
from featinv.config import SampleConfig, TrainConfig
from featinv.data import ImageDataset, UnreadableImagesError, data_source, make_loader, too_few_images
from featinv.diffusion.schedule import alphas_cumprod, eps_loss
from featinv.io import atomic_write_text
from featinv.nets.backbone import FeatureExtractor
from featinv.nets.model import FeatInv


class FeatInvModule(pl.LightningModule):
    """Trains ``model.control`` (and optionally the UNet decoder) on a frozen backbone's features."""

    def __init__(self, model: FeatInv, backbone: FeatureExtractor, cfg: TrainConfig,
                 run_dir: str | Path | None = None):
        super().__init__()
        self.model, self.backbone, self.cfg = model, backbone, cfg
        self.run_dir = Path(run_dir) if run_dir else None
        model.requires_grad_(False)
        backbone.requires_grad_(False)
        model.control.requires_grad_(True)
        if cfg.unlock_decoder:  # reference sd_locked=False; the UNet encoder stays frozen either way
            model.unet.output_blocks.requires_grad_(True)
            model.unet.out.requires_grad_(True)
        self.register_buffer("alphas_cumprod", alphas_cumprod(model.cfg.diffusion), persistent=False)
        self.strict_loading = False  # checkpoints hold only the trainable weights (checked on load)
        self.skipped_images = 0

    def trainable_keys(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def step_generator(self) -> torch.Generator:
        """Randomness of this step, a function of (seed, global step, rank) only.

        hash() of a tuple of ints is unsalted and the same in every process (see featinv.runtime)."""
        seed = hash((self.cfg.seed, self.global_step, self.global_rank)) % (2 ** 63)
        return torch.Generator(device=self.device).manual_seed(seed)

    def training_step(self, batch: dict, batch_idx: int):
        self.skipped_images += int(batch["skipped"])
        self.log("train/skipped_images", float(self.skipped_images), reduce_fx="sum", sync_dist=False)
        g = self.step_generator()
        with torch.no_grad():
            feats = self.backbone(batch["feat_input"])
            latents = self.model.encode_images(batch["image"], generator=g)
        b = latents.shape[0]
        drop = torch.rand(b, generator=g, device=self.device) < self.cfg.drop_prob  # joint dropout
        feats = feats * (~drop).to(feats.dtype)[:, None, None, None]
        context = self.model.text_context(["" if d else self.cfg.prompt for d in drop.tolist()])
        t = torch.randint(0, len(self.alphas_cumprod), (b,), generator=g, device=self.device)
        noise = torch.randn(latents.shape, generator=g, device=self.device, dtype=latents.dtype)
        loss = eps_loss(lambda x, tt: self.model(x, tt, context, feats), latents, t, noise, self.alphas_cumprod)
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        return loss

    def configure_optimizers(self):
        # fused: one kernel for all parameters (CPU and CUDA) instead of a loop over the tensors
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.cfg.lr, fused=True)

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        every = self.cfg.log_images_every
        if every and self.global_step % every == 0 and self.trainer.is_global_zero:
            self.log_images(batch)

    @torch.no_grad()
    def log_images(self, batch: dict) -> Path | None:
        """Originals next to reconstructions (``log_images_steps`` sampler steps) as a PNG grid, on the CPU."""
        from featinv.diffusion.reconstruct import Reconstructor
        from featinv.visualize import image_grid, save_png

        n = min(self.cfg.log_images_count, batch["index"].numel())
        was_training = self.model.training
        self.model.eval()
        rec = Reconstructor(self.model, self.backbone, SampleConfig(steps=self.cfg.log_images_steps))
        keys = [f"log{i}" for i in range(n)]
        samples = rec(batch["feat_input"][:n], keys)[:, 0].float().cpu()  # (n, 3, H, W) in [0, 1]
        self.model.train(was_training)
        originals = (batch["image"][:n].float().cpu() + 1) / 2
        grid = image_grid(torch.stack([originals, samples], dim=1))
        path = None
        if self.run_dir is not None:
            path = save_png(grid, self.run_dir / "images" / f"step{self.global_step:08d}.png")
        if self.logger is not None and hasattr(self.logger, "log_image"):  # e.g. WandbLogger
            self.logger.log_image("samples", [grid], step=self.global_step)
        return path

    def on_train_end(self) -> None:
        """Check that every rank ends with the same trainable weights (a silent DDP failure otherwise)."""
        params = [p.detach().double() for p in self.parameters() if p.requires_grad]
        mine = torch.stack([sum(p.sum() for p in params), sum(p.square().sum() for p in params)])
        prints = self.all_gather(mine).reshape(-1, 2).tolist()
        if self.trainer.is_global_zero and self.run_dir is not None:
            report = {"world_size": self.trainer.world_size, "fingerprints": prints}
            atomic_write_text(json.dumps(report), self.run_dir / "ddp_check.json")
        if any(fp != prints[0] for fp in prints):
            raise RuntimeError(f"ranks ended with different weights (sum, sum of squares per rank: {prints})")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self.trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["featinv"] = {"model": to_dict(self.model.cfg), "train": to_dict(self.cfg)}
        checkpoint["rng"] = {"torch": torch.get_rng_state(), "numpy": _numpy_state(),
                             "python": random.getstate(),
                             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        missing = self.trainable_keys() - set(checkpoint["state_dict"])
        if missing:
            raise KeyError(f"training checkpoint lacks {len(missing)} trainable weight(s), e.g. {sorted(missing)[:3]}; "
                           "was it written with another train.unlock_decoder setting?")
        saved = checkpoint.get("featinv", {}).get("model", {}).get("adapter", {}).get("pooled", False)
        if saved != self.model.cfg.adapter.pooled:
            raise ValueError(f"training checkpoint was written with model.adapter.pooled={str(saved).lower()}, "
                             f"this run has model.adapter.pooled={str(self.model.cfg.adapter.pooled).lower()}; "
                             "resume it with the setting it started with (or start a new --run-dir)")
        self._resume_rng = checkpoint.get("rng")

    def on_train_start(self) -> None:
        # Restore the RNG states here, the last moment before data is fetched: Lightning draws
        # random numbers between loading a checkpoint and starting the loop.
        rng, self._resume_rng = getattr(self, "_resume_rng", None), None
        if rng:
            torch.set_rng_state(rng["torch"])
            kind, keys, pos, has_gauss, gauss = rng["numpy"]
            np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
            random.setstate(rng["python"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])


def _numpy_state() -> tuple:
    """numpy's RNG state with its key array as a tensor, so checkpoints load with weights_only=True."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)


class _ResumeSampler(Sampler[int]):
    """A DistributedSampler driven by the data position: each pass shuffles with the position's
    epoch and starts after the batches already consumed in it (then whole passes again)."""

    def __init__(self, sampler: DistributedSampler, loader: _Loader):
        self.sampler, self.loader = sampler, loader

    def __iter__(self):
        epoch, skip = self.loader.start_pass(len(self.sampler))
        self.sampler.set_epoch(epoch)
        return itertools.islice(iter(self.sampler), skip, None)

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        """Ignored: Lightning's epoch counter is not the data's after a run stopped by max_steps
        (that checkpoint records the next epoch); the position saved with the data is."""


NAMED_FILES = 3  # unreadable files an error names; the others it counts


class _Loader(pl.LightningDataModule):
    """Per-rank shuffling with an epoch-seeded DistributedSampler (also for one process), resumable exactly.

    The data position -- the shuffling epoch and the batches consumed in it -- is counted here, one
    per batch the training loop receives (one optimizer step each), and saved in checkpoints, so a
    resumed run continues the same order where the checkpoint left it, however the run stopped (epoch
    end, mid-epoch checkpoint, max_steps, a kill).

    Too few readable images stop training (:class:`~featinv.data.UnreadableImagesError`, one line naming
    the data root and the unreadable files) before the batch that shows it trains: a batch without one,
    or a dataset whose files not found unreadable so far make no full batch per device. The unreadable
    files are those the batches name (``unreadable``; nothing is decoded twice), on this rank, in this
    session."""

    def __init__(self, dataset: Dataset, batch_size: int, num_workers: int, seed: int, root: str = ""):
        super().__init__()
        self.dataset, self.batch_size, self.num_workers, self.seed = dataset, batch_size, num_workers, seed
        self.root = root  # the data root, which errors name
        self.position: dict[str, int] | None = None  # {"epoch", "batches"}; None: not yet started or restored
        self.unreadable: set[int] = set()  # dataset indices of the files found unreadable

    def state_dict(self) -> dict[str, int]:
        return dict(self.position or {"epoch": 0, "batches": 0})

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}

    def start_pass(self, samples_per_rank: int) -> tuple[int, int]:
        """(epoch, samples to skip) of a new pass over the data; a finished epoch rolls over to the next."""
        if self.position is None:  # fresh run, or a checkpoint older than the saved position
            steps = self.trainer.global_step  # then: one optimizer step per batch
            per_epoch = max(1, samples_per_rank // self.batch_size)
            self.position = {"epoch": steps // per_epoch, "batches": steps % per_epoch}
        if self.position["batches"] * self.batch_size + self.batch_size > samples_per_rank:  # no full batch left
            self.position = {"epoch": self.position["epoch"] + 1, "batches": 0}
        return self.position["epoch"], self.position["batches"] * self.batch_size

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.trainer.training:
            self.position["batches"] += 1
            self.count_images(batch)
        return batch

    def count_images(self, batch: dict) -> None:
        """Remember the batch's unreadable files; UnreadableImagesError when the other files make no full
        batch per device, or when the batch holds no readable image."""
        self.unreadable.update(batch["unreadable"])
        skipped = len(self.unreadable)
        problem = too_few_images(len(self.dataset) - skipped, self.batch_size, self.root, self.trainer.world_size,
                                 skipped)
        if problem is None and batch["index"].numel() == 0:
            problem = f"{data_source(self.root)}: no readable image in a training batch (skipping {skipped} unreadable)"
        if problem:
            raise UnreadableImagesError(f"{problem}; fix or remove them: {self.unreadable_files()}")

    def unreadable_files(self) -> str:
        """The files found unreadable as errors name them: ``a, b, c and 4 more``."""
        shown = [self.file_name(i) for i in sorted(self.unreadable)[:NAMED_FILES]]
        more = len(self.unreadable) - len(shown)
        return ", ".join(shown) + (f" and {more} more" if more else "")

    def file_name(self, index: int) -> str:
        """Dataset item ``index`` as errors name it: its file, relative to the data root when below it."""
        if not isinstance(self.dataset, ImageDataset):
            return f"item {index}"
        path = Path(self.dataset.items[index][0])
        return str(path.relative_to(self.root)) if self.root and path.is_relative_to(self.root) else str(path)

    def train_dataloader(self):
        sampler = DistributedSampler(self.dataset, num_replicas=self.trainer.world_size,
                                     rank=self.trainer.global_rank, shuffle=True, seed=self.seed, drop_last=True)
        return make_loader(self.dataset, self.batch_size, self.num_workers, seed=self.seed,
                           drop_last=True, sampler=_ResumeSampler(sampler, self))


