"""The concept index pass and the HTML atlas at thousands of concepts: seconds and file sizes.

    python benchmarks/bench_atlas.py                 # 4,096 concepts over 1,000 maps of 1024 x 9 x 9
    python benchmarks/bench_atlas.py --quick         # 512 concepts over 64 maps of 256 x 9 x 9 (seconds)
    python benchmarks/bench_atlas.py --browser       # also open the page in headless Chromium (Debian's)

Data, all random (seeded by --seed), so only time and size mean anything: non-negative maps uniform in [0, 1)
(--images x --channels x --grid x --grid, held in memory; generating them is not timed); a random *linear* head
(--classes classes over the grid-averaged map, so the first-order importance is the exact logit drop); a random
TopK sparse autoencoder as the basis (--concepts latents, unit decoder rows, the encoder their transpose, --top-k
active per location, its pre-bias the maps' mean 0.5, random encoder biases in [-0.5, 0] for a spread of
frequencies; built with ``method_of('topk').basis_from_sae``, no fit). Thumbnail images: smooth random
pictures (8 x 8 noise, bilinearly upsampled to --image-size px), which compress about as well as photographs.

Timed: ``concept_index`` (one streamed pass, --batch maps at a time, labels = the head's top-1, top 5 images per
concept), ``write_atlas_html`` (the top 10 concepts by importance marked drawn) and ``index.json``
(``ConceptIndex.to_json``); sizes of atlas.html (and its heat bytes and thumbnails) and index.json. With
--browser: seconds until the page lists its first rows, and until ``show all`` has rendered every concept.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import peak_rss_gib, reset_peak_rss, write_results

from featinv.analysis.atlas_html import atlas_payload, write_atlas_html
from featinv.analysis.concept_index import concept_index
from featinv.analysis.concepts import ConceptBasis, method_of
from featinv.nets.sae import SparseAutoencoder

MB = 1e6


class LinearHead:
    """A random linear head over the grid-averaged map: (N, C, h, w) -> logits (N, classes)."""

    def __init__(self, channels: int, classes: int, g: torch.Generator):
        self.weight = torch.randn(classes, channels, generator=g) / channels ** 0.5
        self.bias = torch.randn(classes, generator=g)

    def logits_from_features(self, feats: torch.Tensor) -> torch.Tensor:
        return feats.mean(dim=(2, 3)) @ self.weight.T + self.bias


def random_sae(concepts: int, channels: int, top_k: int, g: torch.Generator) -> ConceptBasis:
    shapes = SparseAutoencoder(channels, concepts, top_k, "topk").state_dict()
    tensors = {name: torch.zeros_like(t) for name, t in shapes.items()}
    tensors["W_dec"] = F.normalize(torch.randn(concepts, channels, generator=g), dim=1)
    tensors["W_enc"] = tensors["W_dec"].clone()
    tensors["b_pre"] = torch.full((channels,), 0.5)               # the maps' mean: every latent gets to win somewhere
    tensors["b_enc"] = -0.5 * torch.rand(concepts, generator=g)   # ... some rarely: a spread of frequencies
    return method_of("topk").basis_from_sae(tensors, top_k, "random topk sae")


def browser_seconds(path: Path, k: int) -> dict:
    """Seconds until the page shows its first rows, and until ``show all`` has rendered all k."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the browser tests' launcher
    from app_server import launch_chromium
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            t0 = time.perf_counter()
            page.goto(path.as_uri(), timeout=300_000)
            page.wait_for_selector("#rows tr", timeout=300_000)
            load = time.perf_counter() - t0
            t0 = time.perf_counter()
            page.click("#all")
            page.wait_for_function(f"document.querySelectorAll('#rows tr').length == {k}", timeout=300_000)
            return {"first_rows_s": load, "show_all_s": time.perf_counter() - t0}
        finally:
            browser.close()


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    maps = torch.rand(args.images, args.channels, args.grid, args.grid, generator=g)
    pictures = F.interpolate(torch.rand(args.images, 3, 8, 8, generator=g), size=args.image_size, mode="bilinear")
    head, basis = LinearHead(args.channels, args.classes, g), random_sae(args.concepts, args.channels, args.top_k, g)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reset_peak_rss()
    t0 = time.perf_counter()
    index = concept_index(basis, head, maps, top=5, batch_size=args.batch)
    index_s = time.perf_counter() - t0
    peak = peak_rss_gib()
    drawn = torch.tensor(index.summary()["importance"]).argsort(descending=True)[:10].tolist()
    names = [f"image{n}" for n in range(args.images)]
    t0 = time.perf_counter()
    html = write_atlas_html(out / "atlas.html", index, pictures, names, drawn)
    html_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    (out / "index.json").write_text(json.dumps(index.to_json(names), allow_nan=False))
    json_s = time.perf_counter() - t0
    payload = atlas_payload(index, pictures, names, drawn)
    res = {"concepts": args.concepts, "images": args.images, "map": [args.channels, args.grid, args.grid],
           "top_k": args.top_k, "batch": args.batch, "threads": args.threads, "classes": args.classes,
           "index_s": index_s, "peak_rss_gib": peak, "html_s": html_s, "html_mb": html.stat().st_size / MB,
           "heat_mb": len(payload["heat"]) / MB, "thumbs_mb": sum(map(len, payload["thumbs"].values())) / MB,
           "thumbnails": len(payload["thumbs"]), "json_s": json_s, "json_mb": (out / "index.json").stat().st_size / MB,
           "dead": int((index.frequency == 0).sum())}
    if args.browser:
        res["browser"] = browser_seconds(html, args.concepts)
    return res


def markdown(r: dict) -> str:
    c, h, w = r["map"]
    lines = [f"Random data: {r['images']} maps of {c} x {h} x {w} (uniform [0, 1)), a random linear head "
             f"({r['classes']} classes), a random TopK SAE ({r['concepts']} latents, top_k {r['top_k']}; "
             f"{r['dead']} never active); {r['threads']} threads, batches of {r['batch']} maps.", "",
             "| concepts | index pass | maps/s | peak RSS | atlas.html: write | size (heat / thumbnails) | "
             "index.json: write | size |", "|---|---|---|---|---|---|---|---|",
             f"| {r['concepts']} | {r['index_s']:.1f} s | {r['images'] / r['index_s']:.1f} | "
             f"{r['peak_rss_gib']:.2f} GiB | "
             f"{r['html_s']:.1f} s | {r['html_mb']:.1f} MB ({r['heat_mb']:.1f} / {r['thumbs_mb']:.1f} MB, "
             f"{r['thumbnails']} images) | {r['json_s']:.1f} s | {r['json_mb']:.1f} MB |"]
    if "browser" in r:
        b = r["browser"]
        lines += ["", f"Headless Chromium: first rows after {b['first_rows_s']:.2f} s; show all "
                      f"({r['concepts']} rows) {b['show_all_s']:.2f} s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="512 concepts, 64 maps of 256 x 9 x 9 (a smoke run)")
    p.add_argument("--concepts", type=int, default=4096)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--channels", type=int, default=1024)
    p.add_argument("--grid", type=int, default=9)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--batch", type=int, default=64, help="maps per batch of the index pass")
    p.add_argument("--image-size", type=int, default=96, help="the thumbnail source pictures' side (px)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--browser", action="store_true", help="also time the page in headless Chromium")
    p.add_argument("--out", default="bench_atlas")
    args = p.parse_args(argv)
    if args.quick:
        args.concepts, args.images, args.channels, args.top_k, args.classes = 512, 64, 256, 8, 100
    res = run(args)
    write_results(args.out, "bench_atlas", res, markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
