"""How long one Reconstruct request (K reconstructions) takes in ``featinv app`` on the demo pair.

Three views of the same request, measured side by side on one machine:
1. in process: the page's callback (``Callbacks.reconstruct``: upload checks, features, one sampler run
   for K samples, classifier, formatting), without a web server;
2. wall time of a fresh ``featinv app`` process until it serves (imports, cached pair, page build);
3. browser round trip: headless Chromium clicks Reconstruct and waits until the K images and the
   top-5 table are on the page (queue, HTTP, PNG files, rendering included).

    python benchmarks/bench_app.py --demo-out /work/demo_shared --repeats 5   # needs the app extra + chromium

Prints a Markdown table: the first request of each view (warm-up) and median / min over ``--repeats`` more.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the browser test's server helper


def in_process(demo_out: str, k: int, repeats: int) -> list[float]:
    from featinv.app.session import demo_session
    from featinv.app.ui import Callbacks

    torch.set_num_threads(1)  # what `featinv app` uses on a 2-core machine
    torch.set_flush_denormal(True)
    session = demo_session(demo_out, log=lambda *a: None)
    cb, d = Callbacks(session), session.sample_config
    times = []
    for seed in range(repeats + 1):
        start = time.perf_counter()
        gallery, *_ = cb.reconstruct(session.examples[3], d.steps, d.guidance_scale, d.uncond, seed, k)
        times.append(time.perf_counter() - start)
        assert len(gallery) == k
    return times


def browser(demo_out: str, k: int, repeats: int) -> tuple[float, list[float]]:
    from app_server import AppServer, launch_chromium, run_reconstruct
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        app = AppServer(Path(demo_out), Path(tmp))
        try:
            with sync_playwright() as p:
                chromium = launch_chromium(p)
                page = chromium.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(app.url, timeout=60_000)
                example = next(Path(demo_out).glob("cache/*/app_examples/digit3.png"))
                page.set_input_files("#upload input[type=file]", str(example))
                page.wait_for_selector("#preview img", timeout=60_000)
                page.click("button:has-text('Advanced: sampler settings')")
                page.fill("#k input[type=number]", str(k))
                page.press("#k input[type=number]", "Enter")
                times = []
                for seed in range(repeats + 1):  # a new seed each time: new pictures to wait for
                    page.fill("#seed input", str(seed))
                    page.press("#seed input", "Enter")
                    times.append(run_reconstruct(page, k))
                chromium.close()
        finally:
            app.stop()
    return app.start_seconds, times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo-out", default="featinv_demo", help="the demo's out folder (trained pair cached there)")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    local = in_process(args.demo_out, args.k, args.repeats)
    start, remote = browser(args.demo_out, args.k, args.repeats)
    (local_first, *local), (remote_first, *remote) = local, remote
    print(f"\nOne Reconstruct request, K = {args.k}, demo pair (torch {torch.__version__}, 1 thread)\n")
    print("| measured | first request s | median s | min s |")
    print("|---|---:|---:|---:|")
    print(f"| in-process callback (`Callbacks.reconstruct`) | {local_first:.2f} | {statistics.median(local):.2f} | "
          f"{min(local):.2f} |")
    print(f"| browser round trip (click -> K images + top-5 table) | {remote_first:.2f} | "
          f"{statistics.median(remote):.2f} | {min(remote):.2f} |")
    print(f"| `featinv app` start until it serves (cached pair) | {start:.1f} | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
