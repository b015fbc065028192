"""Reconstruction throughput: the batched Reconstructor against the reference's way, side by side.

Reference way (PAPER.md "Sampling"): one image at a time, the conditional and unconditional
branches as two separate forwards, the adapter (hint) recomputed inside every forward.
Batched way: all images of the batch in one sampler run, both branches in one forward, the hint
computed once. Same model, weights, steps, noise and feature maps; random weights (throughput
only), backbone excluded (identical for both). Prints a Markdown table.

    python benchmarks/bench_sample.py                    # tiny + full, CPU: a few minutes
    python benchmarks/bench_sample.py --device cuda      # bf16 autocast on GPU
"""
from __future__ import annotations

import argparse
import time

import torch
from _common import timed

from featinv.config import PRESETS, SampleConfig
from featinv.diffusion.reconstruct import Reconstructor, sample_seed
from featinv.diffusion.samplers import ddim_sample, ddim_timesteps
from featinv.diffusion.schedule import alphas_cumprod
from featinv.nets.model import FeatInv
from featinv.testing import random_featinv


@torch.no_grad()
def reference_way(model: FeatInv, feats: torch.Tensor, keys: list[str], cfg: SampleConfig, bf16: bool) -> torch.Tensor:
    """(B, C, h, w) -> (B, 3, H, W) in [0, 1], one image and one branch per forward."""
    device = next(model.parameters()).device
    size, ts = model.cfg.latent_size, ddim_timesteps(cfg.steps)
    ctx_c, ctx_u = model.text_context([cfg.prompt]), model.text_context([""])
    images = []
    for f, key in zip(feats.to(device), keys):
        g = torch.Generator().manual_seed(sample_seed(cfg.seed, key, 0))
        x_T = torch.randn(1, 4, size, size, generator=g).to(device)

        def eps_fn(x, t, f=f[None]):
            e_c = model(x, t, ctx_c, feats=f)  # feats=: the adapter runs again in every forward
            e_u = model(x, t, ctx_u, feats=f)
            return e_u + cfg.guidance_scale * (e_c - e_u)

        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            latents = ddim_sample(eps_fn, x_T, alphas_cumprod(model.cfg.diffusion), ts, eta=cfg.eta, generator=[g])
            images.append(((model.decode_latents(latents).float() + 1) / 2).clamp(0, 1))
    return torch.cat(images)


def bench(name: str, model: FeatInv, batch: int, steps: int, device: torch.device, bf16: bool,
          repeat: int = 1) -> dict:
    """Images/s of both ways on identical inputs (best of ``repeat``, alternating, so that load from
    other processes hits both alike); also the max pixel difference between them."""
    cfg = SampleConfig(steps=steps)
    torch.manual_seed(0)
    c = model.cfg.adapter.in_channels
    feats = torch.randn(batch, c, 9, 9) if c == 1024 else torch.randn(batch, c, 2, 2)
    keys = [f"bench/{i}" for i in range(batch)]
    rec = Reconstructor(model, None, cfg, bf16=bf16)
    # warm-up (prompt cache, allocator, kernels) with one step; both ways share every kernel but batch size
    Reconstructor(model, None, SampleConfig(steps=1), bf16=bf16).from_features(feats[:1], keys[:1])
    t_ref = t_new = float("inf")
    for _ in range(repeat):
        ref, t = timed(lambda: reference_way(model, feats, keys, cfg, bf16), device)
        t_ref = min(t_ref, t)
        new, t = timed(lambda: rec.from_features(feats, keys)[:, 0], device)
        t_new = min(t_new, t)
    return dict(config=name, device=f"{device.type}{' bf16' if bf16 else ' fp32'}", batch=batch, steps=steps,
                ref=batch / t_ref, new=batch / t_new, ratio=t_ref / t_new,
                maxdiff=(ref.float().cpu() - new.float().cpu()).abs().max().item())


def build(preset: str, device: torch.device) -> FeatInv:
    """The preset's model with random weights (zero convs randomised so control does real work)."""
    return random_featinv(PRESETS[preset].model, device=device).eval()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", default="8x10", help="tiny config: BATCHxSTEPS ('none' to skip)")
    p.add_argument("--full", default="auto",
                   help="full config: BATCHxSTEPS, 'auto' (4x2 on CPU, 16x50 on GPU) or 'none'")
    p.add_argument("--repeat", type=int, default=2, help="timed repeats of the tiny config (best is kept)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    bf16 = device.type == "cuda"
    full = ("16x50" if device.type == "cuda" else "4x2") if args.full == "auto" else args.full
    rows = []
    for preset, spec in (("tiny", args.tiny), ("featinv_convnext", full)):
        if spec != "none":
            batch, steps = map(int, spec.split("x"))
            start = time.perf_counter()
            model = build(preset, device)
            print(f"{preset}: built in {time.perf_counter() - start:.0f} s", flush=True)
            repeat = args.repeat if preset == "tiny" else 1  # the full model on CPU: one run is minutes
            rows.append(bench(preset, model, batch, steps, device, bf16, repeat))
            del model
            print(rows[-1], flush=True)
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", {torch.cuda.get_device_name()}" if device.type == "cuda" else ""))
    print("| config | device | batch | steps | reference way img/s | batched img/s | speed-up | max pixel diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['device']} | {r['batch']} | {r['steps']} | {r['ref']:.3f} | {r['new']:.3f} "
              f"| {r['ratio']:.2f}x | {r['maxdiff']:.2g} |")


if __name__ == "__main__":
    main()
