"""The demo pair, stage by stage: the digits classifier, a miniSD stand-in (tiny KL autoencoder + UNet)
trained on the digits, the FeatInv checkpoint built from it, and its control branch trained with the
project's trainer. Each stage is cached in ``<out>/cache/<quick|default>-seed<N>-<settings hash>/``.

:func:`featinv.pair.load_pair` serves the result; :mod:`featinv.demo.run` evaluates it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from featinv.checkpoint.config_file import merge
from featinv.checkpoint.load import save_minisd
from featinv.config import (
    DEMO_OUT,
    PROMPT,
    TINY_MODEL,
    WEIGHTS_FILE,
    AdapterConfig,
    FeatInvConfig,
    ModelConfig,
    SampleConfig,
    VAEConfig,
)
from featinv.demo.digits import DigitsCNN, DigitsDataset, load_digits_split, make_extractor, rgb, train_classifier
from featinv.diffusion.schedule import alphas_cumprod, eps_loss
from featinv.io import atomic_save, atomic_write_text
from featinv.nets.autoencoder import AutoencoderKL
from featinv.nets.backbone import FeatureExtractor
from featinv.nets.model import FeatInv
from featinv.runtime import progress_bar, stderr_line


@dataclass(frozen=True)
class DemoSettings:
    image_size: int = 8           # digits are 8x8 (native); larger sizes are upsampled (bilinear)
    model_channels: int = 32      # UNet (and control branch) width; GroupNorm(32) needs a multiple of 32
    vae_mult: tuple[int, ...] = (1, 2)  # autoencoder levels: 8x8 digits -> 4x4x4 latents
    attention: tuple[int, ...] = ()  # UNet levels with attention; the middle blocks always have it
    classifier_epochs: int = 30
    vae_steps: int = 300
    vae_batch: int = 64
    unet_steps: int = 1000
    unet_batch: int = 64
    unet_lr: float = 2e-3
    control_steps: int = 2000
    control_batch: int = 32
    control_lr: float = 1e-3      # 3e-3 diverged in calibration
    eval_digits: int = 180        # held-out digits reconstructed
    samples: int = 3              # K reconstructions per digit
    sample_steps: int = 20        # sampler steps
    guidance: float = 5.5         # classifier-free guidance (uncond: zero feature map + empty prompt)


DEFAULT = DemoSettings()
# QUICK is calibrated on seeds 0-4 (benchmarks/bench_demo.py; its figures, and what each setting bought, are in
# benchmarks/RESULTS.md): the control steps mattered most, then 4x4 latents instead of 8x8; attention outside
# the middle blocks cost time without gaining agreement.
QUICK = DemoSettings(vae_steps=120, unet_steps=600, unet_batch=32, control_steps=1000, eval_digits=60, samples=2)


# ----- the miniSD stand-in: VAE + UNet -----------------------------------------------------------------

def model_config(s: DemoSettings, hint_channels: int, scale_factor: float = 1.0) -> ModelConfig:
    """The tiny FeatInv model (featinv.config.TINY_MODEL: a small VAE, the 'tiny' UNet, a random 1-layer
    CLIP) at the demo's UNet width, attention levels, VAE levels and latent grid."""
    latent = s.image_size // 2 ** (len(s.vae_mult) - 1)
    return ModelConfig(
        unet=dataclasses.replace(TINY_MODEL.unet, model_channels=s.model_channels,
                                 attention_resolutions=tuple(s.attention)),
        adapter=AdapterConfig(in_channels=hint_channels, width=64, grid=latent),
        vae=dataclasses.replace(TINY_MODEL.vae, ch_mult=tuple(s.vae_mult), scale_factor=scale_factor),
        text=TINY_MODEL.text,
        latent_size=latent,
    )


