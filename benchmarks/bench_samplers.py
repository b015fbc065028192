"""Sampler fidelity against steps: DDIM and DPM-Solver++(2M), ranked by their error to the converged solve.

Label agreement on the demo barely depends on steps (its 4x4 latents are easy), so solvers are ranked
by how far their final latents (and decoded pixels) are from the converged deterministic solution of
the same probability-flow ODE from the same starting noise (η = 0). The converged path is
DPM-Solver++(2M) on a fine grid (``--ref-steps``, default 100, about every 10th timestep); its change
from half as many steps is printed as a bound on its own error. All samplers solve the same problem
only when they start at the same timestep, so the ranking uses "trailing" spacing (all start at
t=999); the default DDIM (reference spacing, which starts lower, e.g. t=981 for S=50) is measured
against its own converged path from its own first timestep.

Problems: the tiny config (8x8 latents) with seeded random weights (zero-initialised layers made
random) and random feature maps, guidance 1.75, 2 samples; the demo pair (the cached `featinv demo
--quick`, seed 0) with its sample settings on 10 digits; and the demo's label agreement with its own
60 digits x 2 samples for a few sampler settings. Prints Markdown tables.

    python benchmarks/bench_samplers.py --demo-out /work/demo_shared   # ~5 min on 2 cores at load 4 (per-call estimate)
    python benchmarks/bench_samplers.py --all                          # + more rows: ~25 min at load 9 on 2 cores
    python benchmarks/bench_samplers.py --skip-demo                    # tiny only

Wall time per image is model calls x one guided forward plus the sampler's own arithmetic (printed
last: tens of µs per step); on a contended CPU the measured ms / image swing several-fold between
identical runs, so compare solvers by model calls there.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from featinv.config import PRESETS, SampleConfig
from featinv.diffusion.reconstruct import Reconstructor
from featinv.diffusion.samplers import ddim_sample, ddim_timesteps, dpmpp_2m_sample
from featinv.diffusion.schedule import alphas_cumprod
from featinv.nets.model import FeatInv
from featinv.testing import random_featinv

STEPS = (5, 8, 10, 15, 20, 50)
# (label, sampler function(eps_fn, x_T, alphas_cumprod, timesteps), spacing, step counts)
VARIANTS = [
    ("ddim", ddim_sample, "trailing", STEPS),
    ("dpmpp_2m", dpmpp_2m_sample, "trailing", STEPS),
]
# --all adds these. The reference spacing's rows are the demo's 20 and the default 50 only: each needs its
# own converged solve (from its own first timestep).
EXTRA_VARIANTS = [
    ("dpmpp_2m, lower-order final step", lambda *a: dpmpp_2m_sample(*a, lower_order_final=True), "trailing",
     (5, 8, 10)),
    ("ddim, reference spacing (default)", ddim_sample, "reference", (20, 50)),
]
# The demo's label agreement with its own settings (60 digits x 2 samples): (sampler, spacing, steps)
DEMO_SETTINGS = [("ddim", "reference", 20), ("ddim", "reference", 10), ("ddim", "reference", 5),
                 ("ddim", "trailing", 5), ("dpmpp_2m", "reference", 5), ("dpmpp_2m", "trailing", 5),
                 ("dpmpp_2m", "trailing", 10), ("dpmpp_2m", "trailing", 20)]


@dataclasses.dataclass
class Problem:
    name: str
    eps_fn: object                 # guided ε-callable
    x_T: torch.Tensor              # (N, 4, h, w) starting noise
    model: FeatInv


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).pow(2).mean().sqrt().item()


def pixels(model: FeatInv, latents: torch.Tensor) -> torch.Tensor:
    return ((model.decode_latents(latents).float() + 1) / 2).clamp(0, 1)


def tiny_problem(n: int = 2) -> Problem:
    """The tiny preset at 8x8 latents, every zero-initialised layer made random (else ε = 0)."""
    cfg = PRESETS["tiny"].model
    cfg = dataclasses.replace(cfg, latent_size=8, adapter=dataclasses.replace(cfg.adapter, grid=8))
    model = random_featinv(cfg, seed=0).eval()
    rec = Reconstructor(model, None, SampleConfig(num_samples=1))
    feats = torch.randn(n, cfg.adapter.in_channels, 2, 2, generator=torch.Generator().manual_seed(1))
    keys = [f"tiny{i}" for i in range(n)]
    return Problem("tiny config, random weights", rec.eps_fn(feats), rec.start_noise(keys)[0], model)


def load_demo(out: str) -> tuple[FeatInv, object, dict, SampleConfig]:
    """The cached quick demo pair (seed 0): model, extractor, digits data, the demo's sample settings."""
    from featinv.demo.pair import load_demo_pair

    pair = load_demo_pair(out, seed=0, quick=True)
    return pair.model, pair.extractor, pair.data, pair.sample_config


