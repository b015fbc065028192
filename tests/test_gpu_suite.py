"""benchmarks/gpu_suite.py keeps working between GPU loans: its --cpu-smoke run makes every figure on the
tiny config, a spent budget stops it cleanly, failures are recorded, and the batch search finds the limit."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "gpu_suite.py"


@pytest.fixture(scope="module")
def gpu_suite():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import gpu_suite
        yield gpu_suite
    finally:
        sys.path.remove(str(BENCHMARKS))


def run_suite(out: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=600, cwd=BENCHMARKS.parent)
    data = json.loads((out / "gpu_suite.json").read_text()) if (out / "gpu_suite.json").exists() else {}
    return proc, data


@pytest.mark.slow  # ~30 s on an idle 2-core CPU (two torch.compile captures), more on a shared one
def test_cpu_smoke_makes_every_figure(tmp_path):
    proc, data = run_suite(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "gpu_suite.md").read_text()
    assert data["card"] in md and f"torch {torch.__version__}" in md
    figures = data["figures"]
    train, recon = ("images_per_s", "mfu_pct", "peak_gib"), ("images_per_s", "time_10k_s", "peak_gib")
    expected = [f"train.{kind}.b2.{m}" for kind in ("eager", "compiled") for m in train]
    expected += ["train.reference.b2.images_per_s", "train.reference.b2.peak_gib", "train.max_batch.batch"]
    expected += [f"train.{kind}.max.{m}" for kind in ("eager", "compiled") for m in ("images_per_s", "mfu_pct")]
    expected += [f"recon.{kind}.b2.{m}" for kind in ("eager", "compiled") for m in recon]
    expected += ["goal.train_speedup", "goal.train_mfu", "goal.train_peak_gib", "goal.recon_10k_s"]
    expected += ["sae.topk.vectors_per_s", "sae.topk.peak_gib"]
    for key in expected:
        row = figures[key]
        assert row["status"] == "ok" and math.isfinite(row["value"]) and row["value"] > 0, (key, row)
        assert f"`{key}`" in md
    assert figures["train.max_batch.batch"]["value"] == 2  # the smoke plan's cap
    for kind in ("eager", "compiled"):  # the implied 10k time is the measured throughput's
        ips, t10k = (figures[f"recon.{kind}.b2.{m}"]["value"] for m in ("images_per_s", "time_10k_s"))
        assert t10k == pytest.approx(10_000 / ips)
    ref, best = figures["train.reference.b2.images_per_s"]["value"], max(
        figures[f"train.{k}.b2.images_per_s"]["value"] for k in ("eager", "compiled"))
    assert figures["goal.train_speedup"]["value"] == pytest.approx(best / ref)
    assert all(figures[k]["passed"] in (True, False) for k in expected if k.startswith("goal."))
    assert figures["demo.seconds"]["status"].startswith("skipped in --cpu-smoke")
    assert data["failed"] == [] and data["not_measured"] == []


def test_spent_budget_stops_cleanly_and_says_so(tmp_path):
    proc, data = run_suite(tmp_path, "--budget-s", "0")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "not measured" in proc.stderr and (tmp_path / "gpu_suite.md").is_file()
    assert data["failed"] == []
    assert "train.eager.b2.images_per_s" in data["not_measured"] and "recon.eager.b2.time_10k_s" in data["not_measured"]
    assert data["figures"]["train.eager.b2.images_per_s"]["value"] is None


def test_largest_batch_finds_the_limit(gpu_suite):
    tried, freed = [], []

    def try_batch(b: int, limit: int = 37) -> None:
        tried.append(b)
        if b > limit:
            raise torch.cuda.OutOfMemoryError(f"batch {b}")

    def free() -> None:
        freed.append(tried[-1])

    assert gpu_suite.largest_batch(try_batch, 8, 1024, free) == 37
    assert tried[:4] == [8, 16, 32, 64]  # doubling, then bisection between 32 and 64
    assert freed == tried  # memory is freed after every probe, the ones that ran out included
    assert gpu_suite.largest_batch(try_batch, 8, 20, free) == 20  # the cap binds
    with pytest.raises(RuntimeError, match="batch 40 does not fit"):
        gpu_suite.largest_batch(try_batch, 40, 1024, free)


def test_failures_and_overruns_become_rows(gpu_suite):
    suite = gpu_suite.Suite(budget_s=3.0, skip=["demo"])

    def broken():
        raise ValueError("shape (2, 3) at fault")

    suite.measure("a", "broken figure", ["seconds"], broken)
    assert suite.rows["a.seconds"].status == "failed: ValueError: shape (2, 3) at fault"
    suite.measure("nan", "no number", ["seconds"], lambda: {"seconds": math.nan})
    assert suite.rows["nan.seconds"].status.startswith("failed") and suite.rows["nan.seconds"].value is None
    suite.measure("demo", "skipped", ["seconds"], lambda: {"seconds": 1.0})
    assert suite.rows["demo.seconds"].status == "skipped: --skip"
    start = time.monotonic()
    suite.measure("slow", "overrun", ["seconds"], lambda: time.sleep(30) or {"seconds": 30.0})
    assert time.monotonic() - start < 8  # stopped by the budget's alarm, not after 30 s
    assert suite.rows["slow.seconds"].status.startswith("not measured: time budget")
