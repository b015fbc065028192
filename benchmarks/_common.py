"""Helpers shared by the benchmark scripts: timing, peak memory, FLOP counts, random-weight models.

Not part of the library: benchmarks only measure, and every script imports these from its own folder
(``python benchmarks/<script>.py`` puts this folder on ``sys.path``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from featinv.config import BackboneConfig
from featinv.nets.backbone import FeatureExtractor, build_backbone

GIB = 2 ** 30


def sync(device: torch.device | str) -> None:
    """Wait for queued CUDA work, so that a wall-clock time covers it (no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable, device: torch.device | str):
    """(fn(), seconds) with the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def mean_seconds(fn: Callable, repeats: int, device: torch.device | str, warmup: int = 1,
                 max_s: float | None = None) -> float:
    """Mean seconds per ``fn()`` call after ``warmup`` untimed calls; stops early (after at least one
    timed call) once ``max_s`` seconds have been spent timing."""
    for _ in range(warmup):
        fn()
    sync(device)
    start, n = time.perf_counter(), 0
    while n < repeats:
        fn()
        n += 1
        if max_s is not None and time.perf_counter() - start > max_s:
            break
    sync(device)
    return (time.perf_counter() - start) / n


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field (VmRSS, VmHWM) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(f"/proc/self/status has no field {field}")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not permitted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def status_kibs(*fields: str) -> dict[str, int]:
    """Several ``/proc/self/status`` fields (RssAnon, RssFile, ...) in KiB, from one read."""
    found = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in fields:
            found[name] = int(rest.split()[0])
    missing = [f for f in fields if f not in found]
    if missing:
        raise KeyError(f"/proc/self/status has no field {', '.join(missing)}")
    return found


class RssPeaks:
    """Peaks of ``/proc/self/status`` fields (KiB; default RssAnon, the process's private memory, and RssFile, its
    file-backed pages such as a memory-mapped file's, which have no VmHWM of their own), read by ``sample()`` (e.g.
    after every training step) and every ``every_s`` seconds by a thread while in a ``with`` block: sampled peaks
    (a spike shorter than the interval can fall between two reads)."""

    def __init__(self, fields: tuple[str, ...] = ("RssAnon", "RssFile"), every_s: float = 0.01):
        self.fields, self.every_s, self.reads = fields, every_s, 0
        self.peak = status_kibs(*fields)
        self.stop, self.lock = threading.Event(), threading.Lock()

    def sample(self, *_) -> None:
        now = status_kibs(*self.fields)
        with self.lock:
            self.peak = {f: max(self.peak[f], now[f]) for f in self.fields}
            self.reads += 1

    def _run(self) -> None:
        while not self.stop.wait(self.every_s):
            self.sample()

    def __enter__(self) -> RssPeaks:
        self.stop.clear()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.sample()


def evict_page_cache(paths) -> bool:
    """Drop the files' pages from the OS page cache (fsync, then posix_fadvise DONTNEED; best effort: pages that
    some process maps stay); False where posix_fadvise is missing."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def peak_rss_gib() -> float:
    """The process's peak resident set size (VmHWM) in GiB."""
    return status_kib("VmHWM") / 2 ** 20


def count_flops(fn: Callable) -> int:
    """FLOPs of one ``fn()`` call, counted by ``torch.utils.flop_counter.FlopCounterMode``.

    Counts what PyTorch has FLOP formulas for: matmuls, convolutions and attention (SDPA), forward
    and backward (a multiply-add is 2 FLOPs); elementwise ops, norms and optimizer updates count 0.
    Attention is counted for the CUDA SDPA kernels (flash, memory-efficient, cuDNN), not for the CPU
    flash kernel (torch 2.14), so a CPU count leaves attention out. Run ``fn`` eagerly: kernels of a
    compiled graph bypass the counter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def random_backbone(cfg: BackboneConfig) -> FeatureExtractor:
    """The backbone of ``cfg`` with random weights (no download): throughput only."""
    return build_backbone(dataclasses.replace(cfg, pretrained=False, checkpoint=""))


def write_results(out: str | Path, name: str, results: dict, md: str) -> Path:
    """Print the Markdown table and write ``<out>/<name>.md`` and ``<out>/<name>.json``; returns ``out``."""
    print(md)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(md)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))
    return out