def train_vae(data: dict, cfg: VAEConfig, s: DemoSettings, seed: int, device: torch.device) -> tuple[dict, float]:
    """A short autoencoder run (MSE + a small KL term); returns its weights and the latent scale factor."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(cfg).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    x = rgb(data["x_train"]).to(device) * 2 - 1
    g = torch.Generator().manual_seed(seed + 1)
    bar = progress_bar(range(s.vae_steps), desc="2/4 autoencoder", unit="step")
    for step in bar:
        b = torch.randint(0, len(x), (s.vae_batch,), generator=g)
        mean, logvar = vae.encode(x[b])
        z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=g).to(device)
        rec = F.mse_loss(vae.decode(z), x[b])
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        loss = rec + 1e-4 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0:
            bar.set_postfix(mse=f"{rec.item():.4f}")
    vae.eval()
    with torch.no_grad():
        std = vae.encode(x[:512])[0].std().item()
    return {k: v.detach().cpu() for k, v in vae.state_dict().items()}, 1.0 / std


def train_unet(model: FeatInv, data: dict, s: DemoSettings, seed: int, device: torch.device) -> None:
    """Pretrain the UNet alone (no control): plain epsilon loss on the latents, prompt or empty prompt."""
    torch.manual_seed(seed)
    model.requires_grad_(False)
    model.unet.requires_grad_(True)
    model.unet.train()
    with torch.no_grad():
        latents = torch.cat([model.encode_images(rgb(c).to(device) * 2 - 1, sample=False)
                             for c in data["x_train"].split(256)])
    ctx = model.text_context(["", PROMPT]).to(device)
    ac = alphas_cumprod(model.cfg.diffusion).to(device)
    opt = torch.optim.AdamW(model.unet.parameters(), lr=s.unet_lr, weight_decay=0.0, fused=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.unet_lr, total_steps=s.unet_steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed + 2)
    bar = progress_bar(range(s.unet_steps), desc="3/4 diffusion UNet", unit="step")
    ema = None
    for step in bar:
        b = torch.randint(0, len(latents), (s.unet_batch,), generator=g)
        t = torch.randint(0, len(ac), (s.unet_batch,), generator=g).to(device)
        noise = torch.randn(latents[b].shape, generator=g).to(device)
        context = ctx[torch.randint(0, 2, (s.unet_batch,), generator=g).to(device)]
        loss = eps_loss(lambda xt, tt: model(xt, tt, context), latents[b], t, noise, ac)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{ema:.4f}")
    model.requires_grad_(False)
    model.eval()


# ----- cached stages ------------------------------------------------------------------------------

def cache_dir(out: Path, s: DemoSettings, seed: int, name: str) -> Path:
    """``<out>/cache/<name>-seed<N>-<hash of the settings>``: changed settings never reuse stale artefacts."""
    tag = hashlib.sha1(json.dumps(dataclasses.asdict(s), sort_keys=True).encode()).hexdigest()[:8]
    return Path(out) / "cache" / f"{name}-seed{seed}-{tag}"


def _stage_classifier(cache: Path, data: dict, s: DemoSettings, seed: int, dev: torch.device, log) -> DigitsCNN:
    """1. the classifier (trained once, cached)."""
    clf_path = cache / "classifier.safetensors"
    clf = DigitsCNN()
    if clf_path.exists():
        clf.load_state_dict(load_file(clf_path))
        log(f"1/4 classifier: cached ({clf_path})")
    else:
        clf = train_classifier(data, s.classifier_epochs, seed, dev).cpu()
        atomic_save(lambda tmp: save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, tmp), clf_path)
    return clf.eval()


def _stage_minisd(cache: Path, data: dict, s: DemoSettings, seed: int, dev: torch.device, channels: int,
                  log) -> ModelConfig:
    """2.-3. the miniSD stand-in (autoencoder + UNet) and the initial FeatInv checkpoint; returns its config."""
    minisd, init, scale_file = cache / "minisd.safetensors", cache / "featinv_init.safetensors", cache / "vae_scale.json"
    if minisd.exists() and scale_file.exists():
        scale = json.loads(scale_file.read_text())["scale_factor"]
        log(f"2/4 autoencoder, 3/4 diffusion UNet: cached ({minisd})")
    else:
        vae_sd, scale = train_vae(data, model_config(s, channels).vae, s, seed, dev)
        torch.manual_seed(seed)
        model = FeatInv(model_config(s, channels, scale))
        model.vae.load_state_dict(vae_sd)
        model.to(dev)
        train_unet(model, data, s, seed, dev)
        save_minisd(model.cpu(), minisd)
        atomic_write_text(json.dumps({"scale_factor": scale}), scale_file)
        del model
    cfg_model = model_config(s, channels, scale)
    if not init.exists():
        from featinv.checkpoint.build_control import build_control

        build_control(minisd, init, cfg_model, channels, seed=seed)
    log("   (the CLIP text encoder is randomly initialised and frozen: the prompt is a constant)")
    return cfg_model


def _stage_control(cache: Path, data: dict, s: DemoSettings, seed: int, dev: torch.device, cfg_model: ModelConfig,
                   extractor: FeatureExtractor, log) -> Path:
    """4. the control branch, trained with the project's trainer; returns the final checkpoint."""
    run_dir = cache / "featinv_run"
    final = run_dir / WEIGHTS_FILE
    if final.exists():
        log(f"4/4 control branch: cached ({final})")
        return final
    from featinv.training.loop import TrainRun, train

    if run_dir.exists():
        shutil.rmtree(run_dir)
    cfg = merge(FeatInvConfig(model=cfg_model), {
        "backbone": {"name": "digits-cnn", "pretrained": False, "image_size": s.image_size},
        "data": {"batch_size": s.control_batch, "num_workers": 0},
        "train": {"lr": s.control_lr, "max_steps": s.control_steps, "drop_prob": 0.15, "log_images_every": 0,
                  "checkpoint_every": s.control_steps, "seed": seed},
    })
    log(f"4/4 control branch: featinv.training.loop.train, {s.control_steps} steps")
    launch = TrainRun(accelerator="cuda" if dev.type == "cuda" else "cpu", devices=1)
    train(cfg, cache / "featinv_init.safetensors", run_dir, launch, backbone=extractor,
          dataset=DigitsDataset(data["x_train"], data["y_train"]))
    return final


