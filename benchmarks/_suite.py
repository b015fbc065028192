"""The figure recorder of benchmarks/gpu_suite.py: a time budget, one row per figure, JSON and Markdown out.

Every figure becomes a row whatever happens: a value, "failed: <error>", "not measured: time budget" or
"skipped: <why>"; nothing is left out silently.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from featinv.io import atomic_write_text

METRICS = {"images_per_s": ("throughput", "images/s"), "mfu_pct": ("MFU", "%"), "peak_gib": ("peak memory", "GiB"),
           "time_10k_s": ("implied time for 10,000 images", "s"), "batch": ("largest batch that fits", "images"),
           "seconds": ("wall time", "s"), "label_agreement_pct": ("label agreement", "%")}


@dataclass
class Row:
    """One figure: value in ``unit`` when status is "ok", else None and the status says why."""

    key: str
    what: str
    unit: str
    value: float | None = None
    status: str = "ok"
    goal: str = ""
    passed: bool | None = None
    note: str = ""


class BudgetExceeded(BaseException):
    """The time budget ran out (a BaseException, so that no ``except Exception`` in the code under test eats it)."""


@contextlib.contextmanager
def alarm(seconds: float):
    """Raise BudgetExceeded in the main thread after ``seconds`` (between two Python bytecodes)."""
    def handler(signum, frame):
        raise BudgetExceeded(f"stopped after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def cleanup() -> None:
    """Free what a figure left behind (graphs, optimizer state, cached CUDA blocks)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Suite:
    """Runs figures under one time budget and records one Row per metric, whatever happens."""

    def __init__(self, budget_s: float, skip: list[str]):
        self.start, self.budget_s, self.skip = time.monotonic(), budget_s, skip
        self.rows: dict[str, Row] = {}

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def measure(self, group: str, what: str, metrics: list[str], fn: Callable[[], dict], need_s: float = 0.0,
                skip_reason: str = "") -> dict | None:
        """fn() -> {metric: value}; rows ``group.metric``. need_s: don't start with less time left."""
        values, note, status = None, "", "ok"
        if skip_reason or any(group == s or group.startswith(s + ".") for s in self.skip):
            status = skip_reason or "skipped: --skip"
        elif self.left() < max(need_s, 1.0):
            status = f"not measured: time budget ({max(self.left(), 0):.0f} s left, needs ~{need_s:.0f} s)"
        else:
            print(f"[{time.monotonic() - self.start:5.0f} s] {group}: {what}", file=sys.stderr, flush=True)
            try:
                with alarm(self.left()):
                    values = fn()
                note = values.pop("note", "")
            except BudgetExceeded as e:
                status = f"not measured: time budget ({e})"
            except Exception as e:  # any failure becomes a recorded row, never a silent gap
                traceback.print_exc()
                first_line = (str(e).strip().splitlines() or [""])[0][:300]
                status = f"failed: {type(e).__name__}: {first_line}"
            cleanup()
        for m in metrics:
            label, unit = METRICS[m]
            v = None if values is None else values.get(m)
            st = status if values is not None or status != "ok" else "failed: no value"
            if values is not None and (v is None or not math.isfinite(v)):
                st = f"failed: {m} is {v}"
            self.rows[f"{group}.{m}"] = Row(f"{group}.{m}", f"{what}: {label}", unit, v if st == "ok" else None, st,
                                            note=note)
        return values

    def value(self, key: str) -> float | None:
        row = self.rows.get(key)
        return row.value if row is not None and row.status == "ok" else None


def fits(try_batch: Callable[[int], None], batch: int, free: Callable[[], None] = cleanup) -> bool:
    """True unless ``try_batch(batch)`` runs out of CUDA memory; ``free()`` what it left either way."""
    ok = True
    try:
        try_batch(batch)
    except torch.cuda.OutOfMemoryError:
        ok = False  # the traceback (and the tensors its frames hold) is dropped when this block ends
    free()
    return ok


def largest_batch(try_batch: Callable[[int], None], start: int, cap: int, free: Callable[[], None] = cleanup) -> int:
    """The largest batch in [start, cap] for which ``try_batch`` does not raise OutOfMemoryError:
    doubling from ``start``, then bisection between the last batch that fit and the first that did not."""
    if not fits(try_batch, start, free):
        raise RuntimeError(f"batch {start} does not fit")
    good, bad = start, None
    while bad is None and good < cap:
        b = min(2 * good, cap)
        if fits(try_batch, b, free):
            good = b
        else:
            bad = b
    while bad is not None and bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(try_batch, mid, free) else (good, mid)
    return good


def goal_row(suite: Suite, key: str, what: str, unit: str, value: float | None, goal: str, ok: Callable[[float], bool],
             needs: str, note: str = "") -> None:
    """A derived row compared against a goal; "not measured" when its inputs were not made."""
    status = "ok" if value is not None and math.isfinite(value) else f"not measured: needs {needs}"
    suite.rows[key] = Row(key, what, unit, value if status == "ok" else None, status, goal,
                          ok(value) if status == "ok" else None, note)


def fmt(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"


def markdown(meta: dict, rows: list[Row]) -> str:
    lines = [f"## GPU suite on {meta['card']}", "",
             f"torch {meta['torch']}, CUDA {meta['cuda']}, mode `{meta['mode']}`, config `{meta['preset']}` "
             f"with random weights, {meta['date']}; wall time {meta['wall_s']:.0f} s of a {meta['budget_s']:.0f} s "
             f"budget; MFU relative to {fmt(meta['peak_tflops'])} TFLOP/s ({meta['peak_source']}), FLOPs counted by "
             "FlopCounterMode (matmul/conv/attention).", "",
             "| figure | value | unit | goal | pass | status | notes | key |", "|---|---:|---|---|---|---|---|---|"]
    for r in rows:
        passed = "" if r.passed is None else ("PASS" if r.passed else "FAIL")
        lines.append(f"| {r.what} | {fmt(r.value)} | {r.unit} | {r.goal} | {passed} | {r.status} | {r.note} "
                     f"| `{r.key}` |")
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, meta: dict, suite: Suite) -> None:
    """gpu_suite.json and gpu_suite.md, each written atomically."""
    rows = list(suite.rows.values())
    data = {**meta, "figures": {r.key: dataclasses.asdict(r) for r in rows},
            "failed": [r.key for r in rows if r.status.startswith("failed")],
            "not_measured": [r.key for r in rows if r.status.startswith("not measured")]}
    atomic_write_text(json.dumps(data, indent=2, allow_nan=False), out / "gpu_suite.json")
    atomic_write_text(markdown(meta, rows), out / "gpu_suite.md")