def demo_problem(pair, n: int = 10) -> Problem:
    """The demo pair with its sample settings, n held-out digits x 1 sample (its starting noise)."""
    from featinv.demo.digits import rgb

    model, extractor, data, sc = pair
    rec = Reconstructor(model, extractor, dataclasses.replace(sc, num_samples=1))
    keys = [f"test{i}" for i in range(n)]
    return Problem(f"demo pair (quick, seed 0; {n} digits, guidance {sc.guidance_scale})",
                   rec.eps_fn(rec.features(rgb(data["x_test"][:n]))), rec.start_noise(keys)[0], model)


def demo_agreement(pair) -> list[dict]:
    """Label agreement of the demo's reconstructions (its digits, samples, seeds) per sampler setting."""
    from featinv.demo.digits import rgb
    from featinv.demo.stages import QUICK

    model, extractor, data, sc = pair
    originals = rgb(data["x_test"][:QUICK.eval_digits])
    labels = extractor.classify(originals).argmax(1).repeat_interleave(sc.num_samples)
    keys = [f"test{i}" for i in range(len(originals))]  # the demo's keys, hence its starting noise
    rows = []
    for sampler, spacing, steps in DEMO_SETTINGS:
        rec = Reconstructor(model, extractor, dataclasses.replace(sc, sampler=sampler, spacing=spacing, steps=steps))
        feats = rec.features(originals)
        start = time.perf_counter()
        images = rec.from_features(feats, keys).flatten(0, 1)
        seconds = time.perf_counter() - start
        agree = (extractor.classify(images).argmax(1) == labels).float().mean().item()
        rows.append(dict(sampler=sampler, spacing=spacing, steps=steps, agree=agree,
                         calls=len(ddim_timesteps(steps, spacing=spacing)), ms=1000 * seconds / len(images)))
        print(f"  demo {sampler} {spacing} S={steps}: label agreement {100 * agree:.1f} %", flush=True)
    return rows


def converged(p: Problem, top: int, ref_steps: int, solver=dpmpp_2m_sample) -> torch.Tensor:
    """The ODE solved on a fine grid from ``top`` down to ᾱ[0] (ref_steps timesteps, t >= 1)."""
    ts = torch.linspace(1, top, ref_steps).round().long().unique()
    return solver(p.eps_fn, p.x_T, alphas_cumprod(p.model.cfg.diffusion), ts)


