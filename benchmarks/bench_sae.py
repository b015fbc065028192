"""featinv's sparse autoencoders side by side with Overcomplete's TopKSAE: quality and training throughput.

    python benchmarks/bench_sae.py                           # ~8 min on a 2-core CPU
    python benchmarks/bench_sae.py --quick                   # < 1 min: fewer epochs and vectors
    python benchmarks/bench_sae.py --demo-out featinv_demo   # quality on the cached demo classifier's maps
    python benchmarks/bench_sae.py --only-scale-shards --shard-dir /path/to/shards   # (c), see below

(a) Quality: the per-location channel vectors of the demo's kind of feature map (the digits CNN, 64 x 2 x 2 at
8 px, trained here for 8 epochs; with --demo-out the cached demo pair's classifier instead), training digits for
fitting and held-out digits for scoring. 256 latents, k = 8, the same batches (batch 256, shuffled per epoch),
epochs and learning rate (featinv's default for 256 latents) for every row, on one thread. Rows: featinv TopK
with AuxK (its default), without AuxK, BatchTopK; Overcomplete's TopKSAE (its default Linear + BatchNorm encoder,
its train_sae with its default gradient clipping 1.0) with a plain MSE loss and with its top_k_auxiliary_loss.
Held-out FVU (Σ‖x − x_hat‖² / Σ‖x − mean‖²), mean L0 and the share of latents never active on the held-out set.

(b) Throughput at the scale shape: d = 1024, 4,096 latents, k = 32, batch 4,096, Adam, random N(0, 1) data
(8 distinct batches cycled), one epoch of --vectors vectors after one untimed warm-up step; vectors/s and the
ratio to Overcomplete. Seeds: --seed for the CNN, the SAEs' initialisation and the batch order.

(c) Scale, ``--only-scale-shards`` (the issue: 810,000 x 1024 vectors, 10,000 ConvNeXt maps, in shards of 100,000,
3.3 GB in all; goals: one epoch <= 5 min and peak memory <= 1.5 GB on the 2-core CPU). One command:

    python benchmarks/bench_sae.py --only-scale-shards --rows 810000 --shard-rows 100000 --shard-dir DIR

Expected on an idle 2-core CPU: ~1 min to write the shards the first time (a rerun reuses shards of the right
shape), then the epoch, ~1.5-3 min (bench_sae (b) ran featinv topk at ~10,000-12,000 vectors/s idle): ~2-4 min in
all; --cold-cache adds the disk reads. DIR needs 3.3 GB free. Random non-negative float32 shards (uniform [0, 1),
seeded (--seed, shard)) are written chunk by chunk through ``np.lib.format.open_memmap`` (never the whole set in
memory). A fresh subprocess then trains one epoch of a TopK SAE (4,096 latents, k = 32, batch 4,096, --threads
threads, featinv's defaults: AuxK, its learning rate) on ``shard_batches`` over DIR, so its peak memory is the
fit's own. The shards are read memory-mapped: the pages read count in the process's RSS as file-backed page cache
(the kernel drops them under pressure), so VmHWM grows with the data read. The goal is therefore compared against
the fit's private memory, the peak of RssAnon (/proc/self/status, read after every step and every 10 ms by a
thread: a sampled peak); VmHWM (absolute, and over the RSS before the fit) and the peak RssFile stand beside it.
GB = 10^9 bytes (the issue's). --cold-cache evicts the shards from the page cache first (fsync + posix_fadvise
DONTNEED, best effort), so that the epoch reads them from the disk.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import RssPeaks, evict_page_cache, reset_peak_rss, status_kib, status_kibs, write_results

from featinv.analysis.sae import default_lr, sae_metrics, train_sae
from featinv.analysis.shards import shard_batches
from featinv.demo.digits import load_digits_split, make_extractor, rgb, train_classifier

LATENTS, TOP_K, BATCH = 256, 8, 256
SCALE = {"d": 1024, "latents": 4096, "top_k": 32, "batch": 4096}
SCALE_GOALS = {"seconds": 300.0, "peak_gb": 1.5}   # the issue's: one epoch <= 5 min, peak memory <= 1.5 GB
GB = 1e9
SHARD_NAME = re.compile(r"scale_shard_\d{5}\.npy")
WRITE_CHUNK = 8192                                 # rows per write: 32 MiB of float32 at d = 1024


class Epochs:
    """An iterable whose e-th iteration yields ``batches(e)``: Overcomplete's train_sae re-iterates its loader
    once per epoch, so both libraries see the same batches in the same order."""

    def __init__(self, batches):
        self.batches, self.epoch = batches, 0

    def __iter__(self):
        self.epoch += 1
        return iter(self.batches(self.epoch - 1))


def shuffled(x: torch.Tensor, batch: int, seed: int):
    return lambda epoch: x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 1000 + epoch))].split(
        batch)


def digit_maps(args) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(train (N, C), held-out (M, C)) per-location vectors and where they come from."""
    if args.demo_out:
        from featinv.demo.pair import load_demo_pair
        pair = load_demo_pair(args.demo_out, device="cpu")
        extractor, data, source = pair.extractor, pair.data, f"demo pair {args.demo_out}"
    else:
        data = load_digits_split(8, seed=args.seed)
        extractor = make_extractor(train_classifier(data, 8, args.seed, torch.device("cpu")), 8)
        source = "digits CNN, 8 epochs"
    with torch.no_grad():
        maps = [extractor(rgb(data[k])) for k in ("x_train", "x_test")]
    return *(m.permute(0, 2, 3, 1).reshape(-1, m.shape[1]) for m in maps), source


