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
- ``featinv demo --quick --device cuda`` in a subprocess: wall time and label agreement.

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
import contextlib
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from _common import (GIB, count_flops, mean_seconds, peak_rss_gib, random_backbone, random_featinv, reset_peak_rss,
                     sync, timed)
from _suite import Suite, cleanup, goal_row, largest_batch, markdown, write_outputs

from featinv.backbone import BACKBONE_PRESETS, FeatureExtractor
from featinv.config import PRESETS, BackboneConfig, SampleConfig
from featinv.model import FeatInv
from featinv.reconstruct import Reconstructor
from featinv.training import FeatInvModule

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendor data sheets; the first substring that the
# card's name contains wins (so "H100 PCIe" is matched before "H100").
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
                    ("A100", 312.0), ("L40S", 362.0))
GOALS = {"speedup": 4.0, "mfu_pct": 40.0, "peak_gib": 16.0, "time_10k_s": 540.0}


@dataclass(frozen=True)
class Plan:
    """Sizes of one run; the GPU run and the CPU smoke run differ only here."""

    mode: str
    device: str
    preset: str
    backbone: BackboneConfig
    bf16: bool
    adapter_width: int          # 0: the preset's
    train_batch: int
    max_batch_cap: int          # the search for the largest batch stops here
    train_warmup: int           # untimed steps before timing (the first allocates AdamW's state, compiles)
    train_repeats: int
    train_max_s: float          # timing of one training figure stops after this (at least one step)
    recon_batches: tuple[int, ...]
    recon_steps: int
    compile_backend: str
    demo: bool
    budget_s: float
    threads: int = 0            # torch CPU threads (0: torch's default)


GPU_PLAN = Plan(mode="gpu", device="cuda", preset="featinv_convnext", backbone=BACKBONE_PRESETS["convnext_base"],
                bf16=True, adapter_width=0, train_batch=8, max_batch_cap=1024, train_warmup=2, train_repeats=10,
                train_max_s=15.0, recon_batches=(8, 32, 64), recon_steps=50, compile_backend="inductor", demo=True,
                budget_s=450.0)
# The smoke run: the tiny preset with a narrow adapter (its 512-wide convs at 32x32 dominate a CPU step);
# aot_eager traces forward and backward as inductor does, without a C++ toolchain or code generation; the
# search cap equals the batch, so the compiled largest-batch figure reuses the batch-2 graph instead of
# compiling another (tests/test_gpu_suite.py checks the search itself with a fake out-of-memory); one
# thread, because on a shared CPU two threads that wait for each other on every small op run many times slower.
SMOKE_PLAN = Plan(mode="cpu-smoke", device="cpu", preset="tiny", backbone=PRESETS["tiny"].backbone, bf16=False,
                  adapter_width=32, train_batch=2, max_batch_cap=2, train_warmup=1, train_repeats=1, train_max_s=5.0,
                  recon_batches=(2,), recon_steps=2, compile_backend="aot_eager", demo=False, budget_s=300.0,
                  threads=1)


@dataclass
class Bench:
    """The models every figure shares, built once."""

    plan: Plan
    model: FeatInv
    backbone: FeatureExtractor
    peak_flops: float
    peak_source: str
    flops: dict[int, int] = field(default_factory=dict)  # batch -> counted FLOPs of one training step
    max_batch: int | None = None
    compiled: tuple[torch.nn.Module, ...] | None = None

    @property
    def device(self) -> torch.device:
        return torch.device(self.plan.device)


def peak_flops(plan: Plan, override_tflops: float | None) -> tuple[float, str]:
    """(FLOP/s the MFU is relative to, where the number comes from)."""
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    if plan.device == "cpu":  # no data sheet for an arbitrary CPU: a measured fp32 GEMM stands in
        a = torch.randn(2048, 2048)
        seconds = min(timed(lambda: a @ a, "cpu")[1] for _ in range(4))
        return 2 * 2048 ** 3 / seconds, "best of 4 fp32 2048^3 GEMMs on this CPU (smoke run)"
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12, f"dense bf16 data-sheet peak of {key}"
    raise ValueError(f"no bf16 peak known for {name!r}: pass --peak-tflops")


