"""Parameter counts and ε-prediction-with-control cost of a FeatInv config, as a Markdown table.

    python benchmarks/bench_model.py [--config featinv_convnext] [--batch 2] [--runs 3] [--devices cpu,cuda]

Random weights (timing does not depend on them). CPU: fp32, peak memory is the growth of the process's
peak RSS (VmHWM, reset through /proc/self/clear_refs) over the RSS before the timed calls. GPU: bf16
autocast, peak memory from torch.cuda.max_memory_allocated. Both peaks cover the warm-up call.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from contextlib import nullcontext

import torch
from _common import GIB, reset_peak_rss, status_kib

from featinv.checkpoint.config_file import load_config
from featinv.nets.model import FeatInv


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def param_table(model: FeatInv) -> str:
    """Markdown rows: parameters per component (the model may live on the meta device)."""
    rows = [("UNet", _params(model.unet)),
            ("ControlNet (incl. adapter)", _params(model.control)),
            ("adapter alone (input_hint_block)", _params(model.control.input_hint_block)),
            ("VAE", _params(model.vae)),
            ("text encoder", _params(model.text_encoder)),
            ("total", _params(model))]
    return "\n".join(["| component | parameters |", "|---|---:|"] + [f"| {n} | {p:,} |" for n, p in rows])


def _inputs(model: FeatInv, batch: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Random latents (B, 4, h, w), t (B,) int64, context (B, 77, D) and feature map (B, C_f, 9, 9)."""
    cfg, g = model.cfg, torch.Generator().manual_seed(0)
    latents = torch.randn(batch, cfg.unet.in_channels, cfg.latent_size, cfg.latent_size, generator=g)
    t = torch.randint(0, cfg.diffusion.timesteps, (batch,), generator=g)
    context = torch.randn(batch, cfg.text.context_length, cfg.unet.context_dim, generator=g)
    feats = torch.randn(batch, cfg.adapter.in_channels, 9, 9, generator=g)
    return tuple(x.to(device) for x in (latents, t, context, feats))


@torch.no_grad()
def time_eps(model: FeatInv, batch: int, runs: int, device: torch.device) -> dict:
    """Mean seconds per ε-prediction with control after one warm-up call, and peak memory."""
    cuda = device.type == "cuda"
    inputs = _inputs(model, batch, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    # The memory baseline is taken before the warm-up call: memory the CPU allocator keeps after a
    # call stays in RSS, so a baseline after warm-up would hide the activations.
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset = reset_peak_rss()
        base = status_kib("VmRSS") * 1024
    with autocast:
        model(*inputs)  # warm-up: oneDNN / cuBLAS kernel selection, allocator growth
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            model(*inputs)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    if cuda:
        peak, total = torch.cuda.max_memory_allocated() - base, torch.cuda.max_memory_allocated()
    else:
        peak = status_kib("VmHWM") * 1024 - base if reset else None
        total = status_kib("VmHWM") * 1024
    return {"mean_s": sum(times) / len(times), "min_s": min(times), "peak_extra": peak, "peak_total": total}


def _row(name: str, precision: str, r: dict, what: str) -> str:
    extra = "n/a (VmHWM not resettable)" if r["peak_extra"] is None else f"{r['peak_extra'] / GIB:.2f} GiB"
    ms = 1000 * r["mean_s"]
    return (f"| {name} | {precision} | {ms:,.1f} ms | {1000 * r['min_s']:,.1f} ms | {extra} "
            f"| {r['peak_total'] / GIB:.2f} GiB {what} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="featinv_convnext", help="preset name or YAML")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--runs", type=int, default=3, help="timed calls after one warm-up call")
    p.add_argument("--devices", default="cpu,cuda", help="comma-separated; cuda is skipped when unavailable")
    args = p.parse_args(argv)
    cfg = load_config(args.config).model

    with torch.device("meta"):
        print(f"## Parameters ({args.config})\n\n{param_table(FeatInv(cfg))}\n")

    devices = [d for d in args.devices.split(",") if d == "cpu" or (d == "cuda" and torch.cuda.is_available())]
    rows = []
    if devices:
        start = time.perf_counter()
        model = FeatInv(cfg).eval().requires_grad_(False)  # random init of ~1.4 B values: tens of seconds on CPU
        print(f"(model init on CPU: {time.perf_counter() - start:.0f} s)\n")
    for device in devices:
        if device == "cpu":
            name = f"CPU, {torch.get_num_threads()} threads ({platform.processor() or platform.machine()})"
            rows.append(_row(name, "fp32", time_eps(model, args.batch, args.runs, torch.device("cpu")), "RSS"))
        else:
            model.cuda()
            name = torch.cuda.get_device_name()
            rows.append(_row(name, "bf16 autocast", time_eps(model, args.batch, args.runs, torch.device("cuda")),
                             "allocated"))
            model.cpu()
    if rows:
        lat = cfg.latent_size
        print(f"## ε-prediction with control: batch {args.batch}, {lat}×{lat} latents, "
              f"{cfg.adapter.in_channels}×9×9 feature map, no_grad, mean of {args.runs} calls after 1 warm-up\n\n"
              "| device | precision | mean / call | min / call | peak memory above weights+inputs | peak total |\n"
              "|---|---|---:|---:|---:|---:|\n" + "\n".join(rows))
        print(f"\n(host: {os.cpu_count()} CPUs; torch {torch.__version__})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
