"""Random-weight models and files for tests, benchmarks and smoke runs (the weights mean nothing):
:func:`write_random_minisd` and :func:`random_featinv`."""
from __future__ import annotations

from pathlib import Path

import torch

from featinv.config import ModelConfig
from featinv.nets.model import FeatInv


def write_random_minisd(path: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """A miniSD-layout checkpoint (UNet, VAE, text encoder; random weights from ``seed``) of a preset's
    model, e.g. the tiny one for trying every command on a CPU; refuses to overwrite."""
    from featinv.checkpoint.load import save_minisd
    from featinv.config import PRESETS

    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; refusing to overwrite it")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left as it was
        torch.manual_seed(seed)
        return save_minisd(FeatInv(PRESETS[preset].model), path)


def random_featinv(cfg: ModelConfig, seed: int = 0, std: float = 0.05, device: str | torch.device = "cpu") -> FeatInv:
    """A FeatInv of ``cfg`` with random weights from ``seed`` whose zero-initialised layers (zero convs,
    the adapter's and the UNet's output convs) are N(0, std) too, so that the feature map changes the
    output: for tests, benchmarks and smoke runs (the weights mean nothing). The global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            model = FeatInv(cfg)
        with torch.no_grad():
            for p in model.parameters():
                if not p.any():
                    p.normal_(0, std)
    return model
