"""The demo: the whole FeatInv recipe on scikit-learn's digits, on a CPU, in minutes.

No miniSD, no ImageNet, no GPU needed. The demo runs the same code paths as a full-scale run,
with tiny configs:

1. trains a small CNN classifier on the 8x8 digits (at their native size, as 3-channel images) --
   the network whose spatial feature map (64 x 2 x 2) is inverted;
2. trains a tiny KL autoencoder (8x8 digits -> 4x4x4 latents) and a tiny UNet with the plain
   epsilon loss -- the stand-in for miniSD (the CLIP text encoder stays randomly initialised
   and frozen; the prompt is constant, so it only has to be a fixed function);
3. saves that as a miniSD checkpoint and builds the FeatInv checkpoint with ``build_control``;
4. trains the control branch on the classifier's feature maps with ``featinv.training.train``;
5. reconstructs held-out digits from their feature maps with ``Reconstructor`` and compares the
   classifier's features / labels of reconstructions with those of the originals, for FeatInv and
   for the unconditional model (feature map dropped), as Markdown + JSON and a picture.

Artefacts are cached in ``<out>/cache/<quick|default>-seed<N>-<settings hash>/``: a second run takes
seconds (``--retrain`` starts over).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from featinv.autoencoder import AutoencoderKL
from featinv.backbone import FeatureExtractor
from featinv.checkpoint import load_featinv, save_minisd
from featinv.io import atomic_save, atomic_write_text
from featinv.config import (PROMPT, AdapterConfig, FeatInvConfig, ModelConfig, SampleConfig, TextConfig,
                            UNetConfig, VAEConfig, merge)
from featinv.diffusion import eps_loss
from featinv.evaluate import backbone_outputs, compare_outputs
from featinv.model import FeatInv

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
    sample_steps: int = 20        # DDIM steps
    guidance: float = 5.5         # classifier-free guidance (uncond: zero feature map + empty prompt)


DEFAULT = DemoSettings()
# QUICK is calibrated on seeds 0-4 (benchmarks/bench_demo.py: label agreement 81-87 % vs 8-13 % unconditional,
# 83-100 s on a 2-core CPU). What mattered, measured: control steps most (500 -> 72 %, 1000 -> 84 % on seed 0),
# then 4x4 latents instead of 8x8 (+10 points, 40 % less time); attention outside the middle blocks cost
# 40 % of a step without gaining agreement.
QUICK = DemoSettings(vae_steps=120, unet_steps=600, unet_batch=32, control_steps=1000, eval_digits=60, samples=2)


# ----- data and classifier ------------------------------------------------------------------------

def load_digits_split(size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """scikit-learn digits -> (N, 1, size, size) in [0, 1] and labels; fixed 80/20 split (stratified)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    y = torch.tensor(d.target, dtype=torch.int64)
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=0.2, random_state=0, stratify=d.target)  # same split for every seed
    return {"x_train": x[tr], "y_train": y[tr], "x_test": x[te], "y_test": y[te]}