def overcomplete_or_none():
    try:
        from overcomplete.sae import TopKSAE
        from overcomplete.sae import train_sae as oc_train
        from overcomplete.sae.losses import top_k_auxiliary_loss
    except ImportError as err:  # not installed, or matplotlib >= 3.9 (see FACTS: pip install "matplotlib<3.9")
        print(f"Overcomplete unavailable: {err}")
        return None
    return TopKSAE, oc_train, top_k_auxiliary_loss


def mse(x, x_hat, z_pre, z, dictionary):
    return (x - x_hat).square().mean()


@torch.no_grad()
def oc_metrics(model, x: torch.Tensor) -> dict:
    model.eval()
    _, z, x_hat = model(x)
    fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    dead = int(((z > 0).sum(0) == 0).sum())
    l0 = (z > 0).sum(1).float().mean().item()
    return {"fvu": fvu.item(), "l0": l0, "dead": dead, "dead_share": dead / z.shape[1]}


def bench_quality(args, oc) -> dict:
    train, held_out, source = digit_maps(args)
    d, lr, rows = train.shape[1], default_lr(LATENTS), {}
    batches = shuffled(train, BATCH, args.seed)
    for name, kind, aux_k in (("featinv topk + AuxK", "topk", None), ("featinv topk, no AuxK", "topk", 0),
                              ("featinv batchtopk + AuxK", "batchtopk", None)):
        sae, stats = train_sae(batches, d, LATENTS, TOP_K, kind, epochs=args.epochs, lr=lr, aux_k=aux_k, seed=args.seed)
        rows[name] = {**sae_metrics(sae, held_out), "seconds": stats["seconds"]}
    if oc is not None:
        TopKSAE, oc_train, aux_loss = oc
        for name, criterion in (("Overcomplete TopKSAE, MSE", mse), ("Overcomplete TopKSAE + its AuxK", aux_loss)):
            torch.manual_seed(args.seed)
            model = TopKSAE(d, LATENTS, top_k=TOP_K)
            start = time.perf_counter()
            oc_train(model, Epochs(batches), criterion, torch.optim.Adam(model.parameters(), lr=lr),
                     nb_epochs=args.epochs, monitoring=0)
            rows[name] = {**oc_metrics(model, held_out), "seconds": time.perf_counter() - start}
    return {"source": source, "train": len(train), "held_out": len(held_out), "d": d, "epochs": args.epochs,
            "lr": lr, "rows": rows}