def build_bench(plan: Plan, override_tflops: float | None) -> Bench:
    """Random-weight backbone and FeatInv (adapter channels = the backbone's), on the plan's device."""
    backbone = random_backbone(plan.backbone).to(plan.device)
    cfg = PRESETS[plan.preset].model
    adapter = dataclasses.replace(cfg.adapter, in_channels=backbone.feature_shape[0],
                                  width=plan.adapter_width or cfg.adapter.width)
    cfg = dataclasses.replace(cfg, adapter=adapter)
    model = random_featinv(cfg, plan.device)
    try:
        peak, source = peak_flops(plan, override_tflops)
    except ValueError as e:
        peak, source = math.nan, str(e)
    return Bench(plan, model, backbone, peak, source)


class PerImage(torch.nn.Module):
    """The reference's feature extraction: the backbone over one image at a time (a Python loop)."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.backbone(x[None]) for x in images])


def compiled_parts(bench: Bench) -> tuple[torch.nn.Module, ...]:
    """torch.compile wrappers of (UNet, ControlNet, backbone), made once and shared by every compiled
    figure: a shape seen before reuses its graph; each new shape gets its own static graph."""
    if bench.compiled is None:
        compile_ = lambda m: torch.compile(m, backend=bench.plan.compile_backend, dynamic=False)  # noqa: E731
        bench.compiled = (compile_(bench.model.unet), compile_(bench.model.control), compile_(bench.backbone))
    return bench.compiled


@contextlib.contextmanager
def variant(bench: Bench, compiled: bool, per_image: bool = False):
    """(FeatInvModule, feature extractor) as one variant runs them; the shared model is restored on exit.

    compiled: the UNet, the ControlNet and the backbone through torch.compile, all weights channels_last."""
    model, backbone, saved = bench.model, bench.backbone, (bench.model.unet, bench.model.control)
    extractor: torch.nn.Module = PerImage(backbone) if per_image else backbone
    if compiled:
        model.to(memory_format=torch.channels_last)
        backbone.to(memory_format=torch.channels_last)
        model.unet, model.control, extractor = compiled_parts(bench)
    try:
        module = FeatInvModule(model, extractor, PRESETS[bench.plan.preset].train).to(bench.device)
        yield module, extractor
    finally:
        model.unet, model.control = saved
        if compiled:
            model.to(memory_format=torch.contiguous_format)
            backbone.to(memory_format=torch.contiguous_format)


def train_batch(bench: Bench, batch: int, channels_last: bool = False) -> dict:
    """A batch as ``featinv.data`` yields it: feat_input (B, 3, S, S) in [0, 1], image (B, 3, H, W) in [-1, 1]."""
    g = torch.Generator().manual_seed(batch)
    s, size = bench.backbone.image_size, bench.model.cfg.image_size
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    images = {"feat_input": torch.rand(batch, 3, s, s, generator=g),
              "image": torch.rand(batch, 3, size, size, generator=g) * 2 - 1}
    out = {k: v.to(bench.device).contiguous(memory_format=fmt) for k, v in images.items()}
    return {**out, "index": torch.arange(batch, device=bench.device), "skipped": 0}


def make_step(module: FeatInvModule, optimizer: torch.optim.Optimizer, batch: dict, bf16: bool,
              update: bool = True) -> Callable[[], None]:
    """One training step as Lightning's bf16-mixed runs it: autocast around training_step, then
    backward and the optimizer step outside it (``update=False``: forward + backward only)."""
    def step():
        with torch.autocast(module.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = module.training_step(batch, 0)
        loss.backward()
        if update:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()


def peak_gib(device: torch.device) -> float:
    """CUDA: peak allocated by tensors; CPU: the process's peak RSS."""
    return torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else peak_rss_gib()


def step_flops(bench: Bench, batch: int) -> int:
    """FLOPs of one training step (forward + backward) at ``batch``, counted eagerly once per batch."""
    if batch not in bench.flops:
        with variant(bench, compiled=False) as (module, _):
            module.train()
            opt = module.configure_optimizers()
            bench.flops[batch] = count_flops(make_step(module, opt, train_batch(bench, batch), bench.plan.bf16,
                                                       update=False))
    return bench.flops[batch]


# ----- figures: each returns {metric: value} and may raise --------------------------------------------

