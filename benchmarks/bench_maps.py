"""Feature-space maps (featinv maps, FeatMap) measured on the demo pairs, across networks, and at ConvNeXt's scale.

    python benchmarks/bench_maps.py --demo-out <quick demo out> --fine-grid <folder> --out <folder>

1. Every built-in manipulation x every map type, on the quick demo pair (64 x 2 x 2 maps) and, with --fine-grid,
   on bench_analyses' 16 px pair (64 x 4 x 4; trained on first use, ~4-9 min): held-out R² and cosine against
   identity, the classifier's label on mapped maps, decoded agreement (FeatInv reconstructions of the mapped maps,
   beside those of the manipulated images' own maps, same seeds), SSIM, and for linear maps the effective rank
   and the bias share. FeatMap's claim, tested: the shared linear map is within a few points of the best map's
   decoded agreement for most manipulations, and far above identity.
2. Across networks: the demo's second classifier (width 48, seed 1) mapped into the pair's backbone; B's label
   on the reconstructions against B's label on the digit, beside A's own reconstructions and chance (10 %).
3. Scale: a linear map on 10,000 ConvNeXt maps' shape (810,000 x 1024 -> 1024) streamed in chunks of 10,000
   vectors (random inputs, a known map plus noise): the fit's time (accumulation + the ridge path) and peak
   private memory, on the CPU.

Seeds: manipulations with --seed (0; held-out images seed + 1), the transformer's fit seed 0, decoding the
demo's sampling seed with one key per digit; scale data torch.Generator().manual_seed(0). Decoding uses
--steps DDIM steps (10: the demo's agreement at half its 20 steps, RESULTS.md "bench_samplers").
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
from _common import RssPeaks, write_results

from featinv.analysis import maps_report as mr
from featinv.analysis.feature_maps import RIDGE_GRID, NormalEquations
from featinv.analysis.reports import reconstructor
from featinv.demo.pair import load_demo_pair, second_classifier
from featinv.metrics import read_back
from featinv.registry import MANIPULATIONS, MAP_TYPES

WITHIN = 0.05  # "within a few points": the linear map's decoded agreement at most 5 points below the best map's


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def digits(pair):
    x, xt, yt = pair.data["x_train"], pair.data["x_test"], pair.data["y_test"]
    return (x.expand(-1, 3, -1, -1).clone(), xt.expand(-1, 3, -1, -1).clone(),
            [f"d{int(c)}_test{i}" for i, c in enumerate(yt.tolist())])


def bench_pair(pair, label: str, args) -> list[dict]:
    rec = reconstructor(pair)
    rec.cfg = dataclasses.replace(rec.cfg, num_samples=1, steps=args.steps)
    fit, test, names = digits(pair)
    rows = []
    for name in MANIPULATIONS:
        t = time.perf_counter()
        task = mr.manipulation_task(pair.extractor, name, fit, test, names, args.decode, args.seed)
        maps = mr.fit_task_maps(task, list(MAP_TYPES), pair.device)
        task_rows, picture, _ = mr.task_report(pair, task, maps, rec, show=4)
        picture.save(Path(args.out) / f"maps_{label}_{task.slug}.png")
        for r in task_rows:
            r["pair"] = label
        rows += task_rows
        log(f"{label} {task.name}: {time.perf_counter() - t:.0f} s; " + ", ".join(
            f"{r['map']} R² {r['r2']:.3f} dec {r['decoded_agreement_mapped']:.2f}" for r in task_rows))
    return rows


@torch.no_grad()
def bench_network(pair, args) -> list[dict]:
    """digits-b -> the pair's backbone: linear, local, global; B's agreement on the reconstructions."""
    rec = reconstructor(pair)
    rec.cfg = dataclasses.replace(rec.cfg, num_samples=1, steps=args.steps)
    fit, test, names = digits(pair)
    source = second_classifier(pair, log=log)
    task = mr.network_task(source, pair.extractor, fit, test, names, args.decode, "digits-b", "digits (A)")
    with torch.enable_grad():
        maps = mr.fit_task_maps(task, [k for k in MAP_TYPES if k != "identity"], pair.device)
    rows, picture, _ = mr.task_report(pair, task, maps, rec, show=4)
    picture.save(Path(args.out) / "maps_network.png")
    b_acc = float((read_back(source, test)[1].argmax(1).cpu() == pair.data["y_test"]).float().mean())
    a_acc = float((read_back(pair.extractor, test)[1].argmax(1).cpu() == pair.data["y_test"]).float().mean())
    for r in rows:
        r.update(pair="quick", b_accuracy=b_acc, a_accuracy=a_acc)
    return rows


def bench_scale(args) -> dict:
    """The streamed ridge at ConvNeXt's shape: n vectors of 1024 channels -> 1024, in chunks."""
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    d, n, chunk = 1024, args.scale_vectors, 10_000
    w_true = torch.randn(d, d, generator=g) / d ** 0.5
    eq, held = NormalEquations(d, d), NormalEquations(d, d)
    gen_s = fit_s = 0.0
    with RssPeaks() as peaks:
        base = peaks.peak["RssAnon"]
        for start in range(0, n + chunk, chunk):   # the last chunk is held out (chooses λ)
            t = time.perf_counter()
            x = torch.randn(chunk, d, generator=g)
            y = x @ w_true + 0.1 * torch.randn(chunk, d, generator=g)
            t1 = time.perf_counter()
            (eq if start < n else held).add(x, y)
            gen_s, fit_s = gen_s + t1 - t, fit_s + time.perf_counter() - t1
        t = time.perf_counter()
        errors = [(held.sse(w, b), lam, w) for lam, w, b in eq.solve(RIDGE_GRID)]
        err, lam, w = min(errors, key=lambda e: e[0])
        solve_s = time.perf_counter() - t
    rel = float((w.float() - w_true).norm() / w_true.norm())
    return {"vectors": n, "channels": d, "chunk": chunk, "accumulate_s": fit_s, "solve_s": solve_s,
            "fit_s": fit_s + solve_s, "data_generation_s": gen_s, "ridge": lam, "held_out_r2": 1 - err / held.sst(),
            "relative_weight_error": rel, "peak_private_gib": (peaks.peak["RssAnon"]) / 2 ** 20,
            "peak_private_above_start_gib": (peaks.peak["RssAnon"] - base) / 2 ** 20, "threads": args.threads}


