"""Concept discovery measured on the demo pair's digits, and the fit at ImageNet scale on random data.

    python benchmarks/bench_concepts.py --demo-out featinv_demo            # demo part, ~15 min on 2 cores
    python benchmarks/bench_concepts.py --only-scale --scale-rows 810000   # scale part (one subprocess a method)
    python benchmarks/bench_concepts.py --demo-out featinv_demo --only-edits   # code edits part
    python benchmarks/bench_sae_grid.py --demo-out featinv_demo    # SAE quality against L0 (its own script)

Demo part, per method (nmf, dict, pca, kmeans) at k = 10 and 20, bases fitted on the training digits:
- removal: each class's top concept (largest logit drop on the *training* digits, so nothing is chosen on the
  held-out set) removed from the held-out digits of that class; drop of p(class) on the features and of the
  reconstructions' label agreement, against removing a random other concept of the same basis;
- stability: bases fitted on two disjoint halves of the training digits, Hungarian-matched atom cosine
  (|cosine| for PCA, whose components have no sign);
- completeness: variance explained and decoded-map agreement on the held-out digits for k = 5, 10, 20, 40;
- steering: the 200 digit pairs of bench_analyses (a steered towards b, seed 0, the same noise keys, clamp per
  channel and location) along b's top concept; share of reconstructions read as b per α.
Edits part (``--only-edits`` runs it alone; ``--skip-edits`` leaves it out), per method (default: the four and
topk; k = 10 for the scikit-learn methods, k = 64 with top_k = 4 for the sparse autoencoders), on the same 200
pairs a -> b, keys and clamp as steering: ``set`` sets b's top n concepts (top_concepts on the training digits) to
b's class levels (class_levels at a quantile, on the training digits' codes), ``swap`` also sets a's top n concepts
to 0. The quantile and n of each edit are chosen on the training digits (every training digit a -> a random b !=
a), by the classifier on the edited feature maps; the held-out pairs' reconstructions are read with the chosen
settings, beside adding b's top atom (steering above, all α) and the mean-difference direction at α = 1.5
(bench_analyses' best).
Scale part: fit k = 20 on random non-negative maps (rows / 81 maps of 1024 x 9 x 9, ConvNeXt's last stage)
streamed through partial_fit; seconds and peak memory (VmHWM over the RSS before the data) per method, and
the time to encode 16 maps. Seeds: fits --seed (0), draws torch.Generator().manual_seed(--seed) (the edits'
training pairs their own generator with the same seed).
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

from featinv.analysis.concept_edits import class_levels, concept_direction, remove, set_code, swap, top_concepts
from featinv.analysis.concept_scores import completeness, concept_importance
from featinv.analysis.concepts import fit_concepts
from featinv.analysis.steering import clamp_changed, feature_range, mean_difference_direction, steer
from featinv.demo.digits import rgb
from featinv.demo.pair import load_demo_pair
from featinv.diffusion.reconstruct import Reconstructor

STEER_ALPHAS = (1.0, 1.5, 2.0, 3.0)
KS = (10, 20)
GROW = (5, 10, 20, 40)
SKLEARN = ("nmf", "dict", "pca", "kmeans")     # the demo and scale parts' default methods
SAES = ("topk", "batchtopk")
EDIT_QUANTILES = (0.5, 0.9, 0.99)
EDIT_NS = (1, 2, 3, 5)
EDITS = ("set", "swap")
MEAN_DIFF_ALPHA = 1.5                          # bench_analyses' best α for the mean difference, per-location clamp


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


def steer_pairs(y: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bench_analyses' steering pairs: n held-out digits (indices, class a) and a target b != a per digit."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(y), generator=g)[:n]
    a = y[idx]
    return idx, a, (a + torch.randint(1, 10, (n,), generator=g)) % 10


@torch.no_grad()
def bench_steer(ext, rec, basis, top, ftr, ytr, x, y, clamp, n: int, seed: int) -> list[float]:
    """bench_analyses' steering pairs, along b's top concept (sign: b's mean code; PCA codes are signed)."""
    idx, _, b = steer_pairs(y, n, seed)
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


@dataclasses.dataclass
class Demo:
    """The demo pair's classifier, reconstructor, digits, training feature maps and per-location clamp."""

    ext: object
    rec: Reconstructor
    x: torch.Tensor
    y: torch.Tensor
    ftr: torch.Tensor
    ytr: torch.Tensor
    clamp: tuple[torch.Tensor, torch.Tensor]


def load_demo(args, folder: str | None = None, settings=None) -> Demo:
    """The demo pair under ``folder`` (default --demo-out) with ``settings`` (default the quick demo's)."""
    pair = load_demo_pair(folder or args.demo_out, seed=args.pair_seed, settings=settings,
                          log=lambda m: print(m, file=sys.stderr))
    rec = Reconstructor(pair.model, pair.extractor, dataclasses.replace(pair.sample_config, num_samples=1),
                        fixed_batch=50)
    ftr = rec.features(rgb(pair.data["x_train"]))
    return Demo(pair.extractor, rec, pair.data["x_test"], pair.data["y_test"], ftr, pair.data["y_train"],
                feature_range(ftr, per_location=True))


def bench_demo(args, demo: Demo) -> dict:
    ext, rec, x, y, ftr, ytr, clamp = (demo.ext, demo.rec, demo.x, demo.y, demo.ftr, demo.ytr, demo.clamp)
    fte = rec.features(rgb(x))
    with torch.no_grad():
        plain_agree = (labels_of(ext, rec.from_features(fte, [f"concept{i}" for i in range(len(y))])) == y[:, None]).float().mean(1)
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


def edit_fit(method: str, args) -> tuple[int, int | None]:
    """(k, top_k) of the edits part's basis: the SAEs' --sae-k / --sae-top-k, else k = 10 (the demo table's)."""
    return (args.sae_k, args.sae_top_k) if method in SAES else (10, None)


def code_edit(kind: str, feats, codes, basis, a, b, tops, levels, n: int, clamp) -> torch.Tensor:
    """Maps of class a edited towards b, per digit: ``set`` b's top n concepts to b's levels, or ``swap`` (a's
    top n set to 0 as well). tops: per class its concepts, most distinctive first; levels: (classes, k)."""
    out = torch.empty_like(feats)
    for ai, bi in sorted(set(zip(a.tolist(), b.tolist()))):
        sel = (a == ai) & (b == bi)
        target = tops[bi][:n]
        if kind == "set":
            edited = set_code(feats[sel], basis, target, levels[bi, target], codes=codes[sel])
        else:
            edited = swap(feats[sel], basis, tops[ai][:n], target, levels[bi], codes=codes[sel])
        out[sel] = clamp_changed(edited, feats[sel], clamp)
    return out


def pick(grid: list[list[float]], ns: list[int]) -> tuple[float, int]:
    """grid[quantile][n] shares read as b -> the (quantile, n) with the largest; ties go to the smaller edit (fewer
    concepts, then the lower quantile)."""
    _, n, q = max((v, -n, -q) for q, row in zip(EDIT_QUANTILES, grid) for n, v in zip(ns, row))
    return -q, -n


@torch.no_grad()
def bench_edits(args, demo: Demo) -> dict:
    """Code edits a -> b per method: settings chosen on the training digits, held-out pairs reconstructed."""
    ext, rec, ftr, ytr, clamp = demo.ext, demo.rec, demo.ftr, demo.ytr, demo.clamp
    g = torch.Generator().manual_seed(args.seed)
    b_tr = (ytr + torch.randint(1, 10, (len(ytr),), generator=g)) % 10   # every training digit a -> b != a
    idx, a, b = steer_pairs(demo.y, args.pairs, args.seed)
    feats = rec.features(rgb(demo.x[idx]))
    keys = [f"steer{i}" for i in idx.tolist()]

    def read(maps: torch.Tensor, target: torch.Tensor, reconstruct: bool) -> float:
        if reconstruct:
            return share(labels_of(ext, rec.from_features(maps, keys)) == target[:, None])
        return share(ext.logits_from_features(maps).argmax(1) == target)

    md_dirs = {}
    for ai, bi in set(zip(a.tolist(), b.tolist())):
        md_dirs[ai, bi] = mean_difference_direction(ftr[ytr == bi], ftr[ytr == ai])
    md = torch.cat([steer(feats[j:j + 1], md_dirs[int(a[j]), int(b[j])], [MEAN_DIFF_ALPHA], clamp=clamp)[:, 0]
                    for j in range(len(b))])
    res = {"seed": args.seed, "pairs": len(b), "train_pairs": len(ytr), "quantiles": list(EDIT_QUANTILES),
           "ns": list(EDIT_NS), "select_by": "classifier on the edited training maps",
           "mean_difference": {"alpha": MEAN_DIFF_ALPHA, "features": read(md, b, False),
                               "reconstructions": read(md, b, True)}, "methods": {}}
    print(f"edits: mean difference α={MEAN_DIFF_ALPHA}: {res['mean_difference']}", file=sys.stderr)
    for method in args.edit_methods:
        k, top_k = edit_fit(method, args)
        with torch.enable_grad():   # an SAE trains by backpropagation
            basis = fit_concepts(ftr, k, method, seed=args.seed, top_k=top_k)
        codes_tr = basis.encode(ftr)
        ns = [n for n in EDIT_NS if n <= k]
        tops = [top_concepts(basis, codes_tr, ytr, c, max(ns)) for c in range(10)]
        levels = {q: class_levels(basis, codes_tr, ytr, q) for q in EDIT_QUANTILES}
        r = res["methods"][method] = {"k": k, "top_k": top_k, "top_concepts": tops, "train": {}, "chosen": {},
                                      "held_out": {}}
        codes_te = basis.encode(feats)
        for kind in EDITS:
            grid = r["train"][kind] = [[read(code_edit(kind, ftr, codes_tr, basis, ytr, b_tr, tops, levels[q], n,
                                                       clamp), b_tr, False) for n in ns] for q in EDIT_QUANTILES]
            q, n = pick(grid, ns)
            r["chosen"][kind] = {"quantile": q, "n": n, "train": grid[EDIT_QUANTILES.index(q)][ns.index(n)]}
            edited = code_edit(kind, feats, codes_te, basis, a, b, tops, levels[q], n, clamp)
            r["held_out"][kind] = {"features": read(edited, b, False), "reconstructions": read(edited, b, True)}
            print(f"edits: {method} {kind}: chosen {r['chosen'][kind]}, held-out {r['held_out'][kind]}",
                  file=sys.stderr)
        if not args.skip_steer:
            top = concept_importance(basis, ext, ftr, ytr)["removal"].argmax(0)
            r["atom"] = bench_steer(ext, rec, basis, top, ftr, ytr, demo.x, demo.y, clamp, args.pairs, args.seed)
            print(f"edits: {method} atom: {r['atom']}", file=sys.stderr)
    return res


def scale_worker(method: str, rows: int, k: int, seed: int) -> dict:
    """One method's fit on random non-negative maps; run in its own process so that VmHWM is its own."""
    sys.path.insert(0, str(Path(__file__).parent))
    import sklearn.cluster  # imported before the baseline: the peak counts the fit, not the imports
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


def markdown_edits(e: dict) -> list[str]:
    md = e["mean_difference"]
    lines = ["", (f"Code edits a -> b on the {e['pairs']} steering pairs (held out); quantile and n chosen on the "
                  f"{e['train_pairs']} training digits (each -> a random b != a) by the {e['select_by']}; share read "
                  "as b on the held-out features / reconstructions."), "",
             "| method | k (top_k) | set: quantile, n | set: training features | set: held out | swap: quantile, n | "
             "swap: training features | swap: held out | adding b's top atom: α = "
             + ", ".join(f"{a_:g}" for a_ in STEER_ALPHAS) + f" | mean difference, α = {md['alpha']:g} |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in e["methods"].items():
        cells = []
        for kind in EDITS:
            c, h = r["chosen"][kind], r["held_out"][kind]
            cells += [f"{c['quantile']:g}, {c['n']}", pct(c["train"]),
                      f"{pct(h['features'])} / {pct(h['reconstructions'])}"]
        atom = " / ".join(pct(v) for v in r["atom"]) if r.get("atom") else "n/a"
        k = f"{r['k']}" + (f" ({r['top_k']})" if r.get("top_k") else "")
        lines.append(f"| {m} | {k} | " + " | ".join(cells) + f" | {atom} | "
                     f"{pct(md['features'])} / {pct(md['reconstructions'])} |")
    lines += ["", ("Training grid: share of the edited training maps the classifier reads as b, per quantile "
                   "(rows) and n (columns)."), "",
              "| method | edit | quantile | " + " | ".join(f"n={n}" for n in e["ns"]) + " |",
              "|---|---|---|" + "---|" * len(e["ns"])]
    for m, r in e["methods"].items():
        for kind in EDITS:
            for q, row in zip(e["quantiles"], r["train"][kind]):
                lines.append(f"| {m} | {kind} | {q:g} | " + " | ".join(pct(v) for v in row)
                             + " | n/a" * (len(e["ns"]) - len(row)) + " |")
    return lines


def markdown(res: dict) -> str:
    lines = []
    if "methods" in res:
        d = res
        lines += [(f"Held-out digits: {d['held_out']} (about 36 per class); plain reconstructions keep the label "
                   f"{pct(d['plain_agreement'])}. Top concept per class chosen on the {d['train']} training digits."), "",
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
    if res.get("edits"):
        lines += markdown_edits(res["edits"])
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
    p.add_argument("--methods", default="", help="comma-separated; default: the demo and scale parts "
                   f"{','.join(SKLEARN)}, the edits part also topk")
    p.add_argument("--pairs", type=int, default=200, help="steering: digit pairs a != b (as bench_analyses)")
    p.add_argument("--skip-steer", action="store_true", help="leave out steering along the atom (demo and edits)")
    p.add_argument("--only-edits", action="store_true", help="only the code edits part")
    p.add_argument("--skip-edits", action="store_true")
    p.add_argument("--sae-k", type=int, default=64, help="edits part: the sparse autoencoders' k")
    p.add_argument("--sae-top-k", type=int, default=4, help="edits part: the sparse autoencoders' top_k")
    p.add_argument("--scale-rows", type=int, default=810_000, help="rows (per-location vectors) of the scale fit; 0 skips it")
    p.add_argument("--only-scale", action="store_true")
    p.add_argument("--scale-worker", help=argparse.SUPPRESS)
    p.add_argument("--out", default="bench_concepts")
    p.add_argument("--tables-from", metavar="JSON", help="print the tables of an earlier run's bench_concepts.json")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    asked = [m for m in args.methods.split(",") if m]
    args.methods = asked or list(SKLEARN)
    args.edit_methods = asked or [*SKLEARN, "topk"]
    if args.tables_from:
        print(markdown(json.loads(Path(args.tables_from).read_text())))
        return 0
    if args.scale_worker:
        print(json.dumps(scale_worker(args.scale_worker, args.scale_rows, 20, args.seed)))
        return 0
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    t0 = time.time()
    demo = None if args.only_scale else load_demo(args)
    res = {} if args.only_scale or args.only_edits else bench_demo(args, demo)
    if demo is not None and not args.skip_edits:
        res["edits"] = bench_edits(args, demo)
    if args.scale_rows and not args.only_edits:
        res["scale"] = bench_scale(args)
    res["seconds"] = time.time() - t0
    out = write_results(args.out, "bench_concepts", res, markdown(res))
    print(f"{res['seconds']:.0f} s; written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
