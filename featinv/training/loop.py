"""``train()``: the Lightning trainer around :class:`~featinv.training.module.FeatInvModule` on one CPU to
many GPUs, with atomic checkpoints, resume from the newest loadable one, and the exported weights file."""
from __future__ import annotations

import dataclasses
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities import rank_zero_only
from safetensors import SafetensorError, safe_open
from torch.utils.data import Dataset

from featinv.checkpoint.load import config_from_metadata, load_featinv, save_featinv
from featinv.config import RUN_CONFIG, WEIGHTS_FILE, FeatInvConfig
from featinv.data import ImageDataset, too_few_images
from featinv.io import atomic_save, atomic_write_text
from featinv.nets.backbone import FeatureExtractor, build_backbone
from featinv.nets.model import FeatInv
from featinv.runtime import quiet_lightning, resolve_precision, stderr_line
from featinv.training.module import FeatInvModule, _Loader
from featinv.training.progress import progress_to_stderr
from featinv.training.run_config import check_resumed_config


@dataclass(frozen=True)
class TrainRun:
    """How :func:`train` runs (what it trains is the FeatInvConfig): Lightning's trainer settings, resume,
    progress bar."""

    accelerator: str = "auto"              # Lightning's
    devices: int | str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    resume: str | Path | None = None       # a Lightning checkpoint; "auto": the newest of the run's that loads
    accept_changes: tuple[str, ...] = ()   # config fields a resumed run may change (check_resumed_config)
    progress: bool = True                  # Lightning's progress bar


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temporary file beside the target, then renamed onto it.

    Lightning's own writer stages the file in the system temp folder and *moves* it: across file
    systems that is a copy, and a full disk during it leaves a truncated ``last.ckpt`` behind."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's fsspec writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_save(lambda tmp: torch.save(checkpoint, tmp), path)


def _loadable(path: Path) -> str | None:
    """None if ``path`` is a Lightning checkpoint that loads, else why it does not (one line)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # any failure to read means: do not resume from it
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'file is empty or cut short'}"
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        return "not a Lightning training checkpoint (no state_dict / global_step)"
    return None


def latest_checkpoint(folder: str | Path, log=print) -> Path | None:
    """The newest checkpoint in ``folder`` that loads (``last.ckpt`` first among equals); each one
    skipped because it does not load (e.g. cut short by a full disk) is named in one ``log`` line."""
    files = [p for p in Path(folder).glob("*.ckpt") if p.is_file()] if Path(folder).is_dir() else []
    for path in sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt"), reverse=True):
        problem = _loadable(path)
        if problem is None:
            return path
        log(f"note: not resuming from {path}: it does not load ({problem})")
    return None


def check_enough_images(n: int, batch_size: int, root: str = "", world_size: int = 1) -> None:
    """ValueError unless every rank gets one full batch of the ``n`` image files (see
    :func:`~featinv.data.too_few_images`); during training the files found unreadable are subtracted."""
    problem = too_few_images(n, batch_size, root, world_size)
    if problem:
        raise ValueError(f"{problem}; add images, or pass data.batch_size={max(1, n // world_size)}")


def effective_config(cfg: FeatInvConfig, channels: int) -> FeatInvConfig:
    """The config a run trains: ``model.adapter.in_channels`` is the backbone's feature channels
    (whatever the YAML said); this is what ``<run_dir>/config.yaml`` records."""
    return dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, adapter=dataclasses.replace(cfg.model.adapter, in_channels=channels)))


def check_init_channels(init: str | Path, channels: int, backbone_name: str) -> None:
    """ValueError naming build-control's ``--backbone`` if the initial checkpoint's adapter was built
    for another number of feature channels than the training backbone gives (read from its metadata)."""
    if Path(init).suffix != ".safetensors":
        return
    try:
        with safe_open(str(init), framework="pt") as f:
            model_cfg = config_from_metadata(dict(f.metadata() or {}))
    except (SafetensorError, OSError):  # unreadable or missing: load_featinv says so
        return
    built = model_cfg.adapter.in_channels if model_cfg else None
    if built is not None and built != channels:
        raise ValueError(f"--init: {init} was built for a {built}-channel feature map, but the training backbone "
                         f"{backbone_name!r} gives {channels} channels; rebuild it with "
                         f"`featinv build-control MINISD OUT --backbone {backbone_name}` (the training backbone)")


def build_training_model(cfg: FeatInvConfig, init: str | Path, backbone: FeatureExtractor) -> FeatInv:
    """Load the initial FeatInv checkpoint; the adapter's input channels follow from the backbone."""
    channels = backbone.feature_shape[0]
    check_init_channels(init, channels, cfg.backbone.name)
    return load_featinv(init, effective_config(cfg, channels).model)


