"""The demo's calibration, seed by seed: wall time of ``featinv demo`` and its acceptance margin.

Each seed runs ``featinv demo [--quick] --retrain`` in a fresh process (imports included, as a user
runs it), one after another so that the timings do not disturb each other, and prints a Markdown table:
label agreement for FeatInv and the unconditional baseline, their ratio, the acceptance bar
(>= 60 % and >= 2x the baseline) and the seconds it took.

    python benchmarks/bench_demo.py --quick --seeds 0 1 2 3 4     # ~2 minutes a seed on a 2-core CPU
    python benchmarks/bench_demo.py --seeds 0 1 2                 # the default demo
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_seed(seed: int, quick: bool, device: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "featinv.cli", "demo", "--out", str(out), "--seed", str(seed), "--retrain",
           "--device", device] + (["--quick"] if quick else [])
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"seed {seed}: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    results = json.loads((out / "results.json").read_text())
    return {"seed": seed, "seconds": seconds, **{k: results[k] for k in ("featinv", "unconditional")}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            rows.append(run_seed(seed, args.quick, args.device, Path(tmp) / f"seed{seed}"))
            r = rows[-1]
            print(f"seed {seed}: {100 * r['featinv']['label_agreement']:.1f} % vs "
                  f"{100 * r['unconditional']['label_agreement']:.1f} %, {r['seconds']:.0f} s", file=sys.stderr)
    print(f"\n`featinv demo{' --quick' if args.quick else ''}` on {args.device}\n")
    print("| seed | FeatInv label agreement | unconditional | ratio | feature cosine FeatInv / uncond. | bar met | seconds |")
    print("|---:|---:|---:|---:|---|---|---:|")
    for r in rows:
        fi, un = r["featinv"]["label_agreement"], r["unconditional"]["label_agreement"]
        ok = fi >= 0.6 and fi >= 2 * un
        print(f"| {r['seed']} | {100 * fi:.1f} % | {100 * un:.1f} % | {fi / max(un, 1e-9):.1f}x | "
              f"{r['featinv']['feature_cosine_spatial']:.3f} / {r['unconditional']['feature_cosine_spatial']:.3f} | "
              f"{'yes' if ok else 'NO'} | {r['seconds']:.0f} |")
    agreements = [r["featinv"]["label_agreement"] for r in rows]
    print(f"\nFeatInv label agreement: min {100 * min(agreements):.1f} %, mean {100 * statistics.mean(agreements):.1f} %"
          f" (bar 60 %); wall time: max {max(r['seconds'] for r in rows):.0f} s, "
          f"mean {statistics.mean(r['seconds'] for r in rows):.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
