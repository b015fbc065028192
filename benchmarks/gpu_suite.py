"""One GPU suite: training and reconstruction throughput, MFU, peak memory and the demo, as JSON + Markdown.

Paste into the device tool (one H100; stops by itself within the budget; random weights, no network):

    PYTHONUNBUFFERED=1 PYTHONPATH=. python benchmarks/gpu_suite.py --out $OUT --budget-s 420

What it measures on the full config (``featinv_convnext``: miniSD + ControlNet, ConvNeXt-base at 288 px):
- training steps as ``featinv train`` runs them (FeatInvModule.training_step: batched backbone features,
  VAE encode, q_sample, ε loss; backward; fused AdamW on the control branch), bf16 autocast, eager and
  torch.compile + channels_last, at batch 8 and at the largest batch that fits (found by doubling and
  bisection on torch.cuda.OutOfMemoryError): images/s, MFU, peak memory;
- the same step the reference's way (fp32, the backbone over one image at a time, eager), for the ratio;
- reconstruction (Reconstructor: backbone + 50 DDIM steps with batched CFG + decode, bf16) at batch
  8/32/64, eager and compiled: images/s and the implied time for 10,000 ImageNet-val images;
- ``featinv demo --quick --device cuda`` in a subprocess: wall time and label agreement;
- sparse autoencoder training (``featinv.analysis.sae.train_sae``: TopK, d = 1024, 4,096 latents, k = 32,
  batch 4,096, Adam, AuxK, bf16 autocast) on random N(0, 1) batches already on the card: vectors/s over the
  steps after the first, and peak memory above what the suite's models hold (~10 s; after the demo, so it never
  takes time from a goal's figure).

MFU = FLOPs of one step counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmul, convolution
and attention FLOPs, forward + backward; see ``_common.count_flops``) / step time / the card's dense
bf16 peak (table below, or ``--peak-tflops``). Peak memory is ``torch.cuda.max_memory_allocated``.

Every figure runs under the remaining time budget: when it runs out the figure stops and the rest are
recorded as "not measured: time budget". A figure that raises is recorded with its error text.
Writes ``gpu_suite.json`` and ``gpu_suite.md`` to ``--out``; exit code 0 when every figure was made,
1 when any failed, 3 when none failed but some were not measured for lack of time.

``--cpu-smoke`` runs the same functions on the tiny config on the CPU (fp32, batch 2, 2 DDIM steps,
torch.compile with the ``aot_eager`` backend, the demo skipped; ~30 s of CPU time, most of it the two
torch.compile captures); tests/test_gpu_suite.py
runs it so that this script keeps working between GPU loans. To finish a run the budget cut, skip what
it measured in a second call (a group also skips the groups below it), e.g.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python benchmarks/gpu_suite.py --out $OUT --budget-s 420 \
        --skip train.eager.b8 train.reference recon.eager train.compiled.b8 recon.compiled.b64

"Eager" and "compiled" are the two variants: without, and with both torch.compile and channels_last.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from _common import GIB, peak_rss_gib, sync
from _figures import (
    GPU_PLAN,
    SMOKE_PLAN,
    Bench,
    Plan,
    build_bench,
    max_batch_figure,
    recon_figure,
    reset_peak,
    train_figure,
    train_max_figure,
)
from _suite import METRICS, Suite, goal_row, largest_batch, markdown, write_outputs  # noqa: F401 (tests: largest_batch)

GOALS = {"speedup": 4.0, "mfu_pct": 40.0, "peak_gib": 16.0, "time_10k_s": 540.0}
METRICS.setdefault("vectors_per_s", ("throughput", "vectors/s"))
# The SAE figure's sizes: the scale issue's shape on a GPU; a tiny one in --cpu-smoke (fp32 there).
SAE_SHAPES = {"gpu": {"d": 1024, "latents": 4096, "top_k": 32, "batch": 4096, "steps": 100},
              "cpu-smoke": {"d": 64, "latents": 256, "top_k": 8, "batch": 256, "steps": 4}}


def demo_figure(timeout_s: float) -> dict:
    """``featinv demo --quick --device cuda`` in a fresh process: wall time (imports, training, sampling)."""
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "featinv.cli", "demo", "--quick", "--device", "cuda", "--out", tmp]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=repo)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the demo did not finish within {timeout_s:.0f} s") from None
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
            raise RuntimeError(f"`featinv demo` exited with {proc.returncode}: {tail}")
        results = json.loads((Path(tmp) / "results.json").read_text())
    agreement = results["featinv"]["label_agreement"]
    return {"seconds": seconds, "label_agreement_pct": 100 * agreement,
            "note": f"unconditional baseline {100 * results['unconditional']['label_agreement']:.1f} %"}


def sae_figure(plan: Plan, seed: int = 0) -> dict:
    """featinv's TopK SAE trained on 8 random N(0, 1) batches (on the device, cycled) for ``steps`` steps: vectors/s
    between the end of the first step (allocations, Adam's state, kernel loads) and the end of the last, each
    synchronised; peak memory: on CUDA what the figure allocated above what was allocated before it (the suite's
    models), data included; on the CPU the process's peak RSS."""
    from featinv.analysis.sae import train_sae

    s, dev = SAE_SHAPES[plan.mode], torch.device(plan.device)
    cuda = dev.type == "cuda"
    base = torch.cuda.memory_allocated() if cuda else 0
    reset_peak(dev)
    g = torch.Generator(device=dev).manual_seed(seed)
    pool = [torch.randn(s["batch"], s["d"], generator=g, device=dev) for _ in range(8)]
    marks = []

    def progress(done: int, total: int | None) -> None:
        if done in (s["batch"], total):
            sync(dev)
            marks.append(time.perf_counter())

    _, stats = train_sae(lambda e: (pool[i % len(pool)] for i in range(s["steps"])), s["d"], s["latents"],
                         s["top_k"], "topk", device=plan.device, seed=seed, vectors=s["steps"] * s["batch"],
                         progress=progress)
    peak = (torch.cuda.max_memory_allocated() - base) / GIB if cuda else peak_rss_gib()
    return {"vectors_per_s": (s["steps"] - 1) * s["batch"] / (marks[-1] - marks[0]), "peak_gib": peak,
            "note": f"{s['steps']} steps, the first untimed; {stats['dead']} dead latents at the end"}


# ----- goals and output --------------------------------------------------------------------------------

def add_goals(suite: Suite, plan: Plan) -> None:
    """The issue's goals: training >= 4x the reference way, >= 40 % MFU within 16 GiB at the small batch
    (the faster of eager and compiled); 10,000 reconstructions within 9 minutes (the fastest batch)."""
    b = plan.train_batch
    ref = suite.value(f"train.reference.b{b}.images_per_s")
    ours = [(suite.value(f"train.{k}.b{b}.images_per_s"), k) for k in ("eager", "compiled")]
    ours = [(v, k) for v, k in ours if v is not None]
    best = max(ours) if ours else (None, None)
    speedup = best[0] / ref if best[0] is not None and ref else None
    needs = f"train.reference.b{b} and train.eager/compiled.b{b}"
    goal_row(suite, "goal.train_speedup", f"training at batch {b}: best way / reference way", "x", speedup,
             f">= {GOALS['speedup']:g}x", lambda v: v >= GOALS["speedup"], needs, f"best: {best[1]}")
    mfu = suite.value(f"train.{best[1]}.b{b}.mfu_pct") if best[1] else None
    goal_row(suite, "goal.train_mfu", f"training MFU at batch {b} ({best[1]})", "%", mfu,
             f">= {GOALS['mfu_pct']:g} %", lambda v: v >= GOALS["mfu_pct"], f"train.*.b{b}")
    mem = suite.value(f"train.{best[1]}.b{b}.peak_gib") if best[1] else None
    goal_row(suite, "goal.train_peak_gib", f"training peak memory at batch {b} ({best[1]})", "GiB", mem,
             f"<= {GOALS['peak_gib']:g} GiB", lambda v: v <= GOALS["peak_gib"], f"train.*.b{b}")
    times = [(r.value, r.key.rsplit(".", 1)[0]) for r in suite.rows.values()
             if r.key.startswith("recon.") and r.key.endswith(".time_10k_s") and r.status == "ok"]
    fastest = min(times) if times else (None, "")
    goal_row(suite, "goal.recon_10k_s", f"10,000 reconstructions, {plan.recon_steps} steps, fastest way", "s",
             fastest[0], f"<= {GOALS['time_10k_s']:g} s", lambda v: v <= GOALS["time_10k_s"], "recon.*",
             f"{fastest[1]}")


# ----- the run -----------------------------------------------------------------------------------------

def run_figures(suite: Suite, plan: Plan, args) -> Bench | None:
    """Every figure, those the goals need first, so that a short budget cuts the others."""
    bench = None

    def setup():
        nonlocal bench
        start = time.perf_counter()
        bench = build_bench(plan, args.peak_tflops)
        return {"seconds": time.perf_counter() - start, "note": f"peak for MFU: {bench.peak_source}"}

    train, recon = ["images_per_s", "mfu_pct", "peak_gib"], ["images_per_s", "time_10k_s", "peak_gib"]
    b, prec, compiled = plan.train_batch, "bf16 autocast" if plan.bf16 else "fp32", "torch.compile + channels_last"
    big, *smaller = sorted(plan.recon_batches, reverse=True)  # the big batch decides the 10k goal
    sae = SAE_SHAPES[plan.mode]
    sae_what = (f"SAE training (featinv TopK, d = {sae['d']}, {sae['latents']} latents, k = {sae['top_k']}, "
                f"batch {sae['batch']}, {prec})")

    def recon_compiled(rb: int) -> tuple:
        return (f"recon.compiled.b{rb}", f"reconstruction, {prec}, {compiled}, batch {rb}", recon,
                lambda: recon_figure(bench, rb, compiled=True), 45)

    figures = [
        ("setup", "build random-weight models", ["seconds"], setup, 5),
        (f"train.eager.b{b}", f"training step, {prec}, batched features, batch {b}", train,
         lambda: train_figure(bench, "eager", b), 10),
        (f"train.reference.b{b}", f"training step the reference's way (fp32, per-image features), batch {b}",
         ["images_per_s", "peak_gib"], lambda: train_figure(bench, "reference", b), 10),
        *[(f"recon.eager.b{rb}", f"reconstruction, {prec}, eager, batch {rb}", recon,
           lambda rb=rb: recon_figure(bench, rb, compiled=False), 10) for rb in plan.recon_batches],
        (f"train.compiled.b{b}", f"training step, {prec}, {compiled}, batch {b}", train,
         lambda: train_figure(bench, "compiled", b), 60),
        recon_compiled(big),
        ("demo", "`featinv demo --quick --device cuda`", ["seconds", "label_agreement_pct"],
         lambda: demo_figure(min(args.demo_timeout_s, suite.left() - 2)), 60),
        ("sae.topk", sae_what, ["vectors_per_s", "peak_gib"], lambda: sae_figure(plan), 15),
        ("train.max_batch", "largest eager training batch", ["batch"], lambda: max_batch_figure(bench), 30),
        ("train.eager.max", f"training step, {prec}, eager, largest batch", train,
         lambda: train_max_figure(bench, "eager"), 15),
        *[recon_compiled(rb) for rb in smaller],
        ("train.compiled.max", f"training step, {prec}, {compiled}, largest batch", train,
         lambda: train_max_figure(bench, "compiled"), 60),
    ]
    for group, what, metrics, fn, need_s in figures:
        skip = "skipped in --cpu-smoke (the demo has its own test)" if group == "demo" and not plan.demo else ""
        suite.measure(group, what, metrics, fn, need_s=need_s, skip_reason=skip)
    return bench


def environment(plan: Plan) -> dict:
    cuda = plan.device == "cuda"
    return {"mode": plan.mode, "preset": plan.preset, "device": plan.device,
            "card": torch.cuda.get_device_name() if cuda else f"CPU ({platform.machine()}, "
                                                              f"{torch.get_num_threads()} threads)",
            "torch": torch.__version__, "cuda": torch.version.cuda if cuda else "n/a",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "plan": dataclasses.asdict(plan)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="benchmarks/gpu_results", help="gets gpu_suite.json and gpu_suite.md")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny config on the CPU: the same code paths, seconds")
    p.add_argument("--budget-s", type=float, default=None,
                   help="time budget of the figures, counted after the imports (~10 s) "
                   "(default: 450 on a GPU, so that the whole run stays within 8 minutes; 300 smoke)")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak for MFU (default: from the card name)")
    p.add_argument("--skip", nargs="*", default=[], help="figure groups to skip, e.g. train.compiled demo")
    p.add_argument("--demo-timeout-s", type=float, default=240.0)
    args = p.parse_args(argv)
    plan = SMOKE_PLAN if args.cpu_smoke else GPU_PLAN
    if args.budget_s is not None:
        plan = dataclasses.replace(plan, budget_s=args.budget_s)
    if plan.device == "cuda":
        # set before the first CUDA allocation: less fragmentation while the batch search probes sizes
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        if not torch.cuda.is_available():
            print("gpu_suite: error: no CUDA device (use --cpu-smoke on a CPU)", file=sys.stderr)
            return 2
        torch.backends.cudnn.benchmark = True
        # one static graph per shape: train at two batches, sample at three, eval and train mode
        torch._dynamo.config.recompile_limit = 32
    if plan.threads:
        torch.set_num_threads(plan.threads)
    suite = Suite(plan.budget_s, args.skip)
    meta = environment(plan)
    with warnings.catch_warnings():  # training_step logs through self.log, a no-op without a Trainer
        warnings.filterwarnings("ignore", message=r".*self\.log\(\)")
        bench = run_figures(suite, plan, args)
    add_goals(suite, plan)
    peak = bench.peak_flops / 1e12 if bench and math.isfinite(bench.peak_flops) else None
    meta.update(wall_s=time.monotonic() - suite.start, budget_s=plan.budget_s, peak_tflops=peak,
                peak_source=bench.peak_source if bench else "setup did not run")
    write_outputs(Path(args.out), meta, suite)
    print(markdown(meta, list(suite.rows.values())))
    failed = [k for k, r in suite.rows.items() if r.status.startswith("failed")]
    missing = [k for k, r in suite.rows.items() if r.status.startswith("not measured")]
    print(f"wrote {Path(args.out) / 'gpu_suite.json'} and gpu_suite.md", file=sys.stderr)
    if failed:
        print(f"gpu_suite: {len(failed)} figure(s) failed: {', '.join(failed)}", file=sys.stderr)
    if missing:
        print(f"gpu_suite: {len(missing)} figure(s) not measured: {', '.join(missing)}", file=sys.stderr)
    return 1 if failed else 3 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