class DigitsCNN(nn.Module):
    """(B, 3, S, S) normalised -> logits (B, 10); ``features`` -> (B, 64, S/4, S/4) (2x2 at 8 px)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x.mean(dim=1, keepdim=True))  # grey: the three channels are averaged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.features(x)


def _head(model: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    return model.head(feats.mean(dim=(2, 3)))  # DigitsCNN.forward after the feature map


def make_extractor(model: DigitsCNN, size: int) -> FeatureExtractor:
    return FeatureExtractor(model, feature_fn=_features, mean=(0.5,) * 3, std=(0.5,) * 3, image_size=size,
                            head_fn=_head)


def rgb(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1)


def train_classifier(data: dict, s: DemoSettings, seed: int, device: torch.device) -> DigitsCNN:
    torch.manual_seed(seed)
    model = DigitsCNN().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    x, y = data["x_train"].to(device), data["y_train"].to(device)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(s.classifier_epochs), desc="1/4 classifier", unit="epoch")
    for _ in bar:
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            b = perm[i:i + 64]
            xb = x[b]
            shift = torch.randint(-1, 2, (2,), generator=g).tolist()  # light augmentation: 1-px shifts
            xb = torch.roll(xb, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model((rgb(xb) - 0.5) / 0.5), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


# ----- the miniSD stand-in: VAE + UNet -----------------------------------------------------------------

def model_config(s: DemoSettings, hint_channels: int, scale_factor: float = 1.0) -> ModelConfig:
    """The tiny FeatInv model: a small VAE, the 'tiny' UNet, a random 1-layer CLIP."""
    latent = s.image_size // 2 ** (len(s.vae_mult) - 1)
    return ModelConfig(
        unet=UNetConfig(model_channels=s.model_channels, channel_mult=(1, 2), num_res_blocks=1,
                        attention_resolutions=tuple(s.attention), num_heads=2, context_dim=32),
        adapter=AdapterConfig(in_channels=hint_channels, width=64, grid=latent),
        vae=VAEConfig(ch=32, ch_mult=tuple(s.vae_mult), num_res_blocks=1, scale_factor=scale_factor),
        text=TextConfig(width=32, layers=1, heads=2, mlp_width=64),
        latent_size=latent,
    )


def train_vae(data: dict, cfg: VAEConfig, s: DemoSettings, seed: int, device: torch.device) -> tuple[dict, float]:
    """A short autoencoder run (MSE + a small KL term); returns its weights and the latent scale factor."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(cfg).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    x = rgb(data["x_train"]).to(device) * 2 - 1
    g = torch.Generator().manual_seed(seed + 1)
    bar = tqdm(range(s.vae_steps), desc="2/4 autoencoder", unit="step")
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
    ac = model.alphas_cumprod.to(device)
    opt = torch.optim.AdamW(model.unet.parameters(), lr=s.unet_lr, weight_decay=0.0, fused=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.unet_lr, total_steps=s.unet_steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed + 2)
    bar = tqdm(range(s.unet_steps), desc="3/4 diffusion UNet", unit="step")
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


# ----- FeatInv training data ----------------------------------------------------------------------

class DigitsDataset(Dataset):
    """Items for ``featinv.training.train``: the same digit as backbone input and diffusion target."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        img = self.x[i].expand(3, -1, -1)
        return {"feat_input": img.clone(), "image": img * 2 - 1, "label": self.y[i], "index": i}


# ----- evaluation ---------------------------------------------------------------------------------

def metrics(extractor: FeatureExtractor, originals: torch.Tensor, recon: torch.Tensor) -> dict:
    """originals (B, 3, S, S), recon (B, K, 3, S, S) in [0, 1] -> feature cosine and label agreement
    (means over the B·K reconstructions of :func:`featinv.evaluate.compare_outputs`)."""
    k = recon.shape[1]
    f0, l0 = backbone_outputs(extractor, originals)
    f1, l1 = backbone_outputs(extractor, recon.flatten(0, 1))
    m = compare_outputs(f0.repeat_interleave(k, dim=0), l0.repeat_interleave(k, dim=0), f1, l1)
    return {"feature_cosine_spatial": m["cos_spatial"].mean().item(),
            "feature_cosine_pooled": m["cos_pooled"].mean().item(),
            "label_agreement": m["agree"].float().mean().item()}


def markdown(results: dict) -> str:
    rows = [("FeatInv (feature map -> image)", results["featinv"]),
            ("unconditional (feature map dropped)", results["unconditional"])]
    lines = ["| | feature cosine (spatial) | feature cosine (pooled) | label agreement |",
             "|---|---|---|---|"]
    for name, m in rows:
        lines.append(f"| {name} | {m['feature_cosine_spatial']:.3f} | {m['feature_cosine_pooled']:.3f} | "
                     f"{100 * m['label_agreement']:.1f} % |")
    n, k = results["eval_digits"], results["samples"]
    lines.append("")
    lines.append(f"{n} held-out digits x {k} samples; classifier test accuracy {100 * results['classifier_accuracy']:.1f} %; "
                 f"label agreement = the classifier's label on the reconstruction equals its label on the original.")
    return "\n".join(lines) + "\n"


# ----- the pipeline --------------------------------------------------------------------------------

def cache_dir(out: Path, s: DemoSettings, seed: int, name: str) -> Path:
    """``<out>/cache/<name>-seed<N>-<hash of the settings>``: changed settings never reuse stale artefacts."""
    tag = hashlib.sha1(json.dumps(dataclasses.asdict(s), sort_keys=True).encode()).hexdigest()[:8]
    return Path(out) / "cache" / f"{name}-seed{seed}-{tag}"


@dataclass
class DemoPair:
    """The demo's trained pair: the digits classifier and the FeatInv model that inverts its feature map."""

    model: FeatInv                   # eval mode, on the requested device
    extractor: FeatureExtractor      # the classifier as a feature extractor (64 x 2 x 2 maps at 8 px)
    classifier: DigitsCNN
    data: dict                       # load_digits_split(settings.image_size)
    settings: DemoSettings
    sample_config: SampleConfig      # what the demo samples with (guidance, uncond mode, K, seed)
    cache: Path                      # the cache folder the artefacts live in
    classifier_accuracy: float


