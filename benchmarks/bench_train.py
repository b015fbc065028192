"""Training-step throughput and peak memory of the full FeatInv config; batched vs per-image features.

Prints a Markdown table. The per-image baseline is the reference's way of extracting features
(one image at a time, inside the dataset); both are measured here, side by side, in one run.
CPU: fp32 with few steps; GPU: bf16 autocast, with model FLOP utilisation from a FLOP count.
"""
from __future__ import annotations

import argparse

import torch
from _common import count_flops, mean_seconds as timed, peak_rss_gib, random_backbone

from featinv.backbone import BACKBONE_PRESETS
from featinv.config import PRESETS
from featinv.diffusion import eps_loss
from featinv.model import FeatInv


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="default: 2 on CPU, 8 on GPU")
    p.add_argument("--repeats", type=int, default=None)
    args = p.parse_args(argv)
    dev, gpu = args.device, args.device == "cuda"
    batch, repeats = args.batch or (8 if gpu else 2), args.repeats or (10 if gpu else 2)
    amp = torch.autocast(dev, dtype=torch.bfloat16, enabled=gpu)
    torch.manual_seed(0)
    bb_cfg = BACKBONE_PRESETS["convnext_base"]
    backbone = random_backbone(bb_cfg).to(dev)
    images = torch.rand(batch, 3, bb_cfg.image_size, bb_cfg.image_size, device=dev)
    rows = []
    with torch.no_grad(), amp:
        t_batched = timed(lambda: backbone(images), repeats, dev)
        t_single = timed(lambda: [backbone(images[i:i + 1]) for i in range(batch)], repeats, dev)
    rows.append(("ConvNeXt-base features, batched", batch / t_batched, ""))
    rows.append(("ConvNeXt-base features, one image at a time (reference)", batch / t_single,
                 f"batched is {t_single / t_batched:.2f}x faster"))
    model = FeatInv(PRESETS["featinv_convnext"].model).to(dev)
    model.requires_grad_(False)
    model.control.requires_grad_(True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ac = model.alphas_cumprod.to(dev)
    target = torch.rand(batch, 3, 256, 256, device=dev) * 2 - 1
    context = torch.randn(batch, 77, 768, device=dev)

    def step():
        with amp:
            with torch.no_grad():
                feats = backbone(images)
                latents = model.encode_images(target)
            t = torch.randint(0, 1000, (batch,), device=dev)
            loss = eps_loss(lambda x, tt: model(x, tt, context, feats), latents, t, torch.randn_like(latents), ac)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if gpu:
        torch.cuda.reset_peak_memory_stats()
    t_step = timed(step, repeats, dev)
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if gpu else peak_rss_gib()
    note = f"peak {'GPU memory' if gpu else 'RSS'} {mem:.1f} GiB"
    if gpu:
        flops = count_flops(step)  # matmul/conv/attention FLOPs of one step, forward and backward
        peak = 989e12 if "H100" in torch.cuda.get_device_name() else 790e12
        note += f", MFU ~{flops / t_step / peak:.1%} (bf16 peak {peak / 1e12:.0f} TFLOP/s)"
    rows.append((f"full training step (backbone + VAE encode + ControlNet/UNet fwd+bwd + AdamW), batch {batch}",
                 batch / t_step, note))
    name = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads), fp32"
    print(f"\n{name}, torch {torch.__version__}\n")
    print("| what | images/s | notes |\n|---|---:|---|")
    for what, ips, notes in rows:
        print(f"| {what} | {ips:.3f} | {notes} |")


if __name__ == "__main__":
    main()
