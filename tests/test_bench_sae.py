"""benchmarks/bench_sae.py's scale part: its shard writer reuses, rewrites and cleans up shards, and the shards it
writes are what featinv's shard reader streams (the one-epoch run itself is a benchmark, not a test)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench_sae():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_sae
        yield bench_sae
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_write_shards_reuses_rewrites_and_cleans_up(bench_sae, tmp_path):
    info = bench_sae.write_shards(tmp_path, 25, 10, 8, seed=0)
    assert (info["shards"], info["written"], info["reused"], info["bytes"]) == (3, 3, 0, 25 * 8 * 4)
    shards = sorted(tmp_path.glob("*.npy"))
    assert [np.load(p).shape for p in shards] == [(10, 8), (10, 8), (5, 8)]
    data = np.concatenate([np.load(p) for p in shards])
    assert data.dtype == np.float32 and data.min() >= 0 and data.max() < 1
    assert bench_sae.write_shards(tmp_path, 25, 10, 8, seed=0)["reused"] == 3   # a rerun writes nothing
    with open(shards[0], "r+b") as f:                                           # truncated: rewritten
        f.truncate(100)
    assert bench_sae.write_shards(tmp_path, 25, 10, 8, seed=0)["written"] == 1
    info = bench_sae.write_shards(tmp_path, 15, 10, 8, seed=0)                  # other sizes: shard 2 goes
    assert (info["shards"], info["written"], info["reused"]) == (2, 1, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scale_shard_00000.npy", "scale_shard_00001.npy"]
    batches, facts = bench_sae.shard_batches(tmp_path, 4)
    assert (facts["vectors"], facts["d"]) == (15, 8) and sum(len(b) for b in batches(0)) == 15
    np.save(tmp_path / "other.npy", np.zeros((2, 8), np.float32))
    with pytest.raises(SystemExit, match="other.npy"):
        bench_sae.write_shards(tmp_path, 15, 10, 8, seed=0)


def test_rss_peaks_sample_the_status_fields():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from _common import RssPeaks, status_kibs
    finally:
        sys.path.remove(str(BENCHMARKS))
    before = status_kibs("RssAnon", "RssFile")
    with RssPeaks(every_s=0.001) as peaks:
        block = b"x" * 64 * 2 ** 20                    # 64 MiB touched: private memory
        peaks.sample()
    assert len(block) and peaks.reads >= 2
    assert peaks.peak["RssAnon"] >= before["RssAnon"] + 60 * 2 ** 10 and peaks.peak["RssFile"] > 0