def _stage_classifier(cache: Path, data: dict, s: DemoSettings, seed: int, dev: torch.device, log) -> DigitsCNN:
    """1. the classifier (trained once, cached)."""
    clf_path = cache / "classifier.safetensors"
    clf = DigitsCNN()
    if clf_path.exists():
        clf.load_state_dict(load_file(clf_path))
        log(f"1/4 classifier: cached ({clf_path})")
    else:
        clf = train_classifier(data, s, seed, dev).cpu()
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
        from featinv.build_control import build_control

        build_control(minisd, init, cfg_model, channels, seed=seed)
    log("   (the CLIP text encoder is randomly initialised and frozen: the prompt is a constant)")
    return cfg_model


def _stage_control(cache: Path, data: dict, s: DemoSettings, seed: int, dev: torch.device, cfg_model: ModelConfig,
                   extractor: FeatureExtractor, log) -> Path:
    """4. the control branch, trained with the project's trainer; returns the final checkpoint."""
    run_dir = cache / "featinv_run"
    final = run_dir / "featinv.safetensors"
    if final.exists():
        log(f"4/4 control branch: cached ({final})")
        return final
    from featinv.training import train

    if run_dir.exists():
        shutil.rmtree(run_dir)
    cfg = merge(FeatInvConfig(model=cfg_model), {
        "backbone": {"name": "digits-cnn", "pretrained": False, "image_size": s.image_size},
        "data": {"batch_size": s.control_batch, "num_workers": 0},
        "train": {"lr": s.control_lr, "max_steps": s.control_steps, "drop_prob": 0.15, "log_images_every": 0,
                  "checkpoint_every": s.control_steps, "seed": seed},
    })
    log(f"4/4 control branch: featinv.training.train, {s.control_steps} steps")
    train(cfg, cache / "featinv_init.safetensors", run_dir, backbone=extractor,
          dataset=DigitsDataset(data["x_train"], data["y_train"]),
          accelerator="cuda" if dev.type == "cuda" else "cpu", devices=1, progress=True)
    return final


def load_demo_pair(out: str | Path = "featinv_demo", seed: int = 0, quick: bool = True, device: str = "cpu",
                   log=print, retrain: bool = False, settings: DemoSettings | None = None) -> DemoPair:
    """The demo's classifier + FeatInv model, trained on first use and cached under ``<out>/cache/``.

    The analyses, the app and the benchmarks use this pair; ``featinv demo`` adds the evaluation.
    log: where progress lines go (training stages also show tqdm bars on stderr)."""
    s = settings or (QUICK if quick else DEFAULT)
    dev = torch.device(device)
    cache = cache_dir(Path(out), s, seed, "quick" if quick else "default")
    if retrain and cache.exists():
        shutil.rmtree(cache)
    cache.mkdir(parents=True, exist_ok=True)
    data = load_digits_split(s.image_size)
    clf = _stage_classifier(cache, data, s, seed, dev, log)
    extractor = make_extractor(clf, s.image_size).to(dev).eval()
    with torch.no_grad():
        acc = (extractor.classify(rgb(data["x_test"]).to(dev)).argmax(1).cpu() == data["y_test"]).float().mean().item()
    log(f"   classifier test accuracy {100 * acc:.1f} %; inverted feature map {tuple(extractor.feature_shape)}")
    cfg_model = _stage_minisd(cache, data, s, seed, dev, extractor.feature_shape[0], log)
    final = _stage_control(cache, data, s, seed, dev, cfg_model, extractor, log)
    # With a random text encoder the training prompt is used verbatim (no ", " appended).
    sc = SampleConfig(steps=s.sample_steps, guidance_scale=s.guidance, prompt=PROMPT, uncond="features",
                      num_samples=s.samples, seed=seed)
    return DemoPair(model=load_featinv(final, device=dev).eval(), extractor=extractor.to(dev).eval(), classifier=clf,
                    data=data, settings=s, sample_config=sc, cache=cache, classifier_accuracy=acc)


