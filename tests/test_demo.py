"""Acceptance test of ``featinv demo --quick``: FeatInv inverts a digits classifier's feature map for real."""
from __future__ import annotations

import json
import time

import pytest

from featinv import demo


@pytest.mark.slow
def test_quick_demo_inverts_features_and_caches(tmp_path, capsys):
    out = tmp_path / "demo"
    t0 = time.time()
    assert demo.main(["--quick", "--out", str(out), "--seed", "0"]) == 0
    first_seconds = time.time() - t0
    results = json.loads((out / "results.json").read_text())
    fi, un = results["featinv"], results["unconditional"]
    # The classifier's label on the reconstruction matches its label on the held-out original.
    assert fi["label_agreement"] >= 0.60, results
    assert fi["label_agreement"] >= 2 * un["label_agreement"], results
    assert fi["feature_cosine_spatial"] > un["feature_cosine_spatial"], results
    for name in ("demo.png", "results.md", "results.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    printed = capsys.readouterr().out
    assert "label agreement" in printed and str(out / "demo.png") in printed

    # Second run: every artefact comes from the cache -- fast, and the same numbers.
    t0 = time.time()
    assert demo.main(["--quick", "--out", str(out), "--seed", "0"]) == 0
    second_seconds = time.time() - t0
    again = json.loads((out / "results.json").read_text())
    assert again["featinv"] == fi and again["unconditional"] == un
    assert second_seconds < 20 and second_seconds < first_seconds / 3, (first_seconds, second_seconds)
    assert "cached" in capsys.readouterr().out
