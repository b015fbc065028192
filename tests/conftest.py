"""Shared test fixtures: the reference tiny state dict and its input/output tensors."""
from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures"


def assert_close_rel(cand: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4, name: str = "tensor"):
    """Fail unless max|cand - ref| / max|ref| <= tol (reference README section 5)."""
    assert cand.shape == ref.shape, f"{name}: shape {tuple(cand.shape)} != reference {tuple(ref.shape)}"
    cand, ref = cand.detach().double(), ref.detach().double()
    err = (cand - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
    assert err <= tol, f"{name}: max|cand - ref| / max|ref| = {err:.3g} > {tol:g}"


def strip_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``sd`` whose key starts with ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def reference_shapes(group: str, prefix: str) -> dict[str, tuple[int, ...]]:
    """{key minus prefix: shape} for one ``group`` of the full reference key table, in its order."""
    with open(FIXTURES / "featinv_convnext_keys.tsv", newline="") as f:
        rows = [r for r in csv.DictReader(f, delimiter="\t") if r["group"] == group]
    assert rows and all(r["key"].startswith(prefix) for r in rows), f"bad group/prefix {group}/{prefix}"
    return {r["key"][len(prefix):]: tuple(int(d) for d in r["shape"].split("x")) for r in rows}


def assert_matches_reference_keys(module: torch.nn.Module, group: str, prefix: str, n_params: int) -> None:
    """``module``'s state dict has exactly the keys, order and shapes of ``group`` in the reference table."""
    ref = reference_shapes(group, prefix)
    ours = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert set(ours) == set(ref), (sorted(set(ours) - set(ref)), sorted(set(ref) - set(ours)))
    assert list(ours) == list(ref)  # same order as the reference state_dict
    assert ours == ref
    assert sum(v.numel() for v in module.state_dict().values()) == n_params


@pytest.fixture(scope="session")
def tiny_sd() -> dict[str, torch.Tensor]:
    """The reference tiny model's full state dict (reference key names, float32)."""
    return load_file(FIXTURES / "tiny_state_dict.safetensors")


@pytest.fixture(scope="session")
def tiny_io() -> dict[str, torch.Tensor]:
    """Reference inputs (``in_*``) and outputs of the tiny model."""
    return load_file(FIXTURES / "tiny_io.safetensors")


def write_tiny_minisd(path: Path, seed: int = 0) -> Path:
    """A miniSD-layout checkpoint (UNet, VAE, text encoder; no control branch) of the tiny model."""
    from featinv.checkpoint.load import save_minisd
    from featinv.config import PRESETS
    from featinv.nets.model import FeatInv

    torch.manual_seed(seed)
    return save_minisd(FeatInv(PRESETS["tiny"].model), path)


@pytest.fixture(scope="session")
def tiny_minisd(tmp_path_factory) -> Path:
    return write_tiny_minisd(tmp_path_factory.mktemp("minisd") / "minisd_tiny.safetensors")


@pytest.fixture(scope="session")
def quick_demo_out(tmp_path_factory) -> Path:
    """An out folder holding the quick demo pair (seed 0), trained once per test session (~1-2 min on 2 cores).

    Tests that need a trained classifier + FeatInv model call ``load_demo_pair(quick_demo_out)``,
    which then only reads the cache."""
    from featinv.demo.pair import load_demo_pair

    out = tmp_path_factory.mktemp("demo")
    threads = torch.get_num_threads()
    try:
        load_demo_pair(out, seed=0, quick=True, log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    return out


def make_tiny_model(in_channels: int = 512):
    """The tiny preset with the backbone's channel count, a narrower adapter for speed, and every
    zero-initialised layer made random so that the feature map changes the output."""
    from featinv.config import PRESETS
    from featinv.testing import random_featinv

    cfg = PRESETS["tiny"].model
    cfg = dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, in_channels=in_channels, width=64))
    return random_featinv(cfg, seed=0).eval()


@pytest.fixture(scope="session")
def tiny_job(tmp_path_factory):
    """Model, backbone, their files, and an ImageNet-style folder with one unreadable image
    (test_reconstruct, test_cli)."""
    from helpers import sample_photos_folder
    from safetensors.torch import save_file

    from featinv.checkpoint.load import save_featinv
    from featinv.config import PRESETS
    from featinv.nets.backbone import build_backbone

    tmp = tmp_path_factory.mktemp("reconstruct")
    torch.manual_seed(1)
    backbone = build_backbone(PRESETS["tiny"].backbone)  # resnet18, random, 64 px -> 512x2x2
    model = make_tiny_model(backbone.feature_shape[0])
    root = sample_photos_folder(tmp / "photos", size=72)
    (root / "animal" / "broken.JPEG").write_bytes(b"not a jpeg")  # sorts first in its class
    ckpt = save_featinv(model, tmp / "tiny.safetensors")
    bb_file = tmp / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.model.state_dict().items()}, str(bb_file))
    return dict(model=model, backbone=backbone, root=root, ckpt=ckpt, bb_file=bb_file, tmp=tmp)


class Evil:
    """Unpickling this runs code: it creates the directory ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.mkdir, (self.marker,)


def write_ldm_checkpoint(path: Path, state_dict: dict[str, torch.Tensor], **extra) -> Path:
    """A checkpoint as the LDM code base (Lightning 1.4) wrote them: ``callbacks`` keyed by the
    callback class, numpy scalars and arrays in the callback state."""
    import numpy as np
    from pytorch_lightning.callbacks.model_checkpoint import ModelCheckpoint

    callbacks = {ModelCheckpoint: {"monitor": "val/loss", "best_model_score": np.float64(0.12),
                                   "current_score": np.array([0.5], dtype=np.float32), "dirpath": "/logs/ckpt"}}
    torch.save({"state_dict": state_dict, "epoch": 17, "global_step": 88000, "pytorch-lightning_version": "1.4.2",
                "callbacks": callbacks, **extra}, path)
    return path
