"""featinv steer --edit: the spec syntax (torch-free, shared with --direction), and set / swap end to end, where the
maps the report reconstructs are the library's set_code / swap (plus the clamp) of the benchmark's definition."""
from __future__ import annotations

import json

import pytest
import torch
from analysis_helpers import FAST, random_extractor, random_reconstructor, tiny_checkpoint

from featinv import cli
from featinv.analysis import reports
from featinv.analysis.common import demo_digits, features_of, load_images
from featinv.analysis.concept_edits import class_levels, code_levels, set_code, swap, top_concepts
from featinv.analysis.concepts import ConceptBasis
from featinv.analysis.specs import Level, parse_levels, split_spec
from featinv.analysis.steering import box_mask, feature_range
from featinv.config import EDIT_DEFAULTS
from featinv.pair import Pair
from featinv.registry import DIRECTIONS, EDITS


def pca_basis(feats: torch.Tensor, k: int, seed: int = 0) -> ConceptBasis:
    """A basis of k random orthonormal atoms around the maps' mean (the pca method's encode and decode)."""
    torch.manual_seed(seed)
    atoms = torch.linalg.qr(torch.randn(feats.shape[1], k)).Q.T.contiguous()
    return ConceptBasis(atoms, "pca", feats.mean(dim=(0, 2, 3)), 1.0, 0.0, "test")


def clamped(edited, feats, lo, hi):
    """The clamp of code edits (steering.clamp_changed), written out for a per-channel range: changed entries only."""
    lo, hi = lo.view(-1, 1, 1), hi.view(-1, 1, 1)
    return torch.where(edited != feats, torch.minimum(torch.maximum(edited, lo), hi), feats)


@pytest.fixture()
def strips(monkeypatch):
    """The edited maps (B, A, C, h, w) each steer report reconstructs, as it hands them to the sampler."""
    seen = []

    def record(rec, feats, direction, alphas, keys, mask=None, clamp=None, steered=None):
        seen.append(steered.clone())
        return steer_and_reconstruct(rec, feats, direction, alphas, keys, mask, clamp, steered)

    steer_and_reconstruct = reports.steer_and_reconstruct
    monkeypatch.setattr(reports, "steer_and_reconstruct", record)
    return seen


# ----- syntax -------------------------------------------------------------------------------------

def test_one_syntax_check_reads_directions_and_edits(tmp_path):
    basis = tmp_path / "b.safetensors"
    basis.write_bytes(b"x")
    (tmp_path / "set").mkdir()
    assert split_spec("class:3", DIRECTIONS, "--direction", demo=False) == ("class", [3])
    assert split_spec(f"concept:{basis}:2", DIRECTIONS, "d", demo=False) == ("concept", [str(basis), 2])
    assert split_spec("mean-diff:digit3:rest", DIRECTIONS, "d", demo=True) == ("mean-diff", ["digit3", "rest"])
    assert split_spec(f"set:{basis}:3+7", EDITS, "--edit", demo=False) == ("set", [str(basis), (3, 7)])
    assert split_spec(f"set:{basis}:{tmp_path / 'set'}", EDITS, "e", demo=False)[1][1] == str(tmp_path / "set")
    assert split_spec(f"swap:{basis}:digit1:digits3+5", EDITS, "e", demo=True)[1] == [str(basis), "digit1", "digits3+5"]
    for spec, table, demo, message in [
        ("class:x", DIRECTIONS, False, "--x: 'class:x': use class:<i>"),
        ("class:-1", DIRECTIONS, False, "use class:<i>"),
        ("bogus:1", EDITS, False, "--x: 'bogus:1': unknown kind 'bogus' (choose from set, swap)"),
        (f"set:{basis}", EDITS, True, "use set:<basis>:<concepts>"),
        (f"swap:{basis}:digit1:", EDITS, True, "use swap:<basis>:<a>:<b>"),
        (f"set:{tmp_path}:0", EDITS, True, "--x: concept basis '" + str(tmp_path) + "' is a folder"),
        (f"set:{tmp_path / 'no'}:0", EDITS, True, "not found"),
        (f"set:{basis}:digit3", EDITS, False, "--x: 'digit3' is not an image folder"),
        (f"swap:{basis}:rest:digit3", EDITS, True, "'rest' is not an image folder nor digit classes (digit3, "
                                                   "digits3+5)"),
    ]:
        with pytest.raises(ValueError) as err:
            split_spec(spec, table, "--x", demo)
        assert message in str(err.value), (spec, str(err.value))


