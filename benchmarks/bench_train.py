"""Training-step throughput and peak memory of the full FeatInv config, the reference's way beside ours.

Prints a Markdown table. Both rows are ``_figures.train_figure``, the function the GPU suite measures
with: FeatInvModule.training_step as ``featinv train`` runs it (backbone features, VAE encode, ε loss),
backward and fused AdamW on the control branch. "reference": fp32, the backbone over one image at a time
(the reference extracts features inside its dataset); "eager": batched features, bf16 autocast on a GPU.
Measured side by side in one run, on random weights (no download).

    python benchmarks/bench_train.py                  # CPU, fp32, batch 2: a few minutes
    python benchmarks/bench_train.py --device cuda    # bf16, batch 8, with MFU
"""
from __future__ import annotations

import argparse
import dataclasses
import warnings

import torch
from _figures import GPU_PLAN, build_bench, train_figure

from featinv.config import BACKBONE_PRESETS


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="default: 2 on CPU, 8 on GPU")
    p.add_argument("--repeats", type=int, default=None, help="timed steps (default: 2 on CPU, 10 on GPU)")
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    plan = dataclasses.replace(GPU_PLAN, mode="bench_train", device=args.device, bf16=gpu,
                               backbone=BACKBONE_PRESETS["convnext_base"], train_batch=args.batch or (8 if gpu else 2),
                               train_repeats=args.repeats or (10 if gpu else 2), train_warmup=2 if gpu else 1,
                               train_max_s=60.0 if gpu else 600.0)
    bench = build_bench(plan, None)
    batch, rows = plan.train_batch, []
    with warnings.catch_warnings():  # training_step logs through self.log, a no-op without a Trainer
        warnings.filterwarnings("ignore", message=".*self.log.*")
        for kind, what in (("reference", "the reference's way: fp32, per-image features"),
                           ("eager", f"featinv: batched features, {'bf16 autocast' if gpu else 'fp32'}")):
            rows.append((what, train_figure(bench, kind, batch)))
    speedup = rows[1][1]["images_per_s"] / rows[0][1]["images_per_s"]
    name = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{name}, torch {torch.__version__}, full config, batch {batch}; featinv {speedup:.2f}x the reference\n")
    print(f"| training step | images/s | peak {'GPU memory' if gpu else 'RSS'} (GiB) | MFU | notes |")
    print("|---|---:|---:|---:|---|")
    for what, r in rows:
        mfu = f"{r['mfu_pct']:.1f} %" if "mfu_pct" in r and gpu else "n/a"
        print(f"| {what} | {r['images_per_s']:.3f} | {r['peak_gib']:.1f} | {mfu} | {r['note']} |")


if __name__ == "__main__":
    main()
