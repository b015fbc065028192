"""Sparse autoencoders' quality against L0 on the demo pair's digits, beside the scikit-learn methods.

    python benchmarks/bench_sae_grid.py --demo-out featinv_demo                           # quick pair, ~12-18 min
    python benchmarks/bench_sae_grid.py --demo-out featinv_demo --fine-grid featinv_demo  # both pairs, ~35-45 min
    python benchmarks/bench_sae_grid.py --fine-grid featinv_demo --only-fine              # 16 px pair, ~20-25 min
    python benchmarks/bench_sae_grid.py --demo-out featinv_demo --grid full               # the issue's grid, ~40 min

Times: an idle 2-core CPU, 1 thread (--threads), estimated from per-step CPU times of 20-step fits on a loaded
machine (64 / 256 / 1024 latents: topk ~15 / 29 / 34-56 ms a step, batchtopk ~16 / 38 / 57-93 ms) times the ~2,000
steps of a default fit, plus ~3 min of scikit-learn fits, removal and loading per pair. The 16 px pair's SAE steps
are ~1.3x dearer (full 4,096-vector batches; the step count does not grow with the vectors), and --fine-grid
first trains that pair (several minutes) unless it is cached under DIR (bench_analyses --fine-grid caches it).

Per pair (the quick demo pair, 64 x 2 x 2 ReLU maps; with --fine-grid the 16 px pair of bench_analyses' FINE
settings, 64 x 4 x 4, 4x the vectors per image), fitted on the training digits' maps (1437 digits), scored on the
held-out digits' (360):
- SAE grid: kind in (topk, batchtopk) x latents x top_k; ``--grid full`` is the issue's latents (64, 128, 256, 512,
  1024) x top_k (2, 4, 8) (30 fits, ~36 min of fits a pair); the default ``--grid reduced`` drops latents 128 and
  512 and top_k 4 (latents 64, 256, 1024 x top_k 2, 8: 12 fits, ~15 min), keeping the ends of both ranges. Each
  is ``fit_concepts(maps, latents, kind, top_k=top_k)`` with featinv's defaults (~2,000 Adam steps, batch 4,096,
  AuxK, the learning rate of its scaling law); held-out completeness: FVU, L0 (mean active codes per location),
  dead share (latents never active on the held-out maps), agreement (decoded maps read as the map's own class);
- the scikit-learn methods (nmf, dict, pca, kmeans at k = 10, 20, 40, fit once each, their defaults) scored the
  same way, and a table that sets each beside the lowest-FVU SAE of each kind with at most its L0;
- removal for one SAE setting per kind (--removal-latents 256, --removal-top-k 8: in both grids, so no extra
  fit): each class's top concept (largest logit drop on the training digits) or a random other concept removed
  from the held-out digits; drops of p(class) and of the reconstructions' label agreement (bench_concepts'
  bench_removal, as in its table).
Seeds: every fit --seed (0: the SAE's initialisation and the order of the maps); the random concepts
torch.Generator().manual_seed(--seed), one per pair; reconstructions the demo's sampling seed, one key per digit.
--kinds, --sae-latents, --sae-top-ks, --sklearn and --sklearn-ks override the grid; --passes the SAEs' epochs. A
smoke run (~2 min): --sae-latents 64 --sae-top-ks 2 --passes 20 --removal-latents 64 --removal-top-k 2
--removal-digits 60 --sklearn nmf --sklearn-ks 10.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from _common import write_results
from bench_analyses import FINE
from bench_concepts import SAES, SKLEARN, bench_removal, labels_of, load_demo, pct, share

from featinv.analysis.concept_scores import completeness, concept_importance
from featinv.analysis.concepts import fit_concepts
from featinv.demo.digits import rgb
from featinv.demo.stages import cache_dir

GRIDS = {"full": ((64, 128, 256, 512, 1024), (2, 4, 8)),     # the issue's: (latents, top_ks) per kind
         "reduced": ((64, 256, 1024), (2, 8))}                # the default: fits ~15 min per pair
SKLEARN_KS = (10, 20, 40)


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def names(text: str) -> list[str]:
    return [v for v in text.split(",") if v]


def scored(basis, fte, ext, seconds: float) -> dict:
    c = completeness(basis, fte, ext)
    return {k: c[k] for k in ("fvu", "l0", "dead", "dead_share", "agreement")} | {"fit_seconds": seconds}


def bench_pair(args, label: str, folder: str, settings) -> dict:
    """The grid, the scikit-learn rows and the removal on one demo pair."""
    start = time.time()
    demo = load_demo(args, folder, settings)
    ext, rec, ftr, ytr, y = demo.ext, demo.rec, demo.ftr, demo.ytr, demo.y
    fte = rec.features(rgb(demo.x))
    _, c, h, w = ftr.shape
    r = {"label": label, "folder": folder, "grid": [h, w], "channels": c, "train_maps": len(ftr),
         "held_out_maps": len(fte), "train_vectors": len(ftr) * h * w, "held_out_vectors": len(fte) * h * w,
         "sae": [], "sklearn": [], "removal": {}}
    keep = {}
    for kind in args.kinds:
        for latents in args.sae_latents:
            for top_k in args.sae_top_ks:
                t = time.time()
                basis = fit_concepts(ftr, latents, kind, seed=args.seed, top_k=top_k, passes=args.passes)
                row = {"kind": kind, "latents": latents, "top_k": top_k, **scored(basis, fte, ext, time.time() - t),
                       "steps": basis.stats["sae"]["steps"], "passes": basis.stats["passes"],
                       "train_dead": basis.stats["sae"]["dead"]}
                r["sae"].append(row)
                print(f"{label}: {row}", file=sys.stderr, flush=True)
                if (latents, top_k) == (args.removal_latents, args.removal_top_k):
                    keep[kind] = basis
    for method in args.sklearn:
        for k in args.sklearn_ks:
            t = time.time()
            basis = fit_concepts(ftr, k, method, seed=args.seed)
            r["sklearn"].append({"method": method, "k": k, **scored(basis, fte, ext, time.time() - t),
                                 "passes": basis.stats["passes"]})
            print(f"{label}: {r['sklearn'][-1]}", file=sys.stderr, flush=True)
    if not args.skip_removal and args.kinds:
        n = args.removal_digits or len(y)
        fte, y = fte[:n], y[:n]
        with torch.no_grad():
            keys = [f"concept{i}" for i in range(len(y))]
            plain_agree = (labels_of(ext, rec.from_features(fte, keys)) == y[:, None]).float().mean(1)
        r["plain_agreement"] = share(plain_agree)
        g = torch.Generator().manual_seed(args.seed)
        for kind in args.kinds:
            basis = keep.get(kind) or fit_concepts(ftr, args.removal_latents, kind, seed=args.seed,
                                                   top_k=args.removal_top_k, passes=args.passes)
            top = concept_importance(basis, ext, ftr, ytr)["removal"].argmax(0)   # (10,) chosen on training digits
            r["removal"][kind] = {"latents": args.removal_latents, "top_k": args.removal_top_k,
                                  "top_concepts": top.tolist(),
                                  **bench_removal(ext, rec, basis, top, fte, y, plain_agree, g)}
            print(f"{label}: removal {kind}: {r['removal'][kind]}", file=sys.stderr, flush=True)
    r["seconds"] = time.time() - start
    return r


def best_at_most(sae: list[dict], kind: str, l0: float) -> dict | None:
    """The kind's SAE row of lowest held-out FVU among those with L0 <= l0 (None if there is none)."""
    rows = [s for s in sae if s["kind"] == kind and s["l0"] <= l0 + 1e-9]
    return min(rows, key=lambda s: s["fvu"]) if rows else None


