"""Evaluation metrics against hand-computed values, the FID-unavailable path, and the folder report."""
from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
import torchmetrics.image.fid
from analysis_helpers import random_extractor
from PIL import Image

from featinv.checkpoint.config_file import to_dict
from featinv.commands.evaluate import main
from featinv.config import PRESETS
from featinv.jobs.evaluate import evaluate_folder, read_layout
from featinv.metrics import (
    backbone_outputs,
    compare_outputs,
    cosine_similarity_pooled,
    cosine_similarity_spatial,
    frechet_distance,
    gaussian_stats,
    make_fid,
    read_back,
    to_backbone,
    topk_correct,
)
from featinv.nets.backbone import build_backbone


def test_cosine_similarities_hand_computed():
    # one image, C=2, h=1, w=2. Positions of f1: (1,0), (1,0); of f2: (1,0), (0,1).
    f1 = torch.tensor([[[[1.0, 1.0]], [[0.0, 0.0]]]])
    f2 = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    # pooled: (1, 0) vs (0.5, 0.5) -> 1/sqrt(2); spatial: mean(cos 0, cos 90 deg) = 0.5
    assert cosine_similarity_pooled(f1, f2).item() == pytest.approx(1 / math.sqrt(2))
    assert cosine_similarity_spatial(f1, f2).item() == pytest.approx(0.5)
    both = cosine_similarity_spatial(torch.cat([f1, f2]), torch.cat([f2, f2]))
    assert both.tolist() == pytest.approx([0.5, 1.0])  # per image


def test_topk_and_agreement_hand_computed():
    logits = torch.tensor([[0.0, 1, 2, 3, 4, 5],    # ranking 5,4,3,2,1,0
                           [5.0, 4, 3, 2, 1, 0],    # ranking 0,1,2,3,4,5
                           [0.0, 9, 1, .5, .4, .3]])  # ranking 1,2,3,4,5,0
    labels = torch.tensor([5, 5, 2])
    # row 0: top-1 hit; row 1: label 5 is ranked last -> top-5 miss; row 2: label 2 second -> top-5 hit
    hits = topk_correct(logits, labels, ks=(1, 5))
    assert hits[1].tolist() == [True, False, False] and hits[5].tolist() == [True, False, True]
    other = torch.tensor([[0.0, 0, 0, 0, 0, 1], [0.0, 1, 0, 0, 0, 0], [0.0, 1, 0, 0, 0, 0]])
    feats = torch.rand(3, 4, 2, 2)
    m = compare_outputs(feats, logits, feats, other)
    assert m["agree"].tolist() == [True, False, True] and m["pred_reconstruction"].tolist() == [5, 1, 1]
    assert m["cos_pooled"] == pytest.approx(torch.ones(3)) and m["cos_spatial"] == pytest.approx(torch.ones(3))


def test_frechet_distance_diagonal_hand_computed():
    mu1, mu2 = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 2.0])
    s1, s2 = torch.diag(torch.tensor([1.0, 4.0])), torch.diag(torch.tensor([4.0, 9.0]))
    # |mu1-mu2|^2 = 5; tr = 5 + 13; 2 tr sqrt(s1 s2) = 2 (2 + 6) = 16  ->  7
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(7.0)
    assert frechet_distance(mu2, s2, mu2, s2) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(mu1, s1, mu2, torch.eye(3))