def run(p: Problem, ref_steps: int, variants: list) -> list[dict]:
    """Error to the converged solve of every (sampler, S) in VARIANTS, plus model calls and time."""
    ac = alphas_cumprod(p.model.cfg.diffusion)
    start = time.perf_counter()
    refs = {999: converged(p, 999, ref_steps)}
    ref_time = time.perf_counter() - start
    half = converged(p, 999, ref_steps // 2)
    print(f"{p.name}: converged solve = DPM-Solver++(2M), {ref_steps} steps from t=999 ({ref_time:.0f} s); "
          f"its change from {ref_steps // 2} steps: latent RMSE {rmse(half, refs[999]):.1e} "
          f"(latent std {refs[999].std():.2f})", flush=True)
    ref_pixels, rows = {999: pixels(p.model, refs[999])}, []
    for label, solver, spacing, steps_list in variants:
        for steps in steps_list:
            ts = ddim_timesteps(steps, spacing=spacing)
            top = int(ts[-1])
            if top not in refs:
                refs[top] = converged(p, top, ref_steps)
                ref_pixels[top] = pixels(p.model, refs[top])
            start = time.perf_counter()
            latents = solver(p.eps_fn, p.x_T, ac, ts)
            seconds = time.perf_counter() - start
            rows.append(dict(sampler=label, steps=steps, calls=len(ts), latent=rmse(latents, refs[top]),
                             pixel=rmse(pixels(p.model, latents), ref_pixels[top]), ms=1000 * seconds / len(p.x_T)))
            print(f"  {label:34s} S={steps:3d}: latent RMSE {rows[-1]['latent']:.2e}", flush=True)
    return rows


def overhead(x_T: torch.Tensor, steps: int = 500) -> dict[str, float]:
    """Each sampler's own cost per step in µs (an ε-callable that costs ~nothing), best of 3."""
    ac, ts, out = alphas_cumprod(PRESETS["tiny"].model.diffusion), ddim_timesteps(steps), {}
    for name, solver in (("ddim", ddim_sample), ("dpmpp_2m", dpmpp_2m_sample)):
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            solver(lambda x, t: x, x_T, ac, ts)
            best = min(best, time.perf_counter() - start)
        out[name] = 1e6 * best / steps
    return out


def markdown(name: str, rows: list[dict]) -> str:
    lines = [f"**{name}** (RMSE to the converged solve from the same noise; latents, and pixels in [0, 1])", "",
             "| sampler | S | model calls | latent RMSE | pixel RMSE | ms / image |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['sampler']} | {r['steps']} | {r['calls']} | {r['latent']:.2e} | {r['pixel']:.2e} | {r['ms']:.1f} |"
              for r in rows]
    return "\n".join(lines)


def markdown_agreement(rows: list[dict]) -> str:
    lines = ["**demo label agreement** (its 60 digits x 2 samples, seeds and guidance; only the sampler varies)", "",
             "| sampler | spacing | S | model calls | label agreement | ms / image |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['sampler']} | {r['spacing']} | {r['steps']} | {r['calls']} | {100 * r['agree']:.1f} % "
              f"| {r['ms']:.1f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--demo-out", default="featinv_demo", help="out-folder of `featinv demo --quick` (its cache)")
    parser.add_argument("--skip-demo", action="store_true", help="only the tiny config")
    parser.add_argument("--skip-tiny", action="store_true", help="only the demo pair")
    parser.add_argument("--all", action="store_true",
                        help="also DPM-Solver++(2M) with a first-order last step, and DDIM with the reference spacing")
    parser.add_argument("--ref-steps", type=int, default=100, help="steps of the converged reference solve")
    args = parser.parse_args(argv)
    tables, variants = [], VARIANTS + (EXTRA_VARIANTS if args.all else [])
    with torch.no_grad():
        if not args.skip_tiny:
            p = tiny_problem()
            tables.append(markdown(p.name, run(p, args.ref_steps, variants)))
        if not args.skip_demo:
            pair = load_demo(args.demo_out)
            tables.append(markdown_agreement(demo_agreement(pair)))
            p = demo_problem(pair)
            tables.append(markdown(p.name, run(p, args.ref_steps, variants)))
            cost = overhead(p.x_T)
            tables.append(f"Sampler arithmetic per step on the demo's {tuple(p.x_T.shape)} latents (ε free): "
                          + ", ".join(f"{k} {v:.0f} µs" for k, v in cost.items()))
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
