"""Reconstruction: classifier feature map -> K images through guided DDIM, and the ImageNet-val job.

:class:`Reconstructor` runs every (image, sample) pair of a call through ONE sampler run with both
guidance branches in one batched forward, computes the adapter output (hint) and the prompt
contexts once, and seeds each (key, k) with its own generator, so a sample's pixels do not depend
on the batch it was generated in (PAPER.md "Sampling"; reference README §4 "DDIM", "Inference CFG").
:func:`reconstruct_folder` is the resumable, multi-device job behind ``featinv reconstruct``.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from tqdm import tqdm

from featinv.backbone import BACKBONE_PRESETS, FeatureExtractor, build_backbone
from featinv.checkpoint import atomic_write_text, load_featinv
from featinv.visualize import save_png  # module attribute: tests wrap it to count writes
from featinv.config import BackboneConfig, ModelConfig, load_config, to_dict
from featinv.data import ImageDataset, find_images
from featinv.model import FeatInv, guess_mode_scales
from featinv.sampling import ddim_sample, ddim_timesteps, guided_eps_fn
from featinv.training import resolve_precision

_print0 = rank_zero_only(print)  # one copy of messages under DDP
INFERENCE_PROMPT = "a high-quality, detailed, and professional image, "  # training prompt + ", "
UNCOND_MODES = ("prompt", "features")
RANGE_TOLERANCE = 1e-2  # resampling overshoot allowed outside [0, 1]


@dataclass(frozen=True)
class SampleConfig:
    """Sampling settings; defaults are the reference's inference settings."""

    steps: int = 50
    eta: float = 0.0
    guidance_scale: float = 1.75
    prompt: str = INFERENCE_PROMPT
    uncond: str = "prompt"      # "prompt": uncond branch keeps the features (reference); "features": drops both
    guess_mode: bool = False    # reference guess mode: ramp 0.825**(12-i), uncond without control (overrides uncond)
    num_samples: int = 1        # K reconstructions per image
    seed: int = 100

    def __post_init__(self):
        if self.uncond not in UNCOND_MODES:
            raise ValueError(f"SampleConfig.uncond must be one of {UNCOND_MODES}, got {self.uncond!r}")
        if self.steps < 1 or self.num_samples < 1:
            raise ValueError(f"SampleConfig: steps ({self.steps}) and num_samples ({self.num_samples}) must be >= 1")