def bench_speed(args, oc) -> dict:
    d, latents, k, batch = SCALE.values()
    g = torch.Generator().manual_seed(args.seed)
    pool = [torch.randn(batch, d, generator=g) for _ in range(8)]
    steps = max(1, args.vectors // batch)
    cycle = lambda epoch: (pool[i % len(pool)] for i in range(steps))
    rows = {}
    kinds = ("topk",) if args.quick else ("topk", "batchtopk")
    for kind in kinds:
        train_sae(lambda e: pool[:1], d, latents, k, kind)  # warm-up: lazy imports, allocator
        _, stats = train_sae(cycle, d, latents, k, kind, seed=args.seed)
        rows[f"featinv {kind}"] = stats["seconds"]
    if oc is not None:
        TopKSAE, oc_train, _ = oc
        torch.manual_seed(args.seed)
        model = TopKSAE(d, latents, top_k=k)
        opt = torch.optim.Adam(model.parameters(), lr=default_lr(latents))
        oc_train(model, pool[:1], mse, opt, nb_epochs=1, monitoring=0)  # warm-up
        start = time.perf_counter()
        oc_train(model, Epochs(cycle), mse, opt, nb_epochs=1, monitoring=0)
        rows["Overcomplete TopKSAE"] = time.perf_counter() - start
    return {"vectors": steps * batch, **SCALE, "seconds": rows}


# ----- (c) scale: one epoch over memory-mapped shards ---------------------------------------------------

def shard_ok(path: Path, rows: int, d: int) -> bool:
    """True if ``path`` is a complete float32 (rows, d) .npy file (its header and its size)."""
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    ok = arr.shape == (rows, d) and arr.dtype == np.float32
    offset = arr.offset if isinstance(arr, np.memmap) else 0
    del arr
    return ok and os.path.getsize(path) == offset + rows * d * 4


def write_shards(folder: Path, rows: int, shard_rows: int, d: int, seed: int) -> dict:
    """Random uniform [0, 1) float32 shards ``scale_shard_NNNNN.npy`` of ``shard_rows`` rows (the last: the rest),
    written WRITE_CHUNK rows at a time through open_memmap; a shard already there with the right shape is reused.
    Shards of ours that a run with other sizes left are deleted; any other .npy file is an error (shard_batches
    would read it too)."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [min(shard_rows, rows - a) for a in range(0, rows, shard_rows)]
    names = [f"scale_shard_{i:05d}.npy" for i in range(len(sizes))]
    foreign = sorted(p.name for p in folder.glob("*.npy") if not SHARD_NAME.fullmatch(p.name))
    foreign += ["shards.json"] if (folder / "shards.json").exists() else []
    if foreign:
        raise SystemExit(f"--shard-dir {folder} holds other shard files ({', '.join(foreign[:3])}, ...): "
                         "shard_batches reads every .npy file of the folder; give an empty or own folder")
    for p in folder.glob("scale_shard_*.npy"):
        if p.name not in names:
            p.unlink()
    start, written = time.perf_counter(), 0
    for i, (name, n) in enumerate(zip(names, sizes)):
        path = folder / name
        if shard_ok(path, n, d):
            continue
        tmp = path.with_name(name + ".part")  # not *.npy: never read half-written
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, d))
        rng = np.random.default_rng((seed, i))
        for a in range(0, n, WRITE_CHUNK):
            arr[a:a + WRITE_CHUNK] = rng.random((min(WRITE_CHUNK, n - a), d), dtype=np.float32)
        arr.flush()
        del arr
        os.replace(tmp, path)
        written += 1
        print(f"scale: wrote {path} ({n:,} x {d})", file=sys.stderr, flush=True)
    return {"shards": len(names), "written": written, "reused": len(names) - written,
            "write_seconds": time.perf_counter() - start, "bytes": rows * d * 4}


def scale_worker(args) -> dict:
    """One epoch on the shards in args.shard_dir, in this (fresh) process; memory read from /proc/self/status."""
    torch.set_num_threads(args.threads)
    d, latents, top_k, batch = SCALE.values()
    batches, facts = shard_batches(args.shard_dir, batch, seed=args.seed)
    if facts["d"] != d:
        raise SystemExit(f"shards of width {facts['d']}, expected {d}")
    base = status_kibs("VmRSS", "RssAnon", "RssFile")
    reset_done = reset_peak_rss()  # VmHWM from here on: the fit's (and the reads') own
    every = max(1, facts["vectors"] // batch // 10)
    peaks = RssPeaks()

    def progress(done: int, total: int | None) -> None:
        peaks.sample()
        if (done // batch) % every == 0:
            print(f"scale: {done:,} / {total:,} vectors, {time.perf_counter() - start:.0f} s, "
                  f"RssAnon {status_kib('RssAnon') / 2 ** 20:.2f} GiB", file=sys.stderr, flush=True)

    with peaks:
        start = time.perf_counter()
        _, stats = train_sae(batches, d, latents, top_k, "topk", epochs=1, seed=args.seed, vectors=facts["vectors"],
                             progress=progress)
        seconds = time.perf_counter() - start
    hwm, gb = status_kib("VmHWM"), 1024 / GB  # KiB -> GB
    return {**SCALE, "vectors": stats["vectors"], "shards": facts["shards"], "threads": args.threads,
            "cpus": os.cpu_count(), "torch": torch.__version__,
            "seconds": seconds, "vectors_per_s": stats["vectors"] / seconds, "steps": stats["steps"],
            "loss": stats["loss"], "dead": stats["dead"], "rss_before_gb": base["VmRSS"] * gb,
            "anon_before_gb": base["RssAnon"] * gb, "file_before_gb": base["RssFile"] * gb,
            "peak_anon_gb": peaks.peak["RssAnon"] * gb, "peak_file_gb": peaks.peak["RssFile"] * gb,
            "rss_reads": peaks.reads, "vmhwm_gb": hwm * gb, "vmhwm_over_before_gb": (hwm - base["VmRSS"]) * gb,
            "vmhwm_reset": reset_done}


def bench_scale_shards(args) -> dict:
    folder = Path(args.shard_dir)
    written = write_shards(folder, args.rows, args.shard_rows, SCALE["d"], args.seed)
    cold = evict_page_cache(sorted(folder.glob("scale_shard_*.npy"))) if args.cold_cache else False
    cmd = [sys.executable, __file__, "--scale-shards-worker", "--shard-dir", str(folder), "--threads",
           str(args.threads), "--seed", str(args.seed)]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)  # stderr (progress) passes through
    res = json.loads(done.stdout.strip().splitlines()[-1])
    res.update(rows=args.rows, shard_rows=args.shard_rows, shard_dir=str(folder), cold_cache=cold, **written,
               goals=SCALE_GOALS, seconds_met=res["seconds"] <= SCALE_GOALS["seconds"],
               peak_met=res["peak_anon_gb"] <= SCALE_GOALS["peak_gb"])
    return res


def markdown_scale(r: dict) -> str:
    def yes(ok: bool) -> str:
        return "yes" if ok else "**no**"

    cache = ("evicted first (posix_fadvise DONTNEED)" if r["cold_cache"] else
             "warm (shards just written or read before: mostly in the page cache)")
    hwm = f"{r['vmhwm_gb']:.2f} GB ({r['vmhwm_over_before_gb']:+.2f} GB over the {r['rss_before_gb']:.2f} GB before)"
    rows = [("epoch", f"{r['seconds']:.0f} s ({r['vectors_per_s']:,.0f} vectors/s, {r['steps']} steps)",
             f"<= {r['goals']['seconds']:.0f} s", yes(r["seconds_met"])),
            ("peak private memory (RssAnon, sampled)",
             f"{r['peak_anon_gb']:.2f} GB (before the fit {r['anon_before_gb']:.2f} GB)",
             f"<= {r['goals']['peak_gb']:g} GB", yes(r["peak_met"])),
            ("peak RSS (VmHWM) incl. mapped shard pages", hwm, "-", "-"),
            ("peak file-backed RSS (RssFile, sampled): mapped shard pages, libraries",
             f"{r['peak_file_gb']:.2f} GB (before the fit {r['file_before_gb']:.2f} GB)", "-", "-")]
    lines = [(f"### (c) Scale: one epoch, TopK SAE d = {r['d']}, {r['latents']} latents, k = {r['top_k']}, batch "
              f"{r['batch']}, {r['threads']} threads, on {r['vectors']:,} random vectors in {r['shards']} "
              f"memory-mapped shards of {r['shard_rows']:,} ({r['bytes'] / GB:.2f} GB; {r['written']} written in "
              f"{r['write_seconds']:.0f} s, {r['reused']} reused); page cache {cache}"), "",
             "| figure | value | goal | met |", "|---|---:|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    lines += ["", (f"Last batch FVU {r['loss']:.3f}, {r['dead']} dead latents (random data: no structure to learn). "
                   "GB = 10^9 bytes. The memory goal is compared against the peak RssAnon (the process's private "
                   "memory, Python and torch included); VmHWM also counts the shard pages read through the memory "
                   "map, which are page cache.")
                  + ("" if r["vmhwm_reset"] else " (VmHWM could not be reset: it includes the imports.)")]
    return "\n".join(lines) + "\n"


def markdown(res: dict) -> str:
    q, s = res["quality"], res["speed"]
    lines = [(f"### (a) Quality: {q['source']}, {q['train']} training / {q['held_out']} held-out vectors, "
              f"d = {q['d']}, {LATENTS} latents, k = {TOP_K}, batch {BATCH}, {q['epochs']} epochs, lr {q['lr']:.2g}, "
              "1 thread"), "",
             "| SAE | held-out FVU | L0 | dead share | train s |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {r['fvu']:.4f} | {r['l0']:.2f} | {r['dead_share']:.1%} | {r['seconds']:.1f} |"
              for name, r in q["rows"].items()]
    oc = s["seconds"].get("Overcomplete TopKSAE")
    lines += ["", (f"### (b) Throughput: d = {s['d']}, {s['latents']} latents, k = {s['top_k']}, batch {s['batch']}, "
                   f"one epoch of {s['vectors']:,} random vectors, {res['threads']} threads"), "",
              "| SAE | seconds / epoch | vectors / s | vs Overcomplete |", "|---|---|---|---|"]
    lines += [f"| {name} | {sec:.1f} | {s['vectors'] / sec:,.0f} | {'-' if oc is None else f'{oc / sec:.2f}x'} |"
              for name, sec in s["seconds"].items()]
    if oc is None:
        lines += ["", "Overcomplete is not installed: `pip install overcomplete \"matplotlib<3.9\"`."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="8 epochs and 16,384 vectors (< 1 min on an idle 2-core CPU)")
    p.add_argument("--epochs", type=int, help="quality part's epochs (default 60, --quick 8)")
    p.add_argument("--vectors", type=int, help="throughput part's vectors (default 262,144, --quick 16,384)")
    p.add_argument("--demo-out", help="a cached demo folder (featinv.demo.pair.load_demo_pair): its classifier's maps")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the throughput part ((a) uses 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_sae")
    g = p.add_argument_group("(c) scale: one epoch over memory-mapped shards")
    g.add_argument("--only-scale-shards", action="store_true", help="run (c) only (writes bench_sae_scale.*)")
    g.add_argument("--rows", type=int, default=810_000, help="vectors in all (d = 1024)")
    g.add_argument("--shard-rows", type=int, default=100_000, help="vectors per shard")
    g.add_argument("--shard-dir", default="bench_sae_shards", help="the shards' folder (reused when shapes match)")
    g.add_argument("--cold-cache", action="store_true", help="evict the shards from the page cache before the fit")
    p.add_argument("--scale-shards-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.scale_shards_worker:
        print(json.dumps(scale_worker(args)))
        return 0
    if args.only_scale_shards:
        if args.rows < 1 or args.shard_rows < 1:
            p.error("--rows and --shard-rows must be positive")
        res = bench_scale_shards(args)
        write_results(args.out, "bench_sae_scale", res, markdown_scale(res))
        return 0
    args.epochs = args.epochs or (8 if args.quick else 60)
    args.vectors = args.vectors or (16_384 if args.quick else 262_144)
    oc = overcomplete_or_none()
    torch.set_num_threads(1)  # (a)'s tensors are small: a second thread costs more in hand-offs than it gains
    quality = bench_quality(args, oc)
    torch.set_num_threads(args.threads)
    res = {"threads": args.threads, "overcomplete": oc is not None, "quality": quality, "speed": bench_speed(args, oc)}
    write_results(args.out, "bench_sae", res, markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