def markdown_pair(r: dict) -> list[str]:
    h, w = r["grid"]
    lines = [(f"### {r['label']}: {r['channels']} x {h} x {w} maps, {r['train_vectors']:,} training vectors "
              f"({r['train_maps']} digits), {r['held_out_vectors']:,} held-out vectors ({r['held_out_maps']} "
              f"digits); {r['seconds'] / 60:.1f} min"), ""]
    if r["sae"]:
        lines += [("SAEs, held out: FVU, L0 (mean active latents per location), dead share (never active), "
                   "agreement (decoded maps read as the map's class); steps and fit seconds of the training."), "",
                  "| kind | latents | top_k | L0 | FVU | dead share | agreement | steps | fit s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {s['kind']} | {s['latents']} | {s['top_k']} | {s['l0']:.2f} | {s['fvu']:.4f} | "
                  f"{pct(s['dead_share'])} | {pct(s['agreement'])} | {s['steps']} | {s['fit_seconds']:.1f} |"
                  for s in r["sae"]]
    if r["sklearn"]:
        kinds = sorted({s["kind"] for s in r["sae"]}, key=SAES.index)
        lines += ["", ("scikit-learn methods, held out, beside each SAE kind's lowest FVU at an L0 no larger "
                       "(its latents, top_k, L0); — where no SAE is as sparse."), "",
                  ("| method | k | L0 | FVU | dead share | agreement | fit s | "
                   + " | ".join(f"best {kind} at L0 <= it" for kind in kinds) + " |"),
                  "|---|---:|---:|---:|---:|---:|---:|" + "---|" * len(kinds)]
        for m in r["sklearn"]:
            cells = []
            for kind in kinds:
                b = best_at_most(r["sae"], kind, m["l0"])
                cells.append("—" if b is None else f"{b['fvu']:.4f} ({b['latents']}, {b['top_k']}, {b['l0']:.1f})")
            lines.append(f"| {m['method']} | {m['k']} | {m['l0']:.2f} | {m['fvu']:.4f} | {pct(m['dead_share'])} | "
                         f"{pct(m['agreement'])} | {m['fit_seconds']:.1f} | " + " | ".join(cells) + " |")
    if r["removal"]:
        lines += ["", (f"Removal on the {next(iter(r['removal'].values()))['digits']} held-out digits (plain "
                       f"reconstructions keep the label {pct(r['plain_agreement'])}): the class's top concept "
                       "(chosen on the training digits) against a random other one."), "",
                  ("| kind | latents | top_k | p(class) drop, top / random | reconstruction agreement drop, "
                   "top / random | ratio |"), "|---|---:|---:|---|---|---|"]
        for kind, rm in r["removal"].items():
            ratio = "random <= 0" if rm["ratio"] is None else f"{rm['ratio']:.1f}x"
            lines.append(f"| {kind} | {rm['latents']} | {rm['top_k']} | {pct(rm['top']['prob_drop'])} / "
                         f"{pct(rm['random']['prob_drop'])} | {pct(rm['top']['agreement_drop'])} / "
                         f"{pct(rm['random']['agreement_drop'])} | {ratio} |")
    return lines + [""]


