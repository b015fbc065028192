"""Concept bases: planted atoms recovered, encode/decode, removal, save/load, importance, refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from analysis_helpers import random_extractor
from scipy.optimize import linear_sum_assignment

from featinv.analysis.concept_edits import concept_direction, contribution, heat_map, remove, steer_concept
from featinv.analysis.concept_scores import completeness, concept_importance
from featinv.analysis.concepts import ConceptBasis, fit_concepts


def planted(k: int = 5, c: int = 24, n: int = 120, grid: int = 4, seed: int = 0):
    """Non-negative maps made of k sparse non-negative unit atoms with sparse codes, plus a little noise
    -> (feats (n, c, grid, grid), atoms (k, c))."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.rand(k, c, generator=g) * (torch.rand(k, c, generator=g) < 0.5)
    atoms = atoms / atoms.norm(dim=1, keepdim=True)
    codes = torch.rand(n, k, grid, grid, generator=g) * (torch.rand(n, k, grid, grid, generator=g) < 0.3)
    feats = torch.einsum("nkhw,kc->nchw", codes, atoms) + 0.01 * torch.rand(n, c, grid, grid, generator=g)
    return feats, atoms


def matched_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosines of the Hungarian matching of a's rows to b's rows (k,)."""
    cos = (a / a.norm(dim=1, keepdim=True)) @ (b / b.norm(dim=1, keepdim=True)).T
    rows, cols = linear_sum_assignment(-cos.numpy())
    return cos[rows, cols]


@pytest.fixture(scope="module")
def data():
    return planted()


@pytest.fixture(scope="module")
def nmf(data):
    return fit_concepts(data[0], 5, "nmf", seed=0, source="planted")


@pytest.mark.parametrize("method", ["nmf", "dict"])
def test_planted_atoms_are_recovered(data, nmf, method):
    feats, atoms = data
    basis = nmf if method == "nmf" else fit_concepts(feats, 5, "dict", seed=0, passes=20)
    assert basis.method == method and basis.atoms.shape == (5, 24)
    assert matched_cosine(atoms, basis.atoms).min() > 0.95


@pytest.mark.parametrize("method", ["nmf", "dict", "pca", "kmeans"])
def test_encode_decode_within_the_residual(data, nmf, method):
    feats = data[0]
    basis = nmf if method == "nmf" else fit_concepts(feats, 5, method, seed=0, passes=3)
    codes = basis.encode(feats)
    assert codes.shape == (120, 5, 4, 4)
    if method != "pca":
        assert (codes >= 0).all()
    if method == "kmeans":
        assert (codes.sum(dim=1) == 1).all()  # one-hot: each location is one centre
    rec = basis.decode(codes)
    assert rec.shape == feats.shape
    err = (rec - feats).square().sum() / (feats - feats.mean(dim=(0, 2, 3), keepdim=True)).square().sum()
    stats = completeness(basis, feats, codes=codes)
    assert stats["variance_explained"] == pytest.approx(1 - err.item(), abs=1e-5)
    # planted rank-5 structure: the factorisations hold nearly all of it, k-means (one atom per location) less
    assert stats["variance_explained"] > {"nmf": 0.97, "dict": 0.9, "pca": 0.97, "kmeans": 0.2}[method]


def test_default_method_follows_the_sign_and_fits_are_deterministic(data, nmf):
    feats = data[0]
    assert fit_concepts(feats, 5, seed=0).method == "nmf"
    again = fit_concepts(feats, 5, "nmf", seed=0, source="planted")
    assert torch.equal(again.atoms, nmf.atoms)
    assert fit_concepts(feats - 0.1, 3, seed=0, passes=1).method == "dict"


def test_streamed_batches_fit_the_same_concepts(data, nmf):
    feats, atoms = data
    seen = []
    batches = list(feats.split(7))  # odd-sized batches, re-iterable: several passes
    basis = fit_concepts(batches, 5, "nmf", seed=0, passes=60, batch_size=512,
                         progress=lambda done, total: seen.append((done, total)))
    assert matched_cosine(atoms, basis.atoms).min() > 0.95
    assert seen[-1] == (60 * 120 * 16, None) and basis.stats["vectors"] == 120 * 16
    with pytest.raises(ValueError, match="re-iterable"):
        fit_concepts(iter(batches), 5, "nmf", passes=2)


def test_removing_a_zero_code_concept_is_bit_identical(data, nmf):
    feats = data[0][:6]
    codes = nmf.encode(feats)
    codes[:, 2] = 0
    assert torch.equal(remove(feats, nmf, 2, codes), feats)
    codes[0, 2, 1, 1] = 1.0  # one location gets the concept: only its entries along the atom change
    out = remove(feats, nmf, 2, codes)
    changed = out != feats
    assert changed[0, :, 1, 1].any() and not changed[1:].any() and not changed[0, :, 0, 0].any()
    assert torch.allclose(out[0, :, 1, 1], feats[0, :, 1, 1] - nmf.atoms[2])
    kept = contribution(nmf, codes, [0, 1, 3, 4]) + contribution(nmf, codes, 2) + nmf.offset.view(1, -1, 1, 1)
    assert torch.allclose(kept, nmf.decode(codes), atol=1e-5)


def test_removal_lowers_the_concept_and_floor_keeps_relu_maps(data, nmf):
    feats = data[0][:6]
    out = remove(feats, nmf, [0, 1, 2, 3, 4], floor=0.0)
    assert (out >= 0).all() and out.square().sum() < 0.2 * feats.square().sum()


def test_save_and_load_encode_identically(data, nmf, tmp_path):
    feats = data[0][:10]
    path = nmf.save(tmp_path / "c.safetensors")
    loaded = ConceptBasis.load(path)
    assert loaded.method == "nmf" and loaded.source == "planted" and loaded.stats == nmf.stats
    assert torch.equal(loaded.atoms, nmf.atoms) and torch.equal(loaded.encode(feats), nmf.encode(feats))


def test_steer_heat_map_and_direction(data, nmf):
    feats = data[0][:3]
    d = concept_direction(nmf, 1)
    assert d.norm().item() == pytest.approx(1.0)
    out = steer_concept(feats, nmf, 1, [0.0, 1.0])
    assert out.shape == (3, 2, 24, 4, 4) and torch.equal(out[:, 0], feats)
    moved = ((out[:, 1] - feats) * d.view(1, -1, 1, 1)).sum(dim=1)
    assert (moved > 0).all()
    hm = heat_map(nmf.encode(feats), 1, 32)
    assert hm.shape == (3, 32, 32) and (hm >= 0).all()


def test_importance_matches_its_gradient_estimate_for_a_linear_head():
    """The demo classifier's head is linear in the pooled map, so removal and gradient x code agree."""
    ext = random_extractor()
    torch.manual_seed(0)
    with torch.no_grad():
        feats = ext(torch.rand(40, 3, 8, 8))
    basis = fit_concepts(feats, 4, "nmf", seed=0)
    labels = torch.arange(40) % 10
    imp = concept_importance(basis, ext, feats, labels)
    assert imp["removal"].shape == (4, 10) and imp["count"].tolist() == [4.0] * 10
    assert torch.allclose(imp["removal"], imp["gradient"], atol=1e-4)
    stats = completeness(basis, feats, ext)
    assert 0 <= stats["agreement"] <= 1 and stats["variance_explained"] <= 1