def test_levels_parse_quantiles_and_numbers():
    assert parse_levels("q0.99, 2.5,Q0,-1,q0.99") == [Level(0.99, True), Level(2.5, False), Level(0.0, True),
                                                       Level(-1.0, False)]
    assert [lv.label for lv in parse_levels("q0.5,3")] == ["q0.5", "3"]
    for text, message in [("nan", "finite"), ("qinf", "finite"), ("q1.5", "[0, 1]"), ("q-0.1", "[0, 1]"),
                          ("x", "neither q<quantile> nor a number"), ("q0.5,", "neither")]:
        with pytest.raises(ValueError, match="--levels: ") as err:
            parse_levels(text)
        assert message in str(err.value)


def test_help_states_the_benchmarks_defaults(capsys):
    from featinv.commands import steer

    with pytest.raises(SystemExit):
        steer.parse(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    (q_set, n_set), (q_swap, n_swap) = EDIT_DEFAULTS["set"], EDIT_DEFAULTS["swap"]
    assert f"(default: set q{q_set:g}, swap q{q_swap:g})" in text and f"(default: set {n_set}, swap {n_swap};" in text
    assert "set:<basis>:<concepts>" in text and "swap:<basis>:<a>:<b>" in text and "--only-edits" in text


# ----- on a demo-shaped pair (random digits CNN and model, the real digits) -----------------------

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from featinv.demo.digits import load_digits_split

    ext = random_extractor()
    pair = Pair(random_reconstructor(ext).model, ext, FAST, "demo-shaped", data=load_digits_split(8),
                labels=[str(d) for d in range(10)])
    ftr = features_of(ext, pair.data["x_train"].expand(-1, 3, -1, -1))
    basis = pca_basis(ftr, 6)
    path = basis.save(tmp_path_factory.mktemp("basis") / "concepts.safetensors")
    return {"pair": pair, "basis": ConceptBasis.load(path), "path": path, "ftr": ftr}


@pytest.mark.parametrize("kind", ["set", "swap"])
def test_edits_on_the_demo_are_the_benchmarks(demo, kind, strips, tmp_path, monkeypatch):
    """set:<basis>:digit7 and swap:<basis>:digit1:digit7 are bench_concepts' code_edit (top concepts and class levels
    on the training digits, per-channel clamp of the changed entries); the default n, a quantile and a number."""
    from featinv.commands import _analysis

    pair, basis, ftr = demo["pair"], demo["basis"], demo["ftr"]
    monkeypatch.setattr(_analysis, "pair_from_args", lambda args: pair)
    spec = f"set:{demo['path']}:digit7" if kind == "set" else f"swap:{demo['path']}:digit1:digit7"
    out = tmp_path / "out"
    assert cli.main(["steer", "--edit", spec, "--levels", "q0.9,2", "--digits", "1", "--count", "2",
                     "--out", str(out)]) == 0
    table = json.loads((out / "table.json").read_text())
    assert table["levels"] == ["unedited", "q0.9", "2"] and [r["level"] for r in table["rows"]] == table["levels"]
    assert table["target"] == 7 and table["clamp"] == "per channel" and (out / "steer.png").is_file()
    assert "target_prob_reconstruction" in table["rows"][1] and "shift_features" not in table["rows"][1]

    n = EDIT_DEFAULTS[kind][1]
    ytr = pair.data["y_train"]
    codes_tr = basis.encode(ftr)
    images = demo_digits(pair.data, [1], 2)[0]
    feats = reports.reconstructor(pair).features(images)
    source, target = top_concepts(basis, codes_tr, ytr, 1, n), top_concepts(basis, codes_tr, ytr, 7, n)
    assert table["raised"] == target and table["zeroed"] == ([] if kind == "set" else
                                                             [c for c in source if c not in target])
    lo, hi = feature_range(ftr)
    (strip,) = strips
    assert torch.equal(strip[:, 0], feats)
    for column, level in [(1, class_levels(basis, codes_tr, ytr, 0.9)[7]), (2, torch.full((basis.k,), 2.0))]:
        if kind == "set":
            edited = set_code(feats, basis, target, level[target])
        else:
            edited = swap(feats, basis, source, target, level)
        assert torch.equal(strip[:, column], clamped(edited, feats, lo, hi)), column
        assert not torch.equal(strip[:, column], feats)


# ----- on a checkpoint (random resnet18 and tiny model) ------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from featinv.commands import steer
    from featinv.commands._analysis import pair_from_args

    tmp = tmp_path_factory.mktemp("edits")
    t = tiny_checkpoint(tmp)
    t["args"] = ["--checkpoint", str(t["ckpt"]), "--backbone", "resnet18", "--backbone-checkpoint", str(t["bb_file"]),
                 "--backbone-size", "64", "--steps", "2", "--device", "cpu"]
    t["pair"] = pair_from_args(steer.parse([*t["args"], "--images", str(t["photos"]), "--out", str(tmp / "o")]))
    images, _ = load_images([t["photos"]], 64)
    t["basis"] = pca_basis(features_of(t["pair"].extractor, images), 5)
    t["path"] = t["basis"].save(tmp / "concepts.safetensors")
    return t


def test_set_by_index_in_a_box_with_the_clamp(tiny, strips, tmp_path):
    """Indices take their levels from the inputs' codes (no demo); --mask weighs the change, the clamp holds the
    changed entries in the inputs' range."""
    person = tiny["photos"] / "person"
    args = ["steer", *tiny["args"], "--images", str(person), "--edit", f"set:{tiny['path']}:3+1",
            "--levels", "q0.5,-1", "--mask", "0,0,32,64", "--clamp", "channel", "--out", str(tmp_path / "o")]
    assert cli.main(args) == 0
    table = json.loads((tmp_path / "o" / "table.json").read_text())
    assert table["levels"] == ["unedited", "q0.5", "-1"] and table["raised"] == [3, 1] and table["masked"]
    assert table["target"] is None and len(table["rows"]) == 3

    basis, (strip,) = tiny["basis"], strips
    feats = reports.reconstructor(tiny["pair"]).features(load_images([person], 64)[0])
    assert torch.equal(strip[:, 0], feats)
    mask = box_mask((0, 0, 32, 64), 64, (2, 2))
    lo, hi = feature_range(feats)
    q = code_levels(basis, basis.encode(feats), 0.5)[[3, 1]]
    for column, level in [(1, q), (2, torch.tensor([-1.0, -1.0]))]:
        expected = clamped(set_code(feats, basis, [3, 1], level, mask), feats, lo, hi)
        assert torch.equal(strip[:, column], expected), column
    assert torch.equal(strip[:, 1, ..., 1], feats[..., 1])  # the box covers the grid's left column only


def test_set_and_swap_of_folders_against_the_inputs(tiny, strips, tmp_path):
    """A folder's top concepts are scored against the inputs' maps (labels 1 / 0), its levels its own codes."""
    photos, basis = tiny["photos"], tiny["basis"]
    base = ["steer", *tiny["args"], "--images", str(photos / "person"), "--clamp", "none"]
    assert cli.main([*base, "--edit", f"set:{tiny['path']}:{photos / 'thing'}", "--concepts", "2", "--levels", "q1",
                     "--out", str(tmp_path / "set")]) == 0
    assert cli.main([*base, "--edit", f"swap:{tiny['path']}:{photos / 'person'}:{photos / 'thing'}",
                     "--out", str(tmp_path / "swap")]) == 0
    feats = reports.reconstructor(tiny["pair"]).features(load_images([photos / "person"], 64)[0])
    codes_in = basis.encode(feats)

    def top(folder, n):
        codes = basis.encode(features_of(tiny["pair"].extractor, load_images([folder], 64)[0]))
        labels = torch.cat([torch.ones(len(codes)), torch.zeros(len(codes_in))]).long()
        return top_concepts(basis, torch.cat([codes, codes_in]), labels, 1, n), codes

    raised, codes = top(photos / "thing", 2)
    assert torch.equal(strips[0][:, 1], set_code(feats, basis, raised, code_levels(basis, codes, 1.0)[raised]))
    n = EDIT_DEFAULTS["swap"][1]
    zeroed, _ = top(photos / "person", n)
    raised, codes = top(photos / "thing", n)
    q = EDIT_DEFAULTS["swap"][0]
    assert torch.equal(strips[1][:, 1], swap(feats, basis, zeroed, raised, code_levels(basis, codes, q)))
    table = json.loads((tmp_path / "swap" / "table.json").read_text())
    assert table["levels"] == ["unedited", f"q{q:g}"] and table["raised"] == raised
    assert table["zeroed"] == [c for c in zeroed if c not in raised]
