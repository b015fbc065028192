"""Concept discovery measured on the demo pair's digits, and the fit at ImageNet scale on random data.

    python benchmarks/bench_concepts.py --demo-out featinv_demo            # demo part, ~15 min on 2 cores
    python benchmarks/bench_concepts.py --only-scale --scale-rows 810000   # scale part (one subprocess a method)

Demo part, per method (nmf, dict, pca, kmeans) at k = 10 and 20, bases fitted on the training digits:
- removal: each class's top concept (largest logit drop on the *training* digits, so nothing is chosen on the
  held-out set) removed from the held-out digits of that class; drop of p(class) on the features and of the
  reconstructions' label agreement, against removing a random other concept of the same basis;
- stability: bases fitted on two disjoint halves of the training digits, Hungarian-matched atom cosine
  (|cosine| for PCA, whose components have no sign);
- completeness: variance explained and decoded-map agreement on the held-out digits for k = 5, 10, 20, 40;
- steering: the 200 digit pairs of bench_analyses (a steered towards b, seed 0, the same noise keys, clamp per
  channel and location) along b's top concept; share of reconstructions read as b per α.
Scale part: fit k = 20 on random non-negative maps (rows / 81 maps of 1024 x 9 x 9, ConvNeXt's last stage)
streamed through partial_fit; seconds and peak memory (VmHWM over the RSS before the data) per method, and
the time to encode 16 maps. Seeds: fits --seed (0), draws torch.Generator().manual_seed(--seed).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import write_results
from scipy.optimize import linear_sum_assignment

from featinv.analysis.concept_edits import concept_direction, remove
from featinv.analysis.concept_scores import completeness, concept_importance
from featinv.analysis.concepts import METHODS, fit_concepts
from featinv.analysis.steering import feature_range, steer
from featinv.demo.digits import rgb
from featinv.demo.pair import load_demo_pair
from featinv.diffusion.reconstruct import Reconstructor

STEER_ALPHAS = (1.0, 1.5, 2.0, 3.0)
KS = (10, 20)
GROW = (5, 10, 20, 40)


def share(x: torch.Tensor) -> float:
    return x.float().mean().item()


@torch.no_grad()
def labels_of(ext, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([ext.classify(c).argmax(1) for c in images.flatten(0, -4).split(500)]).view(images.shape[:-3])


def matched_cosine(a: torch.Tensor, b: torch.Tensor, signless: bool) -> float:
    cos = (a / a.norm(dim=1, keepdim=True)) @ (b / b.norm(dim=1, keepdim=True)).T
    cos = cos.abs() if signless else cos
    rows, cols = linear_sum_assignment(-cos.numpy())
    return cos[rows, cols].mean().item()


@torch.no_grad()
def bench_removal(ext, rec, basis, top, feats, y, plain_agree, g) -> dict:
    """Remove each held-out digit's class's top concept, or a random other one; drops per class, then mean."""
    k = basis.k
    codes = basis.encode(feats)
    top_i = top[y]
    rand_i = (top_i + torch.randint(1, k, (len(y),), generator=g)) % k
    keys = [f"concept{i}" for i in range(len(y))]
    out = {}
    p0 = ext.logits_from_features(feats).softmax(1).gather(1, y[:, None])[:, 0]
    for name, which in (("top", top_i), ("random", rand_i)):
        edited = torch.cat([remove(feats[n:n + 1], basis, int(which[n]), codes[n:n + 1]) for n in range(len(y))])
        p1 = ext.logits_from_features(edited).softmax(1).gather(1, y[:, None])[:, 0]
        agree = (labels_of(ext, rec.from_features(edited, keys)) == y[:, None]).float().mean(1)
        per_class = [((p0 - p1)[y == c].mean().item(), (plain_agree - agree)[y == c].mean().item()) for c in range(10)]
        out[name] = {"prob_drop": sum(p for p, _ in per_class) / 10, "agreement_drop": sum(a for _, a in per_class) / 10,
                     "agreement_after": share(agree)}
    out["digits"] = len(y)
    out["ratio"] = out["top"]["agreement_drop"] / out["random"]["agreement_drop"] if out["random"]["agreement_drop"] > 0 else None
    return out


@torch.no_grad()
def bench_steer(ext, rec, basis, top, ftr, ytr, x, y, clamp, n: int, seed: int) -> list[float]:
    """bench_analyses' steering pairs, along b's top concept (sign: b's mean code; PCA codes are signed)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(y), generator=g)[:n]
    a = y[idx]
    b = (a + torch.randint(1, 10, (n,), generator=g)) % 10
    feats = rec.features(rgb(x[idx]))
    keys = [f"steer{i}" for i in idx.tolist()]
    codes_tr = basis.encode(ftr).mean(dim=(2, 3))
    dirs = []
    for bi in b.tolist():
        i = int(top[bi])
        sign = 1.0 if codes_tr[ytr == bi, i].mean() >= 0 else -1.0
        dirs.append(sign * concept_direction(basis, i))
    steered = torch.stack([steer(feats[j:j + 1], dirs[j], STEER_ALPHAS, clamp=clamp)[0] for j in range(n)])
    return [share(labels_of(ext, rec.from_features(steered[:, j], keys)) == b[:, None]) for j in range(len(STEER_ALPHAS))]


def bench_demo(args) -> dict:
    pair = load_demo_pair(args.demo_out, seed=args.pair_seed, log=lambda m: print(m, file=sys.stderr))
    ext = pair.extractor
    rec = Reconstructor(pair.model, ext, dataclasses.replace(pair.sample_config, num_samples=1), fixed_batch=50)
    x, y = pair.data["x_test"], pair.data["y_test"]
    ftr, ytr = rec.features(rgb(pair.data["x_train"])), pair.data["y_train"]
    fte = rec.features(rgb(x))
    with torch.no_grad():
        plain_agree = (labels_of(ext, rec.from_features(fte, [f"concept{i}" for i in range(len(y))])) == y[:, None]).float().mean(1)
    clamp = feature_range(ftr, per_location=True)
    g = torch.Generator().manual_seed(args.seed)
    half = torch.randperm(len(ytr), generator=g)
    halves = (half[: len(half) // 2], half[len(half) // 2:])
    res = {"seed": args.seed, "pair_seed": args.pair_seed, "plain_agreement": share(plain_agree), "held_out": len(y),
           "train": len(ytr), "methods": {}}
    for method in args.methods:
        r = res["methods"][method] = {"grow": {}, "k": {}}
        for k in sorted(set(GROW) | set(KS)):
            t = time.time()
            basis = fit_concepts(ftr, k, method, seed=args.seed)
            fit_s = time.time() - t
            r["grow"][k] = {**completeness(basis, fte, ext), "fit_seconds": fit_s}
            print(f"{method} k={k}: fit {fit_s:.1f} s, {r['grow'][k]}", file=sys.stderr)
            if k not in KS:
                continue
            top = concept_importance(basis, ext, ftr, ytr)["removal"].argmax(0)   # (10,) chosen on training digits
            row = {"top_concepts": top.tolist(), "removal": bench_removal(ext, rec, basis, top, fte, y, plain_agree, g)}
            fa, fb = (fit_concepts(ftr[h], k, method, seed=args.seed) for h in halves)
            row["stability"] = matched_cosine(fa.atoms, fb.atoms, signless=method == "pca")
            if not args.skip_steer:
                row["steer"] = bench_steer(ext, rec, basis, top, ftr, ytr, x, y, clamp, args.pairs, args.seed)
            r["k"][k] = row
            print(f"{method} k={k}: {row}", file=sys.stderr)
    return res


def scale_worker(method: str, rows: int, k: int, seed: int) -> dict:
    """One method's fit on random non-negative maps; run in its own process so that VmHWM is its own."""
    sys.path.insert(0, str(Path(__file__).parent))
    import sklearn.cluster  # noqa: F401 -- imported before the baseline: the peak counts the fit, not the imports
    import sklearn.decomposition  # noqa: F401
    from _common import status_kib

    torch.set_num_threads(1)
    base = status_kib("VmRSS")
    maps = rows // 81
    data = torch.rand(maps, 1024, 9, 9, generator=torch.Generator().manual_seed(seed))
    nbytes = data.numel() * 4
    t = time.time()
    basis = fit_concepts(data, k, method, seed=seed)
    fit_s = time.time() - t
    t = time.time()
    basis.encode(data[:16])
    return {"method": method, "rows": maps * 81, "k": k, "fit_seconds": fit_s, "encode16_seconds": time.time() - t,
            "data_gib": nbytes / 2 ** 30, "peak_over_data": (status_kib("VmHWM") - base) * 1024 / nbytes,
            "passes": basis.stats["passes"]}


def bench_scale(args) -> list[dict]:
    out = []
    for method in args.methods:
        cmd = [sys.executable, __file__, "--scale-worker", method, "--scale-rows", str(args.scale_rows),
               "--seed", str(args.seed)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"scale: {out[-1]}", file=sys.stderr)
    return out


def pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f} %"


def markdown(res: dict) -> str:
    lines = []
    if "methods" in res:
        d = res
        lines += [f"Held-out digits: {d['held_out']} (about 36 per class); plain reconstructions keep the label "
                  f"{pct(d['plain_agreement'])}. Top concept per class chosen on the {d['train']} training digits.", "",
                  "| method | k | p(class) drop, top / random | reconstruction agreement drop, top / random | ratio | "
                  "stability (matched cosine, halves) | steering to b: share read as b at α = "
                  + ", ".join(f"{a:g}" for a in STEER_ALPHAS) + " | best |",
                  "|---|---|---|---|---|---|---|---|"]
        for m, r in d["methods"].items():
            for k, row in r["k"].items():
                rm = row["removal"]
                steer_s = " / ".join(pct(v) for v in row.get("steer", [])) or "n/a"
                best = pct(max(row["steer"])) if row.get("steer") else "n/a"
                ratio = "random <= 0" if rm["ratio"] is None else f"{rm['ratio']:.1f}x"
                lines.append(f"| {m} | {k} | {pct(rm['top']['prob_drop'])} / {pct(rm['random']['prob_drop'])} | "
                             f"{pct(rm['top']['agreement_drop'])} / {pct(rm['random']['agreement_drop'])} | {ratio} | "
                             f"{row['stability']:.3f} | {steer_s} | {best} |")
        lines += ["", "Completeness on the held-out digits: variance explained / decoded-map agreement (fit seconds).", "",
                  "| method | " + " | ".join(f"k={k}" for k in GROW) + " |", "|---|" + "---|" * len(GROW)]
        for m, r in d["methods"].items():
            grow = {int(k): v for k, v in r["grow"].items()}  # JSON keys are strings
            cells = [f"{pct(grow[k]['variance_explained'])} / {pct(grow[k]['agreement'])} "
                     f"({grow[k]['fit_seconds']:.1f} s)" for k in GROW]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if res.get("scale"):
        lines += ["", "| method | rows x 1024 | k | passes | fit | peak memory / data | encode 16 maps |", "|---|---|---|---|---|---|---|"]
        for s in res["scale"]:
            lines.append(f"| {s['method']} | {s['rows']} ({s['data_gib']:.2f} GiB) | {s['k']} | {s['passes']} | "
                         f"{s['fit_seconds']:.0f} s | {s['peak_over_data']:.2f}x | {s['encode16_seconds']:.2f} s |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo-out", default="featinv_demo")
    p.add_argument("--pair-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--pairs", type=int, default=200, help="steering: digit pairs a != b (as bench_analyses)")
    p.add_argument("--skip-steer", action="store_true")
    p.add_argument("--scale-rows", type=int, default=810_000, help="rows (per-location vectors) of the scale fit; 0 skips it")
    p.add_argument("--only-scale", action="store_true")
    p.add_argument("--scale-worker", help=argparse.SUPPRESS)
    p.add_argument("--out", default="bench_concepts")
    p.add_argument("--tables-from", metavar="JSON", help="print the tables of an earlier run's bench_concepts.json")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    if args.tables_from:
        print(markdown(json.loads(Path(args.tables_from).read_text())))
        return 0
    if args.scale_worker:
        print(json.dumps(scale_worker(args.scale_worker, args.scale_rows, 20, args.seed)))
        return 0
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    t0 = time.time()
    res = {} if args.only_scale else bench_demo(args)
    if args.scale_rows:
        res["scale"] = bench_scale(args)
    res["seconds"] = time.time() - t0
    out = write_results(args.out, "bench_concepts", res, markdown(res))
    print(f"{res['seconds']:.0f} s; written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