def train_figure(bench: Bench | None, kind: str, batch: int) -> dict:
    """kind: "reference" (fp32, per-image features, eager), "eager" (bf16 if the plan says so, batched
    features) or "compiled" (eager + torch.compile + channels_last)."""
    if bench is None:
        raise RuntimeError("setup failed")
    ref, compiled = kind == "reference", kind == "compiled"
    flops = None if ref else step_flops(bench, batch)  # eager: compiled kernels bypass the counter
    with variant(bench, compiled=compiled, per_image=ref) as (module, _):
        module.train()
        opt = module.configure_optimizers()
        step = make_step(module, opt, train_batch(bench, batch, channels_last=compiled), bench.plan.bf16 and not ref)
        reset_peak(bench.device)
        seconds = mean_seconds(step, bench.plan.train_repeats, bench.device, warmup=bench.plan.train_warmup,
                               max_s=bench.plan.train_max_s)
        out = {"images_per_s": batch / seconds, "peak_gib": peak_gib(bench.device), "note": f"batch {batch}"}
        del opt, step
    if flops is not None:
        out["mfu_pct"] = 100 * flops / seconds / bench.peak_flops
        out["note"] += f", {flops / batch / 1e9:.1f} GFLOP/image counted, {seconds * 1000:.1f} ms/step"
        if not math.isfinite(bench.peak_flops):
            out["note"] += f"; MFU: {bench.peak_source}"
    return out


def train_max_figure(bench: Bench | None, kind: str) -> dict:
    """train_figure at the largest batch found; if timing runs out of memory there (fragmentation, a
    compiled graph's own buffers), again at 7/8 of the batch, at most twice, saying so in the note."""
    if bench is None or bench.max_batch is None:
        raise RuntimeError("setup failed" if bench is None else "the largest batch was not found")
    batch, notes = bench.max_batch, ""
    for _ in range(3):
        try:
            out = train_figure(bench, kind, batch)
            return {**out, "note": out["note"] + notes}
        except torch.cuda.OutOfMemoryError:
            pass  # leave the except block first, so that the traceback's tensors can be freed
        cleanup()
        notes += f"; batch {batch} ran out of memory while timing"
        batch = batch * 7 // 8
    raise torch.cuda.OutOfMemoryError(notes.lstrip("; "))


def max_batch_figure(bench: Bench | None) -> dict:
    """Largest eager training batch that fits (weights, gradients and AdamW state included)."""
    if bench is None:
        raise RuntimeError("setup failed")
    with variant(bench, compiled=False) as (module, _):
        module.train()
        opt = module.configure_optimizers()

        def try_batch(b: int) -> None:
            try:
                make_step(module, opt, train_batch(bench, b), bench.plan.bf16)()
                sync(bench.device)
            finally:
                opt.zero_grad(set_to_none=True)

        try_batch(bench.plan.train_batch)  # allocates the optimizer state before the search
        bench.max_batch = largest_batch(try_batch, bench.plan.train_batch, bench.plan.max_batch_cap)
        del opt
    capped = " (the search cap)" if bench.max_batch == bench.plan.max_batch_cap else ""
    return {"batch": bench.max_batch, "note": f"eager, {bench.plan.train_batch}..{bench.plan.max_batch_cap}{capped}"}


def recon_figure(bench: Bench | None, batch: int, compiled: bool) -> dict:
    """Reconstructor on random images: backbone, ``recon_steps`` DDIM steps with batched CFG, decode."""
    if bench is None:
        raise RuntimeError("setup failed")
    plan = bench.plan
    g = torch.Generator().manual_seed(batch)
    s = bench.backbone.image_size
    images = torch.rand(batch, 3, s, s, generator=g)
    if compiled:
        images = images.contiguous(memory_format=torch.channels_last)
    keys = [f"suite/{i}" for i in range(batch)]
    with variant(bench, compiled=compiled) as (_, extractor):
        # warm-up at the same shapes with one step (kernel selection, compilation)
        Reconstructor(bench.model, extractor, SampleConfig(steps=1), bf16=plan.bf16)(images, keys)
        rec = Reconstructor(bench.model, extractor, SampleConfig(steps=plan.recon_steps), bf16=plan.bf16)
        reset_peak(bench.device)
        _, seconds = timed(lambda: rec(images, keys), bench.device)
    ips = batch / seconds
    return {"images_per_s": ips, "time_10k_s": 10_000 / ips, "peak_gib": peak_gib(bench.device),
            "note": f"batch {batch}, {plan.recon_steps} steps, CFG 1.75 batched, backbone + decode included"}


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