def test_frechet_distance_matches_scipy_sqrtm_for_full_covariances():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 6)), rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 0.5
    mu1, s1 = gaussian_stats(torch.from_numpy(a))
    mu2, s2 = gaussian_stats(torch.from_numpy(b))
    np.testing.assert_allclose(s1.numpy(), np.cov(a, rowvar=False), rtol=1e-12)
    covmean = scipy.linalg.sqrtm(s1.numpy() @ s2.numpy()).real
    expected = ((mu1 - mu2) ** 2).sum().item() + np.trace(s1.numpy() + s2.numpy() - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_to_backbone_is_every_sites_resize():
    """One resize for evaluation, the analyses, the app and feature guidance: bilinear, antialiased; the
    sites' former calls (with or without align_corners=False, which is bilinear's default) are the same."""
    x = torch.rand(2, 3, 3, 12, 12) * 1.2 - 0.1                             # a little outside [0, 1]
    flat = x.flatten(0, 1)
    plain = F.interpolate(flat, size=(8, 8), mode="bilinear", antialias=True)
    assert torch.equal(to_backbone(x, 8), plain)
    assert torch.equal(to_backbone(x, 8), F.interpolate(flat, size=(8, 8), mode="bilinear", antialias=True,
                                                         align_corners=False))
    assert torch.equal(to_backbone(x, 8, clamp=True), plain.clamp(0, 1))
    assert torch.equal(to_backbone(x, 12, clamp=True), flat)                # at the backbone's size: untouched
    g = x.clone().requires_grad_(True)
    to_backbone(g, 8).sum().backward()                                      # guidance differentiates through it
    assert g.grad.abs().sum() > 0


def test_read_back_keeps_leading_dims_and_chunks():
    ext = random_extractor()
    samples = torch.rand(2, 5, 3, 12, 12)
    feats, logits = read_back(ext, samples, chunk=3)
    assert feats.shape == (2, 5, *ext.feature_shape) and logits.shape == (2, 5, 10)
    whole_f, whole_l = read_back(ext, samples, chunk=None)
    assert torch.allclose(feats, whole_f, atol=1e-5) and torch.allclose(logits, whole_l, atol=1e-5)
    x = to_backbone(samples, 8)
    with torch.no_grad():
        assert torch.equal(whole_f.flatten(0, 1), ext(x).float())
        assert torch.equal(whole_l.flatten(0, 1), ext.classify(x))
    f_cpu, l_cpu = backbone_outputs(ext, samples[0])
    assert torch.equal(f_cpu, whole_f[0]) and torch.equal(l_cpu, whole_l[0])


def _no_fidelity(*args, **kwargs):
    raise ModuleNotFoundError("FrechetInceptionDistance metric requires that `Torch-fidelity` is installed.")


def test_fid_unavailable_is_reported_not_faked(monkeypatch):
    monkeypatch.setattr(torchmetrics.image.fid, "FrechetInceptionDistance", _no_fidelity)
    metric, note = make_fid("cpu")
    assert metric is None
    assert "FID unavailable" in note and "torch-fidelity" in note and "Torch-fidelity` is installed" in note


@pytest.fixture()
def recon_folder(tmp_path):
    """A reconstruct-style folder: 3 classes x 2 images x K=2; reconstruction 0 is an exact copy."""
    rng = np.random.default_rng(0)
    out = tmp_path / "out"
    classes = ["n01", "n02", "n03"]
    for c in classes:
        (out / c).mkdir(parents=True)
        for stem in ("img_a", "img_b"):
            original = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(original).save(out / c / f"{stem}.png")
            shutil.copy(out / c / f"{stem}.png", out / c / f"reconstructed_{stem}_0.png")
            noisy = np.clip(original.astype(int) + rng.integers(-40, 40, original.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(out / c / f"reconstructed_{stem}_1.png")
    manifest = {"classes": ["n00"] + classes, "backbone": to_dict(PRESETS["tiny"].backbone)}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_read_layout_labels_follow_manifest_class_order(recon_folder):
    records, classes = read_layout(recon_folder)
    assert classes[0] == "n00" and [r.label for r in records] == [1, 1, 2, 2, 3, 3]
    assert [p.name for p in records[0].reconstructions] == ["reconstructed_img_a_0.png", "reconstructed_img_a_1.png"]


def test_evaluate_folder_writes_report(recon_folder, monkeypatch):
    monkeypatch.setattr(torchmetrics.image.fid, "FrechetInceptionDistance", _no_fidelity)
    torch.manual_seed(0)
    backbone = build_backbone(PRESETS["tiny"].backbone)
    summary = evaluate_folder(recon_folder, backbone, batch_size=4, fid=True, device="cpu")
    ev = recon_folder / "eval"
    rows = list(csv.DictReader((ev / "per_image.csv").open()))
    assert len(rows) == 12 and summary["images"] == 6 and summary["reconstructions"] == 12
    copies = [r for r in rows if r["k"] == "0"]  # identical images: cosine 1, same prediction
    assert all(float(r["cos_pooled"]) == pytest.approx(1, abs=1e-5) and r["agree"] == "1" for r in copies)
    assert all(float(r["cos_spatial"]) < 1 for r in rows if r["k"] == "1")
    assert summary["fid"] is None and "torch-fidelity" in summary["fid_note"]
    assert json.loads((ev / "summary.json").read_text())["cos_pooled"] == pytest.approx(summary["cos_pooled"])
    md = (ev / "summary.md").read_text()
    assert "| metric | value |" in md and "| FID (torchmetrics, Inception-v3) | n/a |" in md
    with Image.open(ev / "contact_sheet.png") as sheet:
        assert sheet.size == (64 * 4, 64 * 3)  # original | 2 reconstructions | heat map; 3 classes
    assert not list(ev.glob(".*.tmp"))


def test_evaluate_main_uses_manifest_backbone(recon_folder, capsys):
    assert main(["--out", str(recon_folder), "--no-fid", "--batch-size", "6", "--device", "cpu"]) == 0
    summary = json.loads((recon_folder / "eval" / "summary.json").read_text())
    assert summary["fid"] is None and summary["fid_note"] == "FID not requested (--no-fid)"
    captured = capsys.readouterr()
    assert "resnet18" in captured.err and "| metric | value |" in captured.out and "{" not in captured.out
    assert main(["--out", str(recon_folder / "missing")]) == 2
    assert capsys.readouterr().err.startswith("featinv evaluate: error: --out: reconstruct folder")
