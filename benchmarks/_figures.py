"""The figures, each measured by one function that the GPU suite (gpu_suite.py) and the single benchmarks
(bench_train.py) both call: training steps as ``featinv train`` runs them (FeatInvModule.training_step,
backward, fused AdamW), eager, compiled or the reference's way, and the Reconstructor's throughput.

A :class:`Plan` sizes a run (the GPU plan, the CPU smoke plan, or one a single benchmark makes); a
:class:`Bench` holds the random-weight models every figure of a run shares.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from _common import GIB, count_flops, mean_seconds, peak_rss_gib, random_backbone, reset_peak_rss, sync, timed
from _suite import cleanup, largest_batch

from featinv.config import BACKBONE_PRESETS, PRESETS, BackboneConfig, SampleConfig
from featinv.diffusion.reconstruct import Reconstructor
from featinv.nets.backbone import FeatureExtractor
from featinv.nets.model import FeatInv
from featinv.testing import random_featinv
from featinv.training.module import FeatInvModule

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendor data sheets; the first substring that the
# card's name contains wins (so "H100 PCIe" is matched before "H100").
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
                    ("A100", 312.0), ("L40S", 362.0))


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
    model = random_featinv(cfg, device=plan.device)
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


def compiled_parts(bench: Bench) -> tuple[torch.nn.Module, torch.nn.Module]:
    """torch.compile wrappers of (FeatInv, backbone), made once and shared by every compiled figure. They
    share the weights with the eager modules (nothing is swapped in or out): FeatInv's forward (ControlNet +
    UNet) and the backbone run compiled, its other methods (VAE encode and decode, the hint, the prompt)
    eagerly. A shape seen before reuses its graph; each new shape gets its own static graph."""
    if bench.compiled is None:
        compile_ = lambda m: torch.compile(m, backend=bench.plan.compile_backend, dynamic=False)  # noqa: E731
        bench.compiled = (compile_(bench.model), compile_(bench.backbone))
    return bench.compiled


@contextlib.contextmanager
def variant(bench: Bench, compiled: bool, per_image: bool = False):
    """(FeatInvModule, feature extractor) as one variant runs them.

    compiled: FeatInv's forward and the backbone through torch.compile, all weights channels_last (the
    memory format is restored on exit). per_image: the reference's feature extraction (:class:`PerImage`)."""
    model, backbone = compiled_parts(bench) if compiled else (bench.model, bench.backbone)
    extractor: torch.nn.Module = PerImage(backbone) if per_image else backbone
    if compiled:
        bench.model.to(memory_format=torch.channels_last)
        bench.backbone.to(memory_format=torch.channels_last)
    try:
        module = FeatInvModule(model, extractor, PRESETS[bench.plan.preset].train).to(bench.device)
        yield module, extractor
    finally:
        if compiled:
            bench.model.to(memory_format=torch.contiguous_format)
            bench.backbone.to(memory_format=torch.contiguous_format)


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
    with variant(bench, compiled=compiled, per_image=ref) as (module, _):
        module.train()
        opt = module.configure_optimizers()
        step = make_step(module, opt, train_batch(bench, batch, channels_last=compiled), bench.plan.bf16 and not ref)
        reset_peak(bench.device)
        seconds = mean_seconds(step, bench.plan.train_repeats, bench.device, warmup=bench.plan.train_warmup,
                               max_s=bench.plan.train_max_s)
        out = {"images_per_s": batch / seconds, "peak_gib": peak_gib(bench.device), "note": f"batch {batch}"}
        del opt, step
    # Counted after the timing (a CPU run timed right after the counting step ran 2x slower); eager: compiled
    # kernels bypass the counter.
    flops = None if ref else step_flops(bench, batch)
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
    with variant(bench, compiled=compiled) as (module, extractor):
        # warm-up at the same shapes with one step (kernel selection, compilation)
        Reconstructor(module.model, extractor, SampleConfig(steps=1), bf16=plan.bf16)(images, keys)
        rec = Reconstructor(module.model, extractor, SampleConfig(steps=plan.recon_steps), bf16=plan.bf16)
        reset_peak(bench.device)
        _, seconds = timed(lambda: rec(images, keys), bench.device)
    ips = batch / seconds
    return {"images_per_s": ips, "time_10k_s": 10_000 / ips, "peak_gib": peak_gib(bench.device),
            "note": f"batch {batch}, {plan.recon_steps} steps, CFG 1.75 batched, backbone + decode included"}