def classifier_accuracy(extractor: FeatureExtractor, data: dict) -> float:
    """The digits classifier's top-1 accuracy on the held-out split."""
    dev = extractor.mean.device
    with torch.no_grad():
        return (extractor.classify(rgb(data["x_test"]).to(dev)).argmax(1).cpu() == data["y_test"]).float().mean().item()


@dataclass
class DemoParts:
    """What the stages leave: the final FeatInv checkpoint, the classifier as an extractor, the data."""

    checkpoint: Path
    extractor: FeatureExtractor      # eval mode, on the requested device
    data: dict                       # load_digits_split(settings.image_size)
    sample_config: SampleConfig      # what the demo samples with (guidance, uncond mode, K, seed)
    cache: Path


def settings_for(quick: bool, settings: DemoSettings | None = None) -> DemoSettings:
    return settings or (QUICK if quick else DEFAULT)


def demo_parts(out: str | Path = DEMO_OUT, seed: int = 0, quick: bool = True, device: str = "cpu",
               log=stderr_line, retrain: bool = False, settings: DemoSettings | None = None) -> DemoParts:
    """Run (or reuse from the cache) the four stages; ``log`` gets progress lines (stderr by default, as the
    stages' progress bars)."""
    s = settings_for(quick, settings)
    dev = torch.device(device)
    cache = cache_dir(Path(out), s, seed, "quick" if quick else "default")
    if retrain and cache.exists():
        shutil.rmtree(cache)
    cache.mkdir(parents=True, exist_ok=True)
    data = load_digits_split(s.image_size)
    clf = _stage_classifier(cache, data, s, seed, dev, log)
    extractor = make_extractor(clf, s.image_size).to(dev).eval()
    log(f"   classifier test accuracy {100 * classifier_accuracy(extractor, data):.1f} %; "
        f"inverted feature map {tuple(extractor.feature_shape)}")
    cfg_model = _stage_minisd(cache, data, s, seed, dev, extractor.feature_shape[0], log)
    final = _stage_control(cache, data, s, seed, dev, cfg_model, extractor, log)
    # With a random text encoder the training prompt is used verbatim (no ", " appended).
    sc = SampleConfig(steps=s.sample_steps, guidance_scale=s.guidance, prompt=PROMPT, uncond="features",
                      num_samples=s.samples, seed=seed)
    return DemoParts(final, extractor, data, sc, cache)
