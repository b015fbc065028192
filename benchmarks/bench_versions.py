"""One ε-prediction with control on the full config, featinv versions side by side (A/B, alternating).

Each version's ``featinv/`` is taken from git (``git archive``) into a temporary folder; each round runs
one fresh worker process per version, in a rotated order, so that load from other processes and
thermal drift hit every version alike. A worker builds the full model with random weights (seed 0,
every parameter N(0, 0.02): the values do not change the cost), makes one warm-up call, then times
``--calls`` calls; the table gives the median over rounds of each worker's mean, and each version's
time relative to the first.

    python benchmarks/bench_versions.py                                 # 0.3.0 and the working tree
    python benchmarks/bench_versions.py --revs 0.1.1 0.2.0 0.3.0 WORKTREE
    python benchmarks/bench_versions.py --revs 1fc01b9 WORKTREE --rounds 5 --batch 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VERSIONS = {"0.1.1": "1c6e2a5", "0.2.0": "1fc01b9", "0.3.0": "f6c3cba", "0.4.0": "9b39f04"}  # the commits each stop landed


def worker(batch: int, calls: int) -> dict:
    """In the worker process: time FeatInv's ε-prediction of whichever ``featinv`` is importable."""
    import importlib

    import torch

    from featinv.config import PRESETS

    try:  # 0.4.0 moved the networks into featinv.nets
        FeatInv = importlib.import_module("featinv.nets.model").FeatInv
    except ModuleNotFoundError:
        FeatInv = importlib.import_module("featinv.model").FeatInv

    torch.manual_seed(0)
    cfg = PRESETS["featinv_convnext"].model
    with torch.device("meta"):
        model = FeatInv(cfg)
    model = model.to_empty(device="cpu").eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        for name, b in model.named_buffers():
            if b.is_floating_point() and "alphas" not in name and "betas" not in name:
                b.normal_(0, 0.02)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 4, cfg.latent_size, cfg.latent_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    context = torch.randn(batch, 77, cfg.unet.context_dim, generator=g)
    feats = torch.randn(batch, cfg.adapter.in_channels, 9, 9, generator=g)
    with torch.no_grad():
        model(latents, t, context, feats)  # warm-up: oneDNN kernel selection, allocator growth
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            model(latents, t, context, feats)
            times.append(time.perf_counter() - start)
    return {"mean_s": sum(times) / len(times), "min_s": min(times), "threads": torch.get_num_threads()}


def checkout(rev: str, into: Path) -> Path:
    """``featinv/`` of ``rev`` (or of the working tree for WORKTREE) -> a folder to put on PYTHONPATH."""
    if rev == "WORKTREE":
        return REPO
    folder = into / rev
    folder.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "featinv"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--revs", nargs="+", default=["0.3.0", "WORKTREE"],
                   help=f"versions ({', '.join(VERSIONS)}), git revisions, or WORKTREE (this checkout)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--calls", type=int, default=3, help="timed calls per worker after one warm-up call")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.batch, args.calls)))
        return 0
    results: dict[str, list[float]] = {rev: [] for rev in args.revs}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {rev: checkout(VERSIONS.get(rev, rev), Path(tmp)) for rev in args.revs}
        for r in range(args.rounds):
            order = args.revs[r % len(args.revs):] + args.revs[:r % len(args.revs)]  # rotate who goes first
            for rev in order:
                env = {**os.environ, "PYTHONPATH": str(paths[rev])}
                out = subprocess.run([sys.executable, __file__, "--worker", "--batch", str(args.batch),
                                      "--calls", str(args.calls)], env=env, check=True, capture_output=True,
                                     text=True, cwd=tmp)
                res = json.loads(out.stdout.strip().splitlines()[-1])
                results[rev].append(res["mean_s"])
                print(f"round {r + 1}: {rev}: {1000 * res['mean_s']:.0f} ms ({res['threads']} threads)", flush=True)
    first = statistics.median(results[args.revs[0]])
    print(f"\n## ε-prediction with control, full config, batch {args.batch}, CPU fp32: median of {args.rounds} "
          f"rounds (each the mean of {args.calls} calls)\n")
    print(f"| version | median ms | rounds (ms) | time vs {args.revs[0]} |\n|---|---:|---|---:|")
    for rev, times in results.items():
        med = statistics.median(times)
        label = rev if rev != "WORKTREE" else "this change"
        print(f"| {label} | {1000 * med:.0f} | {', '.join(f'{1000 * t:.0f}' for t in times)} | {med / first:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
