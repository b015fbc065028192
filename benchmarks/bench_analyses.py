"""The analyses measured on the demo pair's held-out digits: steering, masked steering, interpolation, PGD.

    python benchmarks/bench_analyses.py --demo-out featinv_demo        # ~6-10 minutes on a 2-core CPU

Prints Markdown tables (pasted into RESULTS.md) and writes them with the raw numbers to --out.
Seeds: the pair is the quick demo pair of --pair-seed (0); pairs, cells and digits are drawn with
torch.Generator().manual_seed(--seed) (0); reconstructions use the demo's sampling seed with one key
per digit, the same for every α / t / perturbation of that digit.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch
from _common import write_results

from featinv.analysis.compose import interpolate
from featinv.analysis.perturb import pgd
from featinv.analysis.steering import class_direction, feature_range, mean_difference_direction, probe_direction, steer
from featinv.demo.digits import rgb
from featinv.demo.pair import load_demo_pair
from featinv.demo.stages import QUICK, classifier_accuracy
from featinv.diffusion.reconstruct import Reconstructor

ALPHAS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
# A finer feature grid for masked steering: digits upsampled to 16 px give the classifier a 4x4 map
# (4x4 latents with a third autoencoder level); everything else as the quick demo.
FINE = dataclasses.replace(QUICK, image_size=16, vae_mult=(1, 2, 2))


def share(x: torch.Tensor) -> float:
    return x.float().mean().item()


@torch.no_grad()
def labels_of(ext, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([ext.classify(c).argmax(1) for c in images.flatten(0, -4).split(500)]).view(images.shape[:-3])


@torch.no_grad()
def bench_steering(pair, rec, ftr, ytr, x, y, n: int, g: torch.Generator) -> list[dict]:
    """Digits of class a steered towards b (random a != b) per direction source, with and without clamp."""
    ext = pair.extractor
    idx = torch.randperm(len(y), generator=g)[:n]
    a = y[idx]
    b = (a + torch.randint(1, 10, (n,), generator=g)) % 10
    feats = rec.features(rgb(x[idx]))
    keys = [f"steer{i}" for i in idx.tolist()]
    sources = {
        "mean difference (digits b vs. a)": lambda ai, bi: mean_difference_direction(ftr[ytr == bi], ftr[ytr == ai]),
        "probe (digits b vs. a)": lambda ai, bi: probe_direction(ftr[ytr == bi], ftr[ytr == ai]),
        "head weight of b": lambda ai, bi: class_direction(ext, bi),
    }
    clamps = {"no": None, "per channel": feature_range(ftr), "per channel and location": feature_range(ftr, True)}
    rows = []
    for name, make in sources.items():
        cache = {}
        dirs = torch.stack([cache.setdefault((ai, bi), make(ai, bi)) for ai, bi in zip(a.tolist(), b.tolist())])
        for clamp_name, clamp in clamps.items():
            row = {"source": name, "clamp": clamp_name, "features": [], "reconstructions": []}
            steered = torch.stack([steer(feats[i:i + 1], dirs[i], ALPHAS, clamp=clamp)[0] for i in range(n)])
            for j in range(len(ALPHAS)):
                row["features"].append(share(ext.logits_from_features(steered[:, j]).argmax(1) == b))
                samples = rec.from_features(steered[:, j], keys)
                row["reconstructions"].append(share(labels_of(ext, samples) == b[:, None]))
            rows.append(row)
            print(f"  steering: {name}, clamp {clamp_name}: {row['reconstructions']}", file=sys.stderr)
    return rows


@torch.no_grad()
def bench_masked(pair, rec, ftr, ytr, x, y, n: int, alpha: float, g: torch.Generator) -> dict:
    """Steer one random cell of the feature grid; share of the pixel change inside the cell's image region."""
    ext = pair.extractor
    c, h, w = ext.feature_shape
    size = ext.image_size
    idx = torch.randperm(len(y), generator=g)[:n]
    a = y[idx]
    b = (a + torch.randint(1, 10, (n,), generator=g)) % 10
    cells = torch.randint(0, h * w, (n,), generator=g)
    feats = rec.features(rgb(x[idx]))
    keys = [f"mask{i}" for i in idx.tolist()]
    base = rec.from_features(feats, keys)
    inside, inside_unmasked = [], []
    masked, unmasked = [], []
    for i in range(n):
        d = mean_difference_direction(ftr[ytr == b[i]], ftr[ytr == a[i]])
        m = torch.zeros(h, w)
        m.view(-1)[cells[i]] = 1
        masked.append(steer(feats[i:i + 1], d, [alpha], mask=m)[0, 0])
        unmasked.append(steer(feats[i:i + 1], d, [alpha])[0, 0])
    for edited, out in ((torch.stack(masked), inside), (torch.stack(unmasked), inside_unmasked)):
        change = (rec.from_features(edited, keys) - base).abs().sum(dim=(1, 2))  # (n, H, W)
        for i in range(n):
            r, col = divmod(int(cells[i]), w)
            region = change[i, r * size // h:(r + 1) * size // h, col * size // w:(col + 1) * size // w]
            out.append((region.sum() / change[i].sum().clamp(min=1e-12)).item())
    return {"grid": [h, w], "alpha": alpha, "n": n, "inside_masked": sum(inside) / n,
            "inside_unmasked": sum(inside_unmasked) / n, "area_share": 1 / (h * w)}


@torch.no_grad()
def bench_interpolation(pair, rec, x, y, n: int, steps: int, g: torch.Generator) -> dict:
    """A -> B between digits of different classes: labels along the path and where they switch to B."""
    ext = pair.extractor
    ts = [i / (steps - 1) for i in range(steps)]
    ia = torch.randperm(len(y), generator=g)[:4 * n]
    ib = torch.randperm(len(y), generator=g)[:4 * n]
    la, lb = labels_of(ext, rgb(x[ia])), labels_of(ext, rgb(x[ib]))
    keep = (la != lb).nonzero().flatten()[:n]  # the classifier labels A and B differently
    ia, ib, la, lb = ia[keep], ib[keep], la[keep], lb[keep]
    fa, fb = rec.features(rgb(x[ia])), rec.features(rgb(x[ib]))
    path = interpolate(fa, fb, ts)                                                   # (n, T, C, h, w)
    keys = [f"interp{i}" for i in range(n)]
    lab_f = torch.stack([ext.logits_from_features(path[:, t]).argmax(1) for t in range(steps)], 1)  # (n, T)
    lab_r = torch.stack([labels_of(ext, rec.from_features(path[:, t], keys))[:, 0] for t in range(steps)], 1)

    def switch(lab):  # first t from which the label is B's for the rest of the path (1.0 + step if never)
        at = []
        for row, target in zip(lab, lb):
            hits = (row == target).tolist()
            t_idx = next((i for i in range(steps) if all(hits[i:])), steps)
            at.append(ts[t_idx] if t_idx < steps else float("nan"))
        valid = [v for v in at if v == v]
        return sum(valid) / max(len(valid), 1), len(valid) / len(at)

    return {"ts": ts, "n": n,
            "features_a": [share(lab_f[:, t] == la) for t in range(steps)],
            "features_b": [share(lab_f[:, t] == lb) for t in range(steps)],
            "recon_a": [share(lab_r[:, t] == la) for t in range(steps)],
            "recon_b": [share(lab_r[:, t] == lb) for t in range(steps)],
            "switch_features": switch(lab_f), "switch_recon": switch(lab_r)}


@torch.no_grad()
def bench_pgd(pair, rec, x, y, n: int, eps: float, steps: int) -> dict:
    """Untargeted PGD: flip rate, and what the reconstruction of the adversarial digit is read as."""
    ext = pair.extractor
    images = rgb(x[:n])
    clean = labels_of(ext, images)
    adv = pgd(ext, images, clean, eps, steps)  # the default step: eps / 8 at 20 steps
    adv_lab = labels_of(ext, adv)
    keys = [f"pgd{i}" for i in range(n)]
    rec_clean = labels_of(ext, rec(images, keys))
    rec_adv = labels_of(ext, rec(adv, keys))
    flipped = adv_lab != clean
    return {"eps": eps, "steps": steps, "step_size": eps / 8, "n": n, "flipped": share(flipped),
            "linf": (adv - images).abs().max().item(),
            "rec_clean_as_clean": share(rec_clean == clean[:, None]),
            "rec_adv_as_adv": share(rec_adv == adv_lab[:, None]),
            "rec_adv_as_clean": share(rec_adv == clean[:, None]),
            "rec_adv_as_adv_flipped": share((rec_adv == adv_lab[:, None])[flipped]),
            "rec_adv_as_clean_flipped": share((rec_adv == clean[:, None])[flipped])}


def pct(v: float) -> str:
    return f"{100 * v:.1f} %"


def markdown(r: dict) -> str:
    lines = [] if "steering" in r else [markdown_fine(r["masked_fine"])]
    return "\n".join(lines) + "\n" if lines else markdown_all(r)


def markdown_fine(f: dict) -> str:
    return (f"Masked steering on a 16 px demo pair with a {f['grid'][0]}x{f['grid'][1]} feature map (classifier "
            f"accuracy {pct(f['classifier_accuracy'])}, label agreement of plain reconstructions "
            f"{pct(f['label_agreement'])}; one random cell, mean-difference direction, α = {f['alpha']:g}, "
            f"{f['n']} digits): share of the pixel change inside the cell's image region {pct(f['inside_masked'])}; "
            f"steering everywhere instead: {pct(f['inside_unmasked'])}; the cell's area: {pct(f['area_share'])}.")


def markdown_all(r: dict) -> str:
    lines = [f"Steering held-out digits of class a towards b ({r['n_steer']} random pairs a != b, seed {r['seed']}); "
             "share of the classifier's top-1 = b on the steered features / on their reconstructions "
             f"(K = {r['samples']}); α in units of the input's mean per-location feature norm.", "",
             "| direction | clamp | " + " | ".join(f"α={a:g}" for a in ALPHAS) + " |",
             "|---|---|" + "---|" * len(ALPHAS)]
    for row in r["steering"]:
        cells = [f"{pct(f)} / {pct(c)}" for f, c in zip(row["features"], row["reconstructions"])]
        lines.append(f"| {row['source']} | {row['clamp']} | " + " | ".join(cells) + " |")
    m = r["masked"]
    lines += ["", f"Masked steering (one random cell of the {m['grid'][0]}x{m['grid'][1]} grid, mean-difference "
              f"direction, α = {m['alpha']:g}, {m['n']} digits): share of the pixel change inside the cell's image "
              f"region {pct(m['inside_masked'])}; steering everywhere instead: {pct(m['inside_unmasked'])}; "
              f"the cell's area: {pct(m['area_share'])}.", ""]
    if r.get("masked_fine"):
        lines += [markdown_fine(r["masked_fine"]), ""]
    it = r["interpolation"]
    lines += [f"Interpolation A -> B ({it['n']} digit pairs the classifier labels differently): share labelled A / B along the path.",
              "", "| t | " + " | ".join(f"{t:.1f}" for t in it["ts"]) + " |", "|---|" + "---|" * len(it["ts"])]
    for key, name in (("features", "features (head)"), ("recon", "reconstructions")):
        lines.append(f"| {name} | " + " | ".join(f"{100 * a:.0f} / {100 * b:.0f}" for a, b in
                                                   zip(it[f"{key}_a"], it[f"{key}_b"])) + " |")
    sf, sr = it["switch_features"], it["switch_recon"]
    lines += ["", f"Switch to B's label for good at t = {sf[0]:.2f} on the features ({pct(sf[1])} of paths switch), "
              f"t = {sr[0]:.2f} on the reconstructions ({pct(sr[1])} of paths).", ""]
    p = r["pgd"]
    lines += [f"PGD (untargeted, L∞ ε = {p['eps']:g}, {p['steps']} steps of {p['step_size']:g}, {p['n']} digits, "
              f"max |δ| = {p['linf']:.3f}): flips {pct(p['flipped'])} of clean predictions. Reconstructions of the "
              f"adversarial digits are read as the adversarial label {pct(p['rec_adv_as_adv'])} and as the clean "
              f"label {pct(p['rec_adv_as_clean'])} (flipped digits only: {pct(p['rec_adv_as_adv_flipped'])} / "
              f"{pct(p['rec_adv_as_clean_flipped'])}); reconstructions of the clean digits are read as the clean "
              f"label {pct(p['rec_clean_as_clean'])}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo-out", default="featinv_demo")
    p.add_argument("--pair-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pairs", type=int, default=200, help="steering: digit pairs a != b")
    p.add_argument("--digits", type=int, default=0, help="cap on the digits of the other measurements (0: defaults)")
    p.add_argument("--samples", type=int, default=1, help="K reconstructions per steered digit")
    p.add_argument("--fine-grid", metavar="DIR", help="also measure masked steering on the 16 px demo pair "
                   "(4x4 feature map) cached (or trained, ~3 minutes) under DIR")
    p.add_argument("--only-fine", action="store_true", help="with --fine-grid: skip the other measurements")
    p.add_argument("--out", default="bench_analyses")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    t0 = time.time()
    pair = load_demo_pair(args.demo_out, seed=args.pair_seed, log=lambda m: print(m, file=sys.stderr))
    sc = dataclasses.replace(pair.sample_config, num_samples=args.samples)
    rec = Reconstructor(pair.model, pair.extractor, sc, fixed_batch=50)
    x, y = pair.data["x_test"], pair.data["y_test"]
    ftr, ytr = rec.features(rgb(pair.data["x_train"])), pair.data["y_train"]
    g = torch.Generator().manual_seed(args.seed)
    results = {"seed": args.seed, "pair_seed": args.pair_seed, "samples": args.samples, "n_steer": args.pairs,
               "classifier_accuracy": classifier_accuracy(pair.extractor, pair.data)}
    cap = lambda n: min(n, args.digits) if args.digits else n  # noqa: E731
    if not args.only_fine:
        results["steering"] = bench_steering(pair, rec, ftr, ytr, x, y, args.pairs, g)
        results["masked"] = bench_masked(pair, rec, ftr, ytr, x, y, cap(100), 2.0, g)
        results["interpolation"] = bench_interpolation(pair, rec, x, y, cap(60), 11, g)
        results["pgd"] = bench_pgd(pair, rec, x, y, cap(len(y)), 0.15, 20)
    if args.fine_grid:
        fine = load_demo_pair(args.fine_grid, seed=args.pair_seed, settings=FINE, log=lambda m: print(m, file=sys.stderr))
        rec_f = Reconstructor(fine.model, fine.extractor, sc, fixed_batch=50)
        xf, yf = fine.data["x_test"], fine.data["y_test"]
        ftr_f = rec_f.features(rgb(fine.data["x_train"]))
        results["masked_fine"] = bench_masked(fine, rec_f, ftr_f, fine.data["y_train"], xf, yf, cap(100), 2.0,
                                              torch.Generator().manual_seed(args.seed))
        with torch.no_grad():
            keys = [f"fine{i}" for i in range(len(yf))]
            agree = labels_of(fine.extractor, rec_f(rgb(xf), keys)) == labels_of(fine.extractor, rgb(xf))[:, None]
        results["masked_fine"]["label_agreement"] = share(agree)
        results["masked_fine"]["classifier_accuracy"] = classifier_accuracy(fine.extractor, fine.data)
    results["seconds"] = time.time() - t0
    out = write_results(args.out, "bench_analyses", results, markdown(results))
    print(f"{results['seconds']:.0f} s; written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