def train(cfg: FeatInvConfig, init: str | Path, run_dir: str | Path, run: TrainRun = TrainRun(), *,
          backbone: FeatureExtractor | None = None, dataset: Dataset | None = None) -> Path:
    """Train from the initial checkpoint ``init``, checkpoint every ``train.checkpoint_every`` steps into
    ``<run_dir>/checkpoints``, export ``<run_dir>/featinv.safetensors``; returns the exported file.

    backbone / dataset default to ``build_backbone(cfg.backbone)`` and ``ImageDataset(cfg.data.root)``.
    run.resume: a Lightning checkpoint; "auto": the newest one in ``<run_dir>/checkpoints`` that loads, if any.
    A resumed run must keep the run's recorded backbone, model, lr, batch size and data root
    (:func:`~featinv.training.run_config.check_resumed_config`) but for the fields named in ``run.accept_changes``.
    Fewer images than ``data.batch_size`` (per device) is a ValueError: no training batch. So is a batch without
    a readable image, or too few images left once the files found unreadable are subtracted: an
    UnreadableImagesError, raised before that batch trains, and nothing is exported."""
    run_dir = Path(run_dir)
    quiet_lightning()
    resume = run.resume
    if resume == "auto":  # the newest checkpoint of the run that loads
        resume = latest_checkpoint(run_dir / "checkpoints", log=rank_zero_only(stderr_line))
    if resume:  # before anything loads: the same run, or a change the user accepted by name
        check_resumed_config(run_dir, cfg, run.accept_changes)
    backbone = backbone if backbone is not None else build_backbone(cfg.backbone)
    if dataset is None:
        if not cfg.data.root:
            raise ValueError("no training data: set data.root (an ImageNet-layout folder) or pass --data")
        dataset = ImageDataset(cfg.data.root, backbone.image_size, cfg.model.image_size, train=True)
    check_enough_images(len(dataset), cfg.data.batch_size, cfg.data.root)
    model = build_training_model(cfg, init, backbone)
    cfg = effective_config(cfg, backbone.feature_shape[0])  # what the run trains is what it records
    module = FeatInvModule(model, backbone, cfg.train, run_dir=run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)), run_dir / RUN_CONFIG)
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="step{step:08d}",
                                           auto_insert_metric_name=False, every_n_train_steps=cfg.train.checkpoint_every
                                           or None, save_top_k=1, save_last=True)
    trainer = pl.Trainer(accelerator=run.accelerator, devices=run.devices, num_nodes=run.num_nodes,
                         strategy=run.strategy, precision=resolve_precision(cfg.train.precision, run.accelerator),
                         max_steps=cfg.train.max_steps, default_root_dir=run_dir, callbacks=[ckpt_cb],
                         plugins=[AtomicCheckpointIO()], use_distributed_sampler=False,
                         logger=pl.loggers.CSVLogger(run_dir, name="logs"), log_every_n_steps=1,
                         enable_progress_bar=run.progress, enable_model_summary=False, num_sanity_val_steps=0)
    progress_to_stderr(trainer)
    check_enough_images(len(dataset), cfg.data.batch_size, cfg.data.root, trainer.world_size)
    data = _Loader(dataset, cfg.data.batch_size, cfg.data.num_workers, cfg.train.seed, cfg.data.root)
    pl.seed_everything(cfg.train.seed, workers=True, verbose=False)  # augmentations, workers
    with warnings.catch_warnings():  # Lightning warnings about what is done here on purpose:
        # _Loader resumes mid-epoch itself; Lightning cannot see that.
        warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended")
        # The backbone, VAE, text encoder and frozen UNet stay in eval mode (BatchNorm statistics, no dropout).
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")
        if resume:  # the run directory holds the checkpoints being resumed
            warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty")
        trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume else None)
    out = run_dir / WEIGHTS_FILE
    if trainer.is_global_zero:
        save_featinv(model, out, {"featinv_train_steps": str(trainer.global_step)})
        print(f"exported the full inference checkpoint to {out} (step {trainer.global_step})", file=sys.stderr)
    return out