def sample_seed(seed: int, key: str, k: int) -> int:
    """A stable 63-bit seed for sample k of the image named ``key`` (same in every process and run)."""
    digest = hashlib.blake2b(f"{seed}\0{key}\0{k}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def uncertainty(samples: torch.Tensor) -> torch.Tensor:
    """samples: (B, K, 3, H, W) -> (B, H, W) per-pixel std over K (population std, channel mean).

    What the feature map leaves undetermined; all zeros for K = 1."""
    if samples.ndim != 5:
        raise ValueError(f"uncertainty expects samples (B, K, 3, H, W), got shape {tuple(samples.shape)}")
    return samples.float().std(dim=1, correction=0).mean(dim=1)


class Reconstructor:
    """Feature maps (or images) -> K reconstructions each, in [0, 1].

    fixed_batch: run every call in chunks of exactly this many images, zero-padding the last one.
    CPU (and GPU) kernels pick batch-size-dependent algorithms whose float sums differ in the last
    bits (e.g. the time-embedding GEMM at batch 1 vs 8, 32-channel convs), which flips a few uint8
    pixels; at one fixed shape a row's result does not depend on its neighbours, so with a fixed
    batch a sample's pixels are bitwise the same in any batch, order, resume or rank split."""

    def __init__(self, model: FeatInv, backbone: FeatureExtractor | None = None,
                 cfg: SampleConfig = SampleConfig(), bf16: bool = False, fixed_batch: int | None = None):
        self.model = model.eval()
        self.backbone = backbone.eval() if backbone is not None else None
        self.cfg = cfg
        self.bf16 = bf16  # own autocast; leave False when the caller (e.g. Lightning) autocasts
        self.fixed_batch = fixed_batch

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    @torch.no_grad()
    def features(self, images01: torch.Tensor) -> torch.Tensor:
        """images01: (B, 3, S, S) in [0, 1] at the backbone's size -> feature map (B, C, h, w) float32."""
        if self.backbone is None:
            raise ValueError("this Reconstructor has no backbone: call from_features(feats, keys)")
        lo, hi = images01.aminmax()
        if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:  # e.g. uint8 values, or [-1, 1]
            raise ValueError(f"Reconstructor.features expects images in [0, 1] (the backbone applies its own "
                             f"mean/std), got values in [{float(lo):.3g}, {float(hi):.3g}]; divide 0-255 images by 255")
        with self._autocast():
            return self.backbone(images01.to(self.device)).float()

    def __call__(self, images01: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        """images01: (B, 3, S, S) in [0, 1]; keys: B stable names -> (B, K, 3, H, W) in [0, 1]."""
        return self._chunked(lambda x, ks: self._sample(self.features(x), ks), images01, keys)

    def from_features(self, feats: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        """feats: (B, C, h, w) classifier maps; keys: B names seeding the noise -> (B, K, 3, H, W) in [0, 1]."""
        return self._chunked(self._sample, feats, keys)

    def _chunked(self, fn, x: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        """fn(x, keys) over chunks of ``fixed_batch`` rows, zero-padded (or all at once without it)."""
        if len(keys) != x.shape[0]:
            raise ValueError(f"{len(keys)} keys for a batch of {x.shape[0]}")
        n = self.fixed_batch
        if not n:
            return fn(x, list(keys))
        outs = []
        for start in range(0, len(keys), n):
            chunk, ks = x[start:start + n], list(keys[start:start + n])
            pad = n - len(ks)
            if pad:
                chunk = torch.cat([chunk, chunk.new_zeros(pad, *chunk.shape[1:])])
                ks += [f"\0padding/{i}" for i in range(pad)]
            outs.append(fn(chunk, ks)[:n - pad])
        return torch.cat(outs)

    def _branches(self, feats: torch.Tensor) -> tuple[dict, dict]:
        """Keyword tensors (B·K rows) of the conditional and unconditional branch, built once per call."""
        cfg, model, k = self.cfg, self.model, self.cfg.num_samples
        hint = model.hint(feats).repeat_interleave(k, dim=0)  # once per image, not per step
        n = hint.shape[0]
        ctx_c, ctx_u = model.text_context([cfg.prompt, ""]).to(self.device).chunk(2)
        cond = dict(context=ctx_c.expand(n, -1, -1), hint=hint, control_scales=None)
        uncond = dict(context=ctx_u.expand(n, -1, -1), hint=hint, control_scales=None)
        if cfg.guess_mode:
            # Per-sample scales: the ramp on the cond half, 0 (control off) on the uncond half, so both
            # halves still run as one batched forward.
            ramp = torch.tensor(guess_mode_scales(model.num_control), device=self.device)
            cond["control_scales"] = ramp.expand(n, -1)
            uncond["control_scales"] = torch.zeros_like(cond["control_scales"])
        elif cfg.uncond == "features":
            # What training's joint dropout taught: zero feature map AND empty prompt.
            uncond["hint"] = model.hint(torch.zeros_like(feats[:1])).expand_as(hint)
        return cond, uncond

    @torch.no_grad()
    def _sample(self, feats: torch.Tensor, keys: list[str]) -> torch.Tensor:
        """One sampler run for all B·K samples: (B, C, h, w), B keys -> (B, K, 3, H, W) in [0, 1]."""
        cfg, model = self.cfg, self.model
        generators = [torch.Generator().manual_seed(sample_seed(cfg.seed, key, k))
                      for key in keys for k in range(cfg.num_samples)]
        size, channels = model.cfg.latent_size, model.cfg.unet.in_channels
        # CPU generators: the starting noise is the same on every device.
        x_T = torch.stack([torch.randn(channels, size, size, generator=g) for g in generators]).to(self.device)
        timesteps = ddim_timesteps(cfg.steps, model.cfg.diffusion.timesteps)
        with self._autocast():
            cond, uncond = self._branches(feats.to(self.device))
            eps_fn = guided_eps_fn(model, cond, uncond, cfg.guidance_scale)
            latents = ddim_sample(eps_fn, x_T, model.alphas_cumprod, timesteps, cfg.eta, generator=generators)
            images = model.decode_latents(latents)
        images = ((images.float() + 1) / 2).clamp(0, 1)
        return images.view(len(keys), cfg.num_samples, *images.shape[1:])


# ----- the folder job ---------------------------------------------------------------------------------

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
        folder = out / self.class_name
        return [folder / f"{self.stem}.png"] + [folder / f"reconstructed_{self.stem}_{i}.png" for i in range(k)]

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
            self._bar = tqdm(total=len(sampler), unit="img", desc=f"reconstruct (rank 0 of {self.trainer.world_size})")
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


def check_writable(out: str | Path) -> Path:
    """Create ``out`` and probe it with a temporary file; ValueError naming it if that fails."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".featinv-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"--out: output folder {str(out)!r} is not writable ({type(e).__name__}: {e})") from None
    return out


def _write_manifest(out: Path, items: list[FolderItem], k: int, done_before: int, info: dict) -> dict:
    """Summarise the folder from what is on disk: an incomplete item after a finished run was unreadable."""
    missing = [it for it in items if not it.complete(out, k)]
    manifest = {**info, "items": len(items), "complete": len(items) - len(missing),
                "already_complete": done_before, "reconstructed": len(items) - len(missing) - done_before,
                "unreadable": [it.path for it in missing]}
    atomic_write_text(json.dumps(manifest, indent=2) + "\n", out / "manifest.json")
    return manifest


def reconstruct_folder(checkpoint: str | Path | FeatInv, backbone: FeatureExtractor | BackboneConfig,
                       root: str | Path, out: str | Path, per_class: int | None = 10,
                       sample_cfg: SampleConfig = SampleConfig(), batch_size: int = 8,
                       model_cfg: ModelConfig | None = None, accelerator: str = "auto", devices="auto",
                       num_nodes: int = 1, strategy: str = "auto", precision: str = "auto",
                       num_workers: int = 0) -> dict:
    """Reconstruct the first ``per_class`` images of each class of ``root`` into ``out`` (resumable).

    Layout: ``<out>/<class>/<stem>.png`` (the Resize+CenterCrop crop at the model's image size) and
    ``<out>/<class>/reconstructed_<stem>_<k>.png``; ``<out>/manifest.json``. Returns the manifest.
    Pixels are bitwise reproducible for one batch size, device and software stack, whatever the
    resume history or number of ranks (see :class:`Reconstructor` ``fixed_batch``)."""
    ckpt_name = None
    if not isinstance(checkpoint, FeatInv):
        ckpt_name = str(checkpoint)
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"--checkpoint: {ckpt_name!r} not found")
    items, class_names = plan_items(root, per_class)
    out, k = check_writable(out), sample_cfg.num_samples
    bcfg = backbone if isinstance(backbone, BackboneConfig) else None
    info = {"checkpoint": ckpt_name, "data": str(root), "per_class": per_class, "classes": class_names,
            "sample": dataclasses.asdict(sample_cfg), "backbone": to_dict(bcfg) if bcfg else None}
    done_before = sum(it.complete(out, k) for it in items)
    if done_before == len(items):  # nothing to do: no model is loaded
        _print0(f"all {len(items)} items in {out} are complete")
        rank = getattr(rank_zero_only, "rank", 0)  # set by Lightning from RANK / LOCAL_RANK / SLURM_PROCID
        return _write_manifest(out, items, k, done_before, info) if rank == 0 else info

    model = checkpoint if isinstance(checkpoint, FeatInv) else load_featinv(checkpoint, model_cfg)
    extractor = build_backbone(backbone) if bcfg else backbone
    if extractor.feature_shape[0] != model.cfg.adapter.in_channels:
        raise ValueError(f"backbone feature map has {extractor.feature_shape[0]} channels but the model's adapter "
                         f"expects adapter.in_channels = {model.cfg.adapter.in_channels}")
    # fixed_batch: pixels do not depend on which items share a batch (resume, rank split, last batch)
    reconstructor = Reconstructor(model, extractor, sample_cfg, fixed_batch=batch_size)
    predictor = ReconstructionPredictor(reconstructor, items, out, extractor.image_size, batch_size, num_workers)
    precision = resolve_precision(precision, accelerator)
    trainer = pl.Trainer(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
                         precision=precision, use_distributed_sampler=False, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.predict(predictor, return_predictions=False)
    trainer.strategy.barrier("featinv-reconstruct")  # every rank's files are on disk before the manifest
    info.update(precision=precision, world_size=trainer.world_size)
    return _write_manifest(out, items, k, done_before, info) if trainer.is_global_zero else info


def resolve_backbone(name: str | None, checkpoint: str | None, size: int | None,
                     base: BackboneConfig) -> BackboneConfig:
    """``--backbone`` (preset of backbone.BACKBONE_PRESETS or timm name) + overrides onto ``base``."""
    cfg = base
    if name:
        preset = BACKBONE_PRESETS.get(name)
        cfg = preset if preset is not None else dataclasses.replace(base, name=name, pretrained=True)
    if checkpoint:
        cfg = dataclasses.replace(cfg, checkpoint=checkpoint)
    if size:
        cfg = dataclasses.replace(cfg, image_size=size)
    return cfg


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="featinv reconstruct", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Reconstruct ImageNet-style images from their classifier features.")
    p.add_argument("--checkpoint", required=True, help="FeatInv weights (featinv .safetensors or reference .ckpt)")
    p.add_argument("--config", help="preset name or YAML for the model (default: the checkpoint's metadata)")
    p.add_argument("--backbone", help=f"backbone preset ({', '.join(BACKBONE_PRESETS)}) or timm name "
                                      "(default: the config's, else convnext_base)")
    p.add_argument("--backbone-checkpoint", help="local backbone weights file (offline use)")
    p.add_argument("--backbone-size", type=int, help="backbone input size (default: the backbone preset's)")
    p.add_argument("--data", required=True, help="ImageNet-style folder <root>/<class>/<image>")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--per-class", type=int, default=10, help="first N images per class (0: all)")
    d = SampleConfig()
    p.add_argument("--steps", type=int, default=d.steps, help="DDIM steps")
    p.add_argument("--eta", type=float, default=d.eta, help="DDIM eta")
    p.add_argument("--scale", type=float, default=d.guidance_scale, help="classifier-free guidance scale")
    p.add_argument("--prompt", default=d.prompt, help="conditional prompt")
    p.add_argument("--samples", type=int, default=d.num_samples, help="reconstructions per image (K)")
    p.add_argument("--seed", type=int, default=d.seed, help="base seed; each image/sample gets its own")
    p.add_argument("--uncond", choices=UNCOND_MODES, default=d.uncond,
                   help="unconditional branch: empty prompt with the features (reference) or without them")
    p.add_argument("--guess-mode", action="store_true", help="reference guess mode (control ramp, uncond w/o control)")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch per device (x K samples x 2 branches)")
    p.add_argument("--num-workers", type=int, default=2, help="data loader workers per device")
    p.add_argument("--accelerator", default="auto", help="Lightning accelerator (auto, cpu, gpu)")
    p.add_argument("--devices", default="auto", help="Lightning devices (auto, N, or a list like 0,1)")
    p.add_argument("--num-nodes", type=int, default=1, help="nodes")
    p.add_argument("--strategy", default="auto", help="Lightning strategy (auto, ddp, ...)")
    p.add_argument("--precision", default="auto", help="auto (bf16-mixed on GPU, else 32-true) or a Lightning value")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    """``featinv reconstruct``: parse arguments, print the resolved settings, run the folder job."""
    args = build_parser().parse_args(argv)
    if not Path(args.checkpoint).is_file():  # fail before anything is loaded
        raise FileNotFoundError(f"--checkpoint: {args.checkpoint!r} not found")
    full = load_config(args.config) if args.config else None
    base = full.backbone if full else BACKBONE_PRESETS["convnext_base"]
    backbone = resolve_backbone(args.backbone, args.backbone_checkpoint, args.backbone_size, base)
    sample = SampleConfig(steps=args.steps, eta=args.eta, guidance_scale=args.scale, prompt=args.prompt,
                          uncond=args.uncond, guess_mode=args.guess_mode, num_samples=args.samples, seed=args.seed)
    devices = args.devices if args.devices == "auto" or "," in args.devices else int(args.devices)
    settings = {"checkpoint": args.checkpoint, "config": args.config or "(from the checkpoint)",
                "backbone": to_dict(backbone), "sample": dataclasses.asdict(sample), "data": args.data,
                "out": args.out, "per_class": args.per_class, "batch_size": args.batch_size,
                "accelerator": args.accelerator, "devices": devices, "num_nodes": args.num_nodes,
                "strategy": args.strategy, "precision": args.precision}
    _print0("featinv reconstruct\n" + json.dumps(settings, indent=2))
    manifest = reconstruct_folder(args.checkpoint, backbone, args.data, args.out, args.per_class or None, sample,
                                  args.batch_size, full.model if full else None, args.accelerator, devices,
                                  args.num_nodes, args.strategy, args.precision, args.num_workers)
    if "items" in manifest:
        _print0(f"{manifest['complete']}/{manifest['items']} items complete "
                f"({manifest['reconstructed']} new, {len(manifest['unreadable'])} unreadable): {args.out}")
    return manifest


if __name__ == "__main__":
    main()