def _reconstruct_held_out(pair: DemoPair, originals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """5. FeatInv and unconditional reconstructions of held-out digits (cached): (n, K, 3, S, S), (n, 1, 3, S, S)."""
    recon_file = pair.cache / "reconstructions.safetensors"
    if recon_file.exists():
        rec = load_file(recon_file)
        print(f"reconstructions: cached ({recon_file})")
        return rec["featinv"], rec["unconditional"]
    from featinv.reconstruct import Reconstructor

    dev, sc, n = next(pair.model.parameters()).device, pair.sample_config, len(originals)
    keys = [f"test{i}" for i in range(n)]
    rec_fi = Reconstructor(pair.model, pair.extractor, sc)
    # The unconditional model: zero feature map AND empty prompt (what joint dropout trained), no guidance.
    rec_un = Reconstructor(pair.model, pair.extractor, dataclasses.replace(sc, prompt="", guidance_scale=1.0, num_samples=1))
    chunks_fi, chunks_un = [], []
    chunk = 20
    with tqdm(total=n, desc="reconstructing held-out digits", unit="digit") as bar:
        for i in range(0, n, chunk):
            feats = rec_fi.features(originals[i:i + chunk].to(dev))
            chunks_fi.append(rec_fi.from_features(feats, keys[i:i + chunk]).cpu())
            chunks_un.append(rec_un.from_features(torch.zeros_like(feats), keys[i:i + chunk]).cpu())
            bar.update(len(feats))
    featinv_rec, uncond_rec = torch.cat(chunks_fi), torch.cat(chunks_un)
    atomic_save(lambda tmp: save_file({"featinv": featinv_rec.contiguous(), "unconditional": uncond_rec.contiguous()},
                                      tmp), recon_file)
    return featinv_rec, uncond_rec


def _write_report(out: Path, results: dict, pair: DemoPair, originals: torch.Tensor, featinv_rec: torch.Tensor,
                  uncond_rec: torch.Tensor) -> Path:
    """6. the picture (one digit per class) and the table; returns the picture's path."""
    from featinv.visualize import image_grid, save_png

    s, labels = pair.settings, pair.data["y_test"][:len(originals)]
    show = torch.tensor([int((labels == c).nonzero()[0]) for c in range(10) if (labels == c).any()])
    rows = [originals[show]] + [featinv_rec[show, k] for k in range(s.samples)] + [uncond_rec[show, 0]]
    picture = save_png(image_grid(torch.stack(rows), size=48), out / "demo.png")
    atomic_write_text(
        "# featinv demo: inverting a digits classifier's feature map\n\n" + markdown(results)
        + f"\nPicture: `demo.png` -- row 1: held-out originals; rows 2-{1 + s.samples}: FeatInv reconstructions "
          f"from the classifier's {tuple(pair.extractor.feature_shape)} feature map ({s.samples} samples); "
          f"last row: unconditional samples (feature map dropped).\n", out / "results.md")
    atomic_write_text(json.dumps(results, indent=2), out / "results.json")
    return picture


def run(out: str | Path = "featinv_demo", quick: bool = False, seed: int = 0, device: str = "cpu",
        retrain: bool = False, settings: DemoSettings | None = None) -> dict:
    """Run (or reuse) every stage; returns the results dict (also written to ``<out>/results.json``)."""
    t0 = time.time()
    out = Path(out)
    pair = load_demo_pair(out, seed, quick, device, retrain=retrain, settings=settings)
    s, dev = pair.settings, next(pair.model.parameters()).device
    n = min(s.eval_digits, len(pair.data["y_test"]))
    originals = rgb(pair.data["x_test"][:n])
    featinv_rec, uncond_rec = _reconstruct_held_out(pair, originals)
    results = {"featinv": metrics(pair.extractor, originals.to(dev), featinv_rec.to(dev)),
               "unconditional": metrics(pair.extractor, originals.to(dev), uncond_rec.to(dev)),
               "classifier_accuracy": pair.classifier_accuracy, "eval_digits": n, "samples": s.samples, "seed": seed,
               "quick": quick, "settings": dataclasses.asdict(s)}
    picture = _write_report(out, results, pair, originals, featinv_rec, uncond_rec)
    results["seconds"] = time.time() - t0
    print("\n" + markdown(results))
    print(f"picture: {picture}  (row 1 originals, rows 2-{1 + s.samples} FeatInv samples, last row unconditional)")
    print(f"table:   {out / 'results.md'}, {out / 'results.json'}   ({results['seconds']:.0f} s)")
    return results