def fmt(v, pct=False):
    if v is None:
        return "n/a"
    return f"{100 * v:.1f} %" if pct else f"{v:.3f}"


def markdown(res: dict) -> str:
    lines = []
    for label, rows in res["pairs"].items():
        lines += [f"\n### {label}: every manipulation x every map type\n",
                  "| manipulation | map | R² | cosine | label agr. (maps) | decoded agr. | own map decoded | SSIM to own "
                  "| eff. rank | bias share |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['task']} | {r['map']} | {fmt(r['r2'])} | {fmt(r['cosine'])} | "
                         f"{fmt(r['semantic_agreement'], True)} | {fmt(r.get('decoded_agreement_mapped'), True)} | "
                         f"{fmt(r.get('decoded_agreement_own'), True)} | {fmt(r.get('ssim_to_own'))} | "
                         f"{fmt(r.get('effective_rank'))} | {fmt(r.get('bias_share'), True)} |")
        best = {}
        for r in rows:
            best.setdefault(r["task"], {})[r["map"]] = r
        within = [t for t, m in best.items() if max(v.get("decoded_agreement_mapped", 0) for v in m.values())
                  - m["linear"]["decoded_agreement_mapped"] <= WITHIN]
        lines.append(f"\nLinear within {100 * WITHIN:.0f} points of the best map's decoded agreement: "
                     f"{len(within)} of {len(best)} manipulations ({', '.join(within)}).")
    if res.get("network"):
        lines += ["\n### Across networks: digits-b (48 x 2 x 2) -> the pair's backbone (64 x 2 x 2)\n",
                  "| map | R² | cosine | A's label on mapped maps | A agrees (decoded) | B agrees (mapped, decoded) "
                  "| B agrees (A's own map, decoded) |", "|---|---|---|---|---|---|---|"]
        for r in res["network"]:
            lines.append(f"| {r['map']} | {fmt(r['r2'])} | {fmt(r['cosine'])} | {fmt(r['semantic_agreement'], True)} "
                         f"| {fmt(r['decoded_agreement_mapped'], True)} | {fmt(r['source_agreement_mapped'], True)} "
                         f"| {fmt(r['source_agreement_own'], True)} |")
        r = res["network"][0]
        lines.append(f"\nChance 10 %; test accuracy A {100 * r['a_accuracy']:.1f} %, B {100 * r['b_accuracy']:.1f} %.")
    if res.get("scale"):
        s = res["scale"]
        lines += ["\n### Scale: the streamed linear map at ConvNeXt's shape\n",
                  "| vectors | channels | fit (accumulate + solve) | peak private memory | held-out R² | weight error |",
                  "|---|---|---|---|---|---|",
                  f"| {s['vectors']:,} | {s['channels']} -> {s['channels']} | {s['fit_s']:.1f} s ({s['accumulate_s']:.1f}"
                  f" + {s['solve_s']:.1f}) | {s['peak_private_gib']:.2f} GiB | {s['held_out_r2']:.4f} | "
                  f"{s['relative_weight_error']:.4f} |"]
    return "\n".join(lines) + "\n"



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo-out", required=True, help="the quick demo pair's folder (trained on first use)")
    p.add_argument("--fine-grid", help="folder of the 16 px pair (bench_analyses' FINE; trained on first use)")
    p.add_argument("--out", default="bench_maps_out")
    p.add_argument("--decode", type=int, default=40, help="held-out digits decoded per task and map")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--scale-vectors", type=int, default=810_000)
    p.add_argument("--only", choices=("pairs", "network", "scale"), nargs="+", default=["pairs", "network", "scale"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    res = {"pairs": {}, "settings": vars(args)}
    quick = load_demo_pair(args.demo_out, seed=0, log=log)
    t0 = time.perf_counter()
    save = lambda: write_results(args.out, "bench_maps", res, markdown(res))  # noqa: E731  (after each part)
    if "network" in args.only:
        res["network"] = bench_network(quick, args)
        save()
    if "pairs" in args.only:
        res["pairs"]["quick demo pair (2x2 map)"] = bench_pair(quick, "quick", args)
        save()
        if args.fine_grid:
            from bench_analyses import FINE

            fine = load_demo_pair(args.fine_grid, seed=0, settings=FINE, log=log)
            res["pairs"]["16 px pair (--fine-grid, 4x4 map)"] = bench_pair(fine, "fine", args)
    res["analysis_s"] = time.perf_counter() - t0
    save()
    if "scale" in args.only:
        res["scale"] = bench_scale(args)
        save()


if __name__ == "__main__":
    main()