def markdown(res: dict) -> str:
    lines = [(f"Seed {res['seed']} (fits and random concepts), pair seed {res['pair_seed']}, {res['threads']} "
              f"thread(s), {res['seconds'] / 60:.1f} min in all."), ""]
    for r in res["pairs"].values():
        lines += markdown_pair(r)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--demo-out", default="featinv_demo", help="the quick demo pair's folder")
    p.add_argument("--fine-grid", metavar="DIR", help="also the 16 px pair (4x4 map, bench_analyses' FINE settings), "
                   "cached (or trained, several minutes) under DIR")
    p.add_argument("--only-fine", action="store_true", help="with --fine-grid: skip the quick pair")
    p.add_argument("--pair-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", type=names, default=list(SAES), help="comma-separated SAE kinds")
    p.add_argument("--grid", choices=tuple(GRIDS), default="reduced", help="SAE latents x top_k: full "
                   f"{GRIDS['full'][0]} x {GRIDS['full'][1]}, reduced {GRIDS['reduced'][0]} x {GRIDS['reduced'][1]}")
    p.add_argument("--sae-latents", type=ints, help="comma-separated (default: the --grid's)")
    p.add_argument("--sae-top-ks", type=ints, help="comma-separated (default: the --grid's)")
    p.add_argument("--passes", type=int, default=None, help="SAE epochs (default: fit_concepts' ~2,000 steps)")
    p.add_argument("--sklearn", type=names, default=list(SKLEARN), help="comma-separated; '' for none")
    p.add_argument("--sklearn-ks", type=ints, default=list(SKLEARN_KS), help="comma-separated")
    p.add_argument("--removal-latents", type=int, default=256)
    p.add_argument("--removal-top-k", type=int, default=8)
    p.add_argument("--skip-removal", action="store_true")
    p.add_argument("--removal-digits", type=int, default=0, help="the first N held-out digits (0: all; smoke runs)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench_sae_grid")
    p.add_argument("--tables-from", metavar="JSON", help="print the tables of an earlier run's bench_sae_grid.json")
    args = p.parse_args(argv)
    if args.tables_from:
        print(markdown(json.loads(Path(args.tables_from).read_text())))
        return 0
    if args.only_fine and not args.fine_grid:
        p.error("--only-fine needs --fine-grid DIR")
    args.sae_latents = args.sae_latents or list(GRIDS[args.grid][0])
    args.sae_top_ks = args.sae_top_ks or list(GRIDS[args.grid][1])
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    t0 = time.time()
    res = {"seed": args.seed, "pair_seed": args.pair_seed, "threads": args.threads, "kinds": args.kinds,
           "latents": args.sae_latents, "top_ks": args.sae_top_ks, "passes": args.passes, "pairs": {}}
    if not args.only_fine:
        res["pairs"]["quick"] = bench_pair(args, "quick demo pair (8 px, 2x2 map)", args.demo_out, None)
    if args.fine_grid:
        if not cache_dir(Path(args.fine_grid), FINE, args.pair_seed, "quick").exists():
            print(f"no cached 16 px pair under {args.fine_grid}: training it first (several minutes)", file=sys.stderr)
        res["pairs"]["fine"] = bench_pair(args, "16 px demo pair (--fine-grid, 4x4 map)", args.fine_grid, FINE)
    res["seconds"] = time.time() - t0
    out = write_results(args.out, "bench_sae_grid", res, markdown(res))
    print(f"{res['seconds']:.0f} s; written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
