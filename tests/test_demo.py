"""Acceptance test of ``featinv demo --quick``: FeatInv inverts a digits classifier's feature map for real."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from featinv.commands.demo import main as demo_main
from featinv.demo import stages as demo


@pytest.fixture
def restore_torch_threads():
    threads = torch.get_num_threads()  # featinv demo sets the thread count (1 on a 2-core machine)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_quick_demo_inverts_features_and_caches(quick_demo_out, capsys, restore_torch_threads):
    # The session's quick pair was trained by the fixture through load_demo_pair, the demo's own stages;
    # the command adds reconstruction, metrics and the report (and would train, were the cache empty).
    out = quick_demo_out
    assert demo_main(["--quick", "--out", str(out), "--seed", "0"]) == 0
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

    # Second run: every stage comes from the cache (nothing is trained or written again), same numbers.
    cache = out / "cache"
    artefacts = {p: p.stat().st_mtime_ns for p in cache.rglob("*.safetensors")}
    assert len(artefacts) >= 5, sorted(artefacts)  # classifier, miniSD, FeatInv init and trained, reconstructions
    assert demo_main(["--quick", "--out", str(out), "--seed", "0"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["featinv"] == fi and again["unconditional"] == un
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.safetensors")} == artefacts
    printed = capsys.readouterr().err  # progress, not results
    assert printed.count("cached") == 4, printed  # classifier, VAE+UNet, control branch, reconstructions


def test_cache_folder_follows_settings_and_seed(tmp_path):
    a = demo.cache_dir(tmp_path, demo.QUICK, 0, "quick")
    assert a == demo.cache_dir(tmp_path, demo.DemoSettings(**vars(demo.QUICK)), 0, "quick")  # same settings
    assert a.parent == tmp_path / "cache" and a.name.startswith("quick-seed0-")
    others = {demo.cache_dir(tmp_path, demo.QUICK, 1, "quick"), demo.cache_dir(tmp_path, demo.DEFAULT, 0, "quick"),
              demo.cache_dir(tmp_path, dataclasses.replace(demo.QUICK, guidance=4.0), 0, "quick")}
    assert a not in others and len(others) == 3