def test_bad_inputs_are_refused(data, nmf, tmp_path):
    feats = data[0]
    with pytest.raises(ValueError, match="k must be a positive"):
        fit_concepts(feats, 0)
    with pytest.raises(ValueError, match=r"k=2000 exceeds the 1920 feature-map locations"):
        fit_concepts(feats, 2000)
    with pytest.raises(ValueError, match="unknown concept method 'ica'.*nmf, dict, pca, kmeans"):
        fit_concepts(feats, 3, "ica")
    with pytest.raises(ValueError, match="NMF needs non-negative.*'dict'.*'pca'.*'kmeans'"):
        fit_concepts(feats - 0.5, 3, "nmf")
    with pytest.raises(ValueError, match="feature map has 7 channels but the concept basis was fitted on 24 "
                                         r"channels \(planted\)"):
        nmf.encode(torch.rand(1, 7, 2, 2))
    with pytest.raises(ValueError, match="concept index 5 out of range"):
        concept_direction(nmf, 5)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors' is not a concept basis file"):
        ConceptBasis.load(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="other.safetensors' is not a concept basis file"):
        ConceptBasis.load(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        ConceptBasis.load(tmp_path / "missing.safetensors")


# ----- featinv concepts, and concept:<basis>:<i> in featinv steer, on the quick demo pair ---------------

FAST_ARGS = ["--steps", "2", "--exemplars", "1", "--removals", "1", "--device", "cpu"]


def test_concepts_command_writes_the_atlas_and_its_basis_steers(quick_demo_out, tmp_path, capsys):

    from PIL import Image

    from featinv import cli

    demo = ["--demo-out", str(quick_demo_out)]
    out = tmp_path / "concepts"
    assert cli.main(["concepts", *demo, "-k", "3", "--method", "nmf", *FAST_ARGS, "--out", str(out)]) == 0
    image = Image.open(out / "concepts.png")
    assert image.width > 5 * 64 and image.height > 4 * 64  # a title, the plain row and 3 concept rows
    table = json.loads((out / "table.json").read_text())
    assert table["k"] == 3 and table["method"] == "nmf" and len(table["rows"]) == 3
    assert len(table["importance_removal"]) == 3 and len(table["importance_removal"][0]) == 10
    assert 0 <= table["completeness"]["agreement"] <= 1
    assert (out / "table.md").read_text().count("\n|") >= 4
    basis = ConceptBasis.load(out / "concepts.safetensors")
    assert basis.k == 3 and basis.channels == 64
    from featinv.analysis.common import features_of
    from featinv.analysis.concept_edits import code_levels
    from featinv.demo.pair import load_demo_pair

    pair = load_demo_pair(quick_demo_out)   # each drawn row's code edit: its q0.99 level on the fit digits' codes
    levels = code_levels(basis, basis.encode(features_of(pair.extractor, pair.data["x_train"].expand(-1, 3, -1, -1))),
                         0.99)
    for row in table["rows"]:
        assert row["set_level"] == pytest.approx(float(levels[row["concept"]]), rel=1e-5) and len(row["set_rec"]) == 2
    again = tmp_path / "again"
    assert cli.main(["concepts", *demo, "--basis", str(out / "concepts.safetensors"), *FAST_ARGS,
                     "--out", str(again)]) == 0
    assert json.loads((again / "table.json").read_text())["rows"] == table["rows"]  # same basis, same atlas
    steer_out = tmp_path / "steer"
    assert cli.main(["steer", *demo, "--direction", f"concept:{out / 'concepts.safetensors'}:1", "--alphas", "0,1",
                     "--clamp", "none", "--steps", "2", "--out", str(steer_out)]) == 0
    rows = json.loads((steer_out / "table.json").read_text())["rows"]
    assert rows[1]["shift_features"] == pytest.approx(1.0, abs=1e-4)  # moved one feature norm along the atom


@pytest.mark.parametrize("extra, message", [
    (["-k", "0"], "argument -k: must be >= 1, got 0"),
    (["-k", "200", "--method", "pca"], "-k: k=200 exceeds the 64 channels"),  # the bound per method, up front
    (["-k", "6000", "--method", "kmeans"], "-k: k=6000 exceeds the 5748"),
    (["--method", "ica"], "argument --method: invalid choice: 'ica'"),
    (["--basis", "JUNK"], "is not a concept basis file"),
    (["--basis", "MISSING"], "argument --basis: "),
    (["--basis", "JUNK", "-k", "3"], "--basis: give either a basis file or -k/--method"),
])
def test_concepts_bad_input_is_one_line(quick_demo_out, tmp_path, capsys, extra, message):
    from featinv import cli

    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    extra = [e.replace("JUNK", str(tmp_path / "junk.safetensors")).replace("MISSING", str(tmp_path / "no.st"))
             for e in extra]
    assert cli.main(["concepts", "--demo-out", str(quick_demo_out), *extra, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("featinv concepts: error: ") and message in err[-1], err
    assert not (tmp_path / "out").exists()
    assert cli.main(["steer", "--demo-out", str(quick_demo_out), "--direction",
                     f"concept:{tmp_path / 'junk.safetensors'}:0", "--out", str(tmp_path / "out")]) == 2
    assert "featinv steer: error: --direction: " in capsys.readouterr().err


def test_concepts_imports_an_overcomplete_sae(quick_demo_out, tmp_path, capsys):
    """`--import-sae`: a user's Overcomplete SAE (random here; parity is tests/test_concept_methods.py) becomes a
    basis file with its atlas, which `--basis` and `steer --direction concept:` then read."""
    sae_module = pytest.importorskip("overcomplete.sae", reason="overcomplete needs Python < 3.13 and matplotlib < 3.9")
    from featinv import cli

    torch.manual_seed(0)
    torch.save(sae_module.TopKSAE(64, 48, top_k=4).state_dict(), tmp_path / "sae.pt")
    demo = ["--demo-out", str(quick_demo_out)]
    out = tmp_path / "atlas"
    assert cli.main(["concepts", *demo, "--import-sae", str(tmp_path / "sae.pt"), "--top-k", "4", "--draw", "2",
                     *FAST_ARGS, "--out", str(out)]) == 0
    table = json.loads((out / "table.json").read_text())
    assert table["method"] == "topk" and table["k"] == 48 and len(table["rows"]) == 48
    assert sum(r["drawn"] for r in table["rows"]) == 2 and table["completeness"]["l0"] <= 4
    basis = ConceptBasis.load(out / "concepts.safetensors")
    assert basis.params == {"top_k": 4} and basis.stats["held_out"]["l0"] == table["completeness"]["l0"]
    assert cli.main(["concepts", *demo, "--import-sae", str(tmp_path / "sae.pt"), "--out", str(tmp_path / "x")]) == 2
    assert "--import-sae: give the SAE's --top-k" in capsys.readouterr().err


def test_concepts_fit_on_shards_and_import_a_jumprelu_sae(quick_demo_out, tmp_path, capsys):
    """`--fit-shards DIR`: a basis fitted on vectors streamed from disk, its atlas over the images; shards of
    another channel count or a truncated shard are one-line errors before anything is written. `--sae-type
    jumprelu` imports a JumpReLU SAE (no --top-k: its thresholds are in the state dict)."""
    from featinv import cli
    from featinv.analysis.common import features_of
    from featinv.analysis.shards import write_shards
    from featinv.demo.pair import load_demo_pair

    demo = ["--demo-out", str(quick_demo_out)]
    pair = load_demo_pair(quick_demo_out)
    maps = features_of(pair.extractor, pair.data["x_train"][:200].expand(-1, 3, -1, -1))
    write_shards(maps.split(64), tmp_path / "shards", shard_rows=1000)
    out = tmp_path / "fit"
    assert cli.main(["concepts", *demo, "--fit-shards", str(tmp_path / "shards"), "--method", "topk", "-k", "24",
                     "--top-k", "3", "--passes", "2", "--draw", "1", *FAST_ARGS, "--out", str(out)]) == 0
    stats = ConceptBasis.load(out / "concepts.safetensors").stats
    assert stats["vectors"] == maps.shape[0] * maps.shape[2] * maps.shape[3] and stats["passes"] == 2
    assert stats["shards"] == len(list((tmp_path / "shards").glob("*.npy")))
    write_shards([torch.zeros(10, 5)], tmp_path / "narrow")
    (tmp_path / "cut").mkdir()
    np.save(tmp_path / "cut" / "a.npy", np.zeros((20, 64), np.float32))
    (tmp_path / "cut" / "a.npy").write_bytes((tmp_path / "cut" / "a.npy").read_bytes()[:-40])
    capsys.readouterr()
    for folder, message in [("narrow", "--fit-shards: " + str(tmp_path / "narrow") + " holds vectors of 5 channels"),
                            ("cut", "--fit-shards: shard " + str(tmp_path / "cut" / "a.npy") + ": truncated")]:
        assert cli.main(["concepts", *demo, "--fit-shards", str(tmp_path / folder), "--method", "topk",
                         "--out", str(tmp_path / "no")]) == 2
        err = capsys.readouterr().err.strip().splitlines()   # (after the pair's stage notes, for the first)
        assert message in err[-1] and sum("error" in line for line in err) == 1, err
        assert not (tmp_path / "no").exists()
    sae_module = pytest.importorskip("overcomplete.sae", reason="overcomplete needs Python < 3.13 and matplotlib < 3.9")
    torch.manual_seed(0)
    torch.save(sae_module.JumpSAE(64, 40).state_dict(), tmp_path / "jump.pt")
    assert cli.main(["concepts", *demo, "--import-sae", str(tmp_path / "jump.pt"), "--sae-type", "jumprelu",
                     "--draw", "1", *FAST_ARGS, "--out", str(tmp_path / "jump")]) == 0
    basis = ConceptBasis.load(tmp_path / "jump" / "concepts.safetensors")
    assert basis.method == "jumprelu" and basis.k == 40 and basis.encoder["threshold"].shape == (40,)
