"""The app without a browser: its callbacks on the demo pair, upload checks, the face, the layering."""
from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from featinv.commands.app import main

gr = pytest.importorskip("gradio")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """As `featinv app` runs on 2 cores: one torch thread (tiny tensors; on a busy machine OpenMP barriers
    cost more than the work, measured 7-70x slower with two) and denormals flushed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)


@pytest.fixture(scope="module")
def session(quick_demo_out):
    from featinv.app.session import demo_session

    return demo_session(quick_demo_out, log=lambda *a: None)


@pytest.fixture(scope="module")
def cb(session):
    from featinv.app.ui import Callbacks

    return Callbacks(session)


def sampler(session, k=4, steps=None):
    d = session.sample_config
    return [steps or d.steps, d.guidance_scale, d.uncond, d.seed, k]


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height (no pixel data): a decompression bomb's first bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))
    return path


def test_reconstruct_returns_k_images_and_top5_table(cb, session):
    gallery, spread, table, note = cb.reconstruct(session.examples[3], *sampler(session, k=4))
    assert len(gallery) == 4
    assert [c.split(":")[0] for _, c in gallery] == ["sample 1", "sample 2", "sample 3", "sample 4"]
    assert len(table) == 5 and list(table.columns) == ["rank", "original"] + [f"sample {i}" for i in range(1, 5)]
    assert table["original"][0].startswith("3 ")  # the classifier is right on this held-out 3
    cosines = [float(c) for c in re.findall(r"-?\d\.\d{3}", note.split("(")[0])]
    assert len(cosines) == 4 and all(-1 <= c <= 1 for c in cosines)
    assert spread.size == gallery[0][0].size and pixels(spread).max() > 0  # the K samples differ somewhere


def test_steer_strip_starts_at_the_plain_reconstruction(cb, session):
    strip, table = cb.steer(session.examples[3], "class", "7", 0, 2.0, "none", "whole map", "", *sampler(session, k=1))
    assert [c.split(":")[0] for _, c in strip] == ["α +0.00", "α +0.50", "α +1.00", "α +1.50", "α +2.00"]
    assert len(table) == 5 and table.iloc[-1, 1].startswith("7 ")  # the head reads the steered map as a 7
    plain, *_ = cb.reconstruct(session.examples[3], *sampler(session, k=1))
    # α = 0 is the unsteered map with the same noise (same key and seed): the same picture
    assert np.abs(pixels(strip[0][0]) - pixels(plain[0][0])).max() <= 1
    assert np.abs(pixels(strip[-1][0]) - pixels(plain[0][0])).max() > 10


def test_compose_at_t0_reconstructs_a(cb, session):
    gallery, table, note = cb.compose(session.examples[3], session.examples[8], 0.0, "whole map", "",
                                      *sampler(session, k=2))
    plain, _, _, plain_note = cb.reconstruct(session.examples[3], *sampler(session, k=2))
    assert len(gallery) == 4 and gallery[1][1].startswith("B: 8 ")
    for (ours, _), (ref, _) in zip(gallery[2:], plain):
        assert np.abs(pixels(ours) - pixels(ref)).max() <= 1
    pasted, *_ = cb.compose(session.examples[3], session.examples[8], 0.0, "cell", "1, 1", *sampler(session, k=2))
    assert np.abs(pixels(pasted[2][0]) - pixels(gallery[2][0])).max() > 0  # B's cell changes the picture


INDEX = {"images": 300, "frequency": [0.1, 0.5, 0.9, 0.3], "mean_code": [0.2, 0.4, 1.5, 0.1],
         "classes": [[3, 7], [7], [1, 2, 3], []], "importance": [0.3, 0.1, 0.7, 0.0]}


@pytest.fixture(scope="module")
def concept_files(session, tmp_path_factory) -> tuple[str, str]:
    """(a 4-concept nmf basis fitted on 300 training digits, the same basis with a hand-made concept index)."""
    import dataclasses

    from featinv.analysis.concepts import fit_concepts
    from featinv.demo.digits import load_digits_split

    with torch.no_grad():
        feats = session.extractor(load_digits_split(session.image_size)["x_train"][:300].expand(-1, 3, -1, -1))
    basis = fit_concepts(feats, 4, "nmf", seed=0)
    folder = tmp_path_factory.mktemp("concepts")
    indexed = dataclasses.replace(basis, stats={**basis.stats, "index": INDEX})
    return str(basis.save(folder / "concepts.safetensors")), str(indexed.save(folder / "indexed.safetensors"))


def concepts_args(session, path, index=1, mode="steer along the atom", strength=2.0, quantile=0.99, target=2):
    return session.examples[3], path, index, mode, strength, quantile, target, *sampler(session, k=1)


def test_concepts_panel_heat_strip_and_removal(cb, session, concept_files, tmp_path):
    path, _ = concept_files
    heat, strip, removed, table = cb.concepts(*concepts_args(session, path))
    assert [c.split(":")[0] for _, c in strip] == ["α +0.00", "α +0.50", "α +1.00", "α +1.50", "α +2.00"]
    assert len(removed) == 2 and removed[1][1].startswith("without concept 1: ") and len(table) == 4
    plain, *_ = cb.reconstruct(session.examples[3], *sampler(session, k=1))
    assert np.abs(pixels(strip[0][0]) - pixels(plain[0][0])).max() <= 1  # α = 0: the plain reconstruction
    assert heat.size == strip[0][0].size
    with pytest.raises(gr.Error, match=r"concept = 9 is out of range \[0, 3\]"):
        cb.concepts(*concepts_args(session, path, index=9))
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(gr.Error, match="is not a concept basis file"):
        cb.concepts(*concepts_args(session, str(tmp_path / "junk.safetensors")))


def codes_of(session, path):
    from featinv.analysis.concepts import ConceptBasis

    with torch.no_grad():
        return ConceptBasis.load(path).encode(session.extractor(session.load_image(session.examples[3])))


def test_concepts_at_a_clicked_place_are_the_active_ones(session, concept_files):
    from featinv.app.concept_lookup import NO_INDEX, at

    plain, indexed = concept_files
    codes = codes_of(session, plain)[0]                                   # (4, 2, 2) over the 8 x 8 input
    listed = set()
    for x, y, (row, col) in [(0, 0, (0, 0)), (5.5, 1, (0, 1)), (2, 7.9, (1, 0)), (7, 4, (1, 1))]:
        cell = codes[:, row, col]
        expected = sorted((j for j in range(4) if cell[j] != 0), key=lambda j: -abs(float(cell[j])))
        table, note = at(session, session.examples[3], plain, x, y)
        assert table["concept"].tolist() == [str(j) for j in expected], (x, y, cell)
        assert [float(v) for v in table["code here"]] == pytest.approx([float(cell[j]) for j in expected], rel=1e-2)
        assert f"cell ({row}, {col}) of the 2x2 feature grid: {len(expected)} of the 4" in note and NO_INDEX in note
        listed |= set(expected)
    assert listed  # some concept is active somewhere on the digit
    table, note = at(session, session.examples[3], indexed, 7, 4)
    assert list(table.columns) == ["concept", "code here", "active at (share of fit locations)",
                                   "top classes (largest logit drop first)"] and NO_INDEX not in note
    assert [INDEX["classes"][int(j)] for j in table["concept"]] == [
        [int(c) for c in names.split(", ") if c] for names in table["top classes (largest logit drop first)"]]
    with pytest.raises(ValueError, match=r"pixel \(8, 0\) is outside the 8x8 image"):
        at(session, session.examples[3], plain, 8, 0)
    with pytest.raises(ValueError, match="y \\(pixels\\) = nan is not a finite number"):
        at(session, session.examples[3], plain, 1, float("nan"))


def test_concepts_found_by_class_and_frequency(session, concept_files):
    from featinv.app.concept_lookup import NO_INDEX, find

    plain, indexed = concept_files
    for cls, low, high, expected in [("3", 0, 1, [0, 2]), ("", 0.25, 0.6, [1, 3]), ("7", 0.2, 1, [1]),
                                     (" ", 0, 1, [0, 1, 2, 3]), ("9", 0, 1, []), ("", 0.95, 1, [])]:
        table, note = find(session, indexed, cls, low, high)
        assert table["concept"].tolist() == [str(j) for j in expected], (cls, low, high)
        assert note.startswith(f"{len(expected)} of the 4 concepts")
    table, note = find(session, plain, "3", 0, 1)
    assert note == NO_INDEX and len(table) == 0
    with pytest.raises(ValueError, match="class 'cat' is not one of the classifier's classes"):
        find(session, indexed, "cat", 0, 1)
    with pytest.raises(ValueError, match="frequency from 0.8 is above frequency to 0.2"):
        find(session, indexed, "", 0.8, 0.2)
    with pytest.raises(ValueError, match=r"frequency to = 2 is out of range \[0, 1\]"):
        find(session, indexed, "", 0, 2)


def test_concepts_set_and_swap_reconstruct_the_library_edits(cb, session, concept_files):
    """set / swap: before = the plain reconstruction; after = the library's set_code / swap map reconstructed with
    the same noise, its level the quantile of the concept's non-zero codes on the reference digits and the input."""
    import dataclasses

    from featinv.analysis.concept_edits import code_levels, set_code, swap
    from featinv.analysis.concepts import ConceptBasis
    from featinv.app.show import KEY, tile

    path, _ = concept_files
    basis = ConceptBasis.load(path)
    rec = session.reconstructor(dataclasses.replace(session.sample_config_from(*sampler(session, k=1)), num_samples=1))
    feats = rec.features(session.load_image(session.examples[3]))
    levels = code_levels(basis, basis.encode(torch.cat([session.references(), feats])), 0.99)
    plain, *_ = cb.reconstruct(session.examples[3], *sampler(session, k=1))
    for mode, edited in [("set the code", set_code(feats, basis, 1, float(levels[1]))),
                         ("swap a → b", swap(feats, basis, 1, 2, levels))]:
        _, strip, _, _ = cb.concepts(*concepts_args(session, path, mode=mode))
        assert [c.split(":")[0] for _, c in strip] == ["before", "after (concept 1 set to " + (
            f"{float(levels[1]):.3g})" if mode == "set the code" else f"0, 2 to {float(levels[2]):.3g})")]
        assert "head on the edited map" in strip[1][1]
        assert np.abs(pixels(strip[0][0]) - pixels(plain[0][0])).max() <= 1
        ours = tile(rec.from_features(edited, [KEY])[0, 0])
        assert np.abs(pixels(strip[1][0]) - pixels(ours)).max() <= 1, mode
        assert np.abs(pixels(strip[1][0]) - pixels(plain[0][0])).max() > 10, mode
    with pytest.raises(gr.Error, match="swap: concept b = 1 is concept a"):
        cb.concepts(*concepts_args(session, path, mode="swap a → b", target=1))
    with pytest.raises(gr.Error, match=r"quantile = 0.2 is out of range \[0.5, 0.99\]"):
        cb.concepts(*concepts_args(session, path, mode="set the code", quantile=0.2))
    with pytest.raises(gr.Error, match="edit 'paint': choose one of steer along the atom"):
        cb.concepts(*concepts_args(session, path, mode="paint"))


def test_perturb_shows_clean_and_perturbed(cb, session):
    clean, perturbed, table = cb.perturb(session.examples[3], "PGD attack", 1, 64, 10, "untargeted",
                                         *sampler(session, k=2))
    assert len(clean) == len(perturbed) == 3 and list(table.columns)[1:] == [
        "clean", "clean sample 1", "perturbed", "perturbed sample 1"]
    assert table["clean"][0] != table["perturbed"][0]  # eps 64/255 flips the digits classifier's label
    clean, perturbed, _ = cb.perturb(session.examples[3], "blur", 3, 8, 10, "untargeted", *sampler(session, k=1))
    assert perturbed[0][1].startswith("blur severity 3:")


CAPTION = re.compile(r"^(.+?): \d \(\d+\xa0%\)(; .+)?$")  # "<what>: <top-1 class> (<p> %)"


def test_maps_fits_a_linear_map_once_and_reconstructs_the_mapped_map(cb, session, tmp_path, monkeypatch):
    """hflip, linear: input | flipped | the flipped digit's own map reconstructed | the input's map through the map,
    reconstructed, each captioned with the classifier's top-1; the map (fitted on the training digits) is kept, so
    a second click fits nothing; saved to a file, it brings its own manipulation and gives the same pictures."""
    from featinv.analysis import maps_report
    from featinv.analysis.map_files import save_map

    session.maps.clear()
    images, table, note = cb.maps(session.examples[3], "hflip", 1, "linear", "", *sampler(session, k=1))
    assert [CAPTION.match(c).group(1) for _, c in images] == [
        "input", "hflip:1", "own map reconstructed", "mapped (linear) reconstructed"]
    assert len({im.size for im, _ in images}) == 1 and images[0][0].size[0] >= 160
    assert list(table["feature map"]) == ["own map", "mapped (linear)", "unmapped (the input's own)"]
    cosine = [float(c) for c in table["cosine to the own map"]]
    assert cosine[0] == 1 and cosine[1] > cosine[2], table  # the map moves the input's map towards the flipped one
    assert f"fitted on {len(session.pair.data['x_train'])} training digits" in note and set(session.maps) == {
        ("hflip:1", "linear")}
    monkeypatch.setattr(maps_report, "fit_task_maps", lambda *a, **k: pytest.fail("fitted again"))
    again, _, _ = cb.maps(session.examples[3], "hflip", "", "linear", "", *sampler(session, k=1))  # empty: default
    assert all(np.array_equal(pixels(a), pixels(b)) for (a, _), (b, _) in zip(images, again))
    path = save_map(session.maps[("hflip:1", "linear")], tmp_path / "hflip_1_linear.safetensors",
                    about={"manipulation": "hflip:1"})
    from_file, _, note = cb.maps(session.examples[3], "rotate", 30, "local", f" {path} ", *sampler(session, k=1))
    assert [c for _, c in from_file] == [c for _, c in images] and "linear map from" in note
    assert all(np.array_equal(pixels(a), pixels(b)) for (a, _), (b, _) in zip(images, from_file))


def test_maps_refuses_map_files_that_do_not_fit(cb, session, tmp_path):
    """A map of another channel count names both shapes; one of a network the app does not serve, or a fit without
    fit images (a checkpoint), say what to run instead."""
    import dataclasses

    from featinv.analysis.feature_maps import build_map
    from featinv.analysis.map_files import save_map
    from featinv.app.panels.maps import run
    from featinv.app.session import Session

    other = save_map(build_map("linear", 32, 64, (2, 2), (2, 2)), tmp_path / "c32.safetensors",
                     about={"manipulation": "hflip:1"})
    with pytest.raises(gr.Error, match=r"c32.safetensors: the map takes 32x2x2 maps, but demo pair gives 64x2x2"):
        cb.maps(session.examples[3], "hflip", 1, "linear", str(other), *sampler(session, k=1))
    foreign = save_map(build_map("linear", 64, 64, (2, 2), (2, 2)), tmp_path / "r50.safetensors",
                       about={"source": "resnet50", "target": "demo pair"})
    with pytest.raises(gr.Error, match="needs resnet50's feature maps \\(its source network\\)"):
        cb.maps(session.examples[3], "hflip", 1, "linear", str(foreign), *sampler(session, k=1))
    with pytest.raises(gr.Error, match=r"rotate's value must be in \[-360, 360\], got 999"):
        cb.maps(session.examples[3], "rotate", 999, "linear", "", *sampler(session, k=1))
    without_data = Session(dataclasses.replace(session.pair, data=None))
    with pytest.raises(ValueError, match="run `featinv maps --checkpoint CKPT --images DIR --manipulation hflip:1"):
        run(without_data, session.examples[3], "hflip", 1, "linear", "", cfg=session.sample_config)


def test_maps_from_the_demos_second_classifier(cb, session, tmp_path):
    """A map from digits-b's maps (48 channels) to the decoder's: no manipulated column; the input is captioned with
    both classifiers' top-1 and the mapped map is compared with the decoder's own map of the input."""
    from featinv.analysis import maps_report
    from featinv.analysis.map_files import save_map
    from featinv.demo.pair import SECOND, second_classifier

    digits = session.pair.data["x_train"][:300].expand(-1, 3, -1, -1)
    task = maps_report.network_task(second_classifier(session.pair, log=lambda *a: None), session.extractor, digits,
                                    digits[:1], ["d0"], 1, SECOND, "demo pair")
    path = save_map(maps_report.fit_task_maps(task, ["linear"])["linear"], tmp_path / "b_linear.safetensors")
    images, table, note = cb.maps(session.examples[3], "hflip", 1, "linear", str(path), *sampler(session, k=1))
    assert [CAPTION.match(c).group(1) for _, c in images] == [
        "input", "the decoder's own map reconstructed", "mapped (linear) reconstructed"]
    assert f"; {SECOND}: " in images[0][1] and f"({SECOND} → the decoder's)" in note
    assert list(table["feature map"]) == ["the decoder's own map", "mapped (linear)"]


@pytest.mark.parametrize("make, message", [
    (lambda d: (d / "notes.txt").write_text("hello") and d / "notes.txt", "is not an image"),
    (lambda d: png_header(d / "bomb.png", 9_000, 5_000), "45 megapixels; the limit is 40"),
    (lambda d: png_header(d / "bomb.png", 20_000, 20_000), "far more than 40 megapixels"),
    (lambda d: (d / "big.png").write_bytes(b"\0" * (21 * 2**20)) and d / "big.png", "the limit is 20 MB"),
    (lambda d: None, "no image"),
])
def test_bad_upload_is_a_message(cb, session, tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(gr.Error, match=message):
        cb.reconstruct(str(path) if path else None, *sampler(session))
    if path:
        with pytest.raises(gr.Error, match=message):
            cb.preview(str(path))


def test_settings_out_of_range_are_messages(cb, session):
    with pytest.raises(gr.Error, match="steps = 500 is out of range"):
        cb.reconstruct(session.examples[0], *sampler(session, steps=500))
    with pytest.raises(gr.Error, match="K .* out of range"):
        cb.reconstruct(session.examples[0], *sampler(session, k=0))
    with pytest.raises(gr.Error, match="cell .* outside the 2x2 feature grid"):
        cb.steer(session.examples[0], "class", "7", 0, 1.0, "none", "cell", "2, 0", *sampler(session, k=1))
    with pytest.raises(gr.Error, match=r"channel = 64 is out of range \[0, 63\]"):
        cb.steer(session.examples[0], "channel", "7", 64, 1.0, "none", "whole map", "", *sampler(session, k=1))
    with pytest.raises(gr.Error, match="clamp 'sometimes': choose one of none, per channel"):
        cb.steer(session.examples[0], "class", "7", 0, 1.0, "sometimes", "whole map", "", *sampler(session, k=1))


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("call, message", [
    (lambda cb, x, s: cb.reconstruct(x, NAN, *s[1:]), "steps = nan is not a finite number"),
    (lambda cb, x, s: cb.reconstruct(x, s[0], INF, *s[2:]), "guidance scale = inf is not a finite number"),
    (lambda cb, x, s: cb.reconstruct(x, *s[:3], NAN, s[4]), "seed = nan is not a finite number"),
    (lambda cb, x, s: cb.reconstruct(x, *s[:4], "many"), "K \\(samples\\) = 'many' is not a number"),
    (lambda cb, x, s: cb.reconstruct(x, 2.5, *s[1:]), "steps = 2.5: give a whole number"),
    (lambda cb, x, s: cb.steer(x, "class", "7", 0, NAN, "none", "whole map", "", *s), "strength = nan is not a finite"),
    (lambda cb, x, s: cb.steer(x, "class", "7", 0, -INF, "none", "whole map", "", *s), "strength = -inf is not a fin"),
    (lambda cb, x, s: cb.steer(x, "channel", "7", NAN, 1.0, "none", "whole map", "", *s), "channel = nan is not a fin"),
    (lambda cb, x, s: cb.steer(x, "class", "7", 0, 9.0, "none", "whole map", "", *s), "strength = 9.0 is out of range"),
    (lambda cb, x, s: cb.compose(x, x, INF, "whole map", "", *s), "interpolation t = inf is not a finite number"),
    (lambda cb, x, s: cb.perturb(x, "PGD attack", 1, NAN, 10, "untargeted", *s), "eps \\(/255\\) = nan is not a fin"),
    (lambda cb, x, s: cb.perturb(x, "PGD attack", 1, 8, INF, "untargeted", *s), "PGD steps = inf is not a finite"),
    (lambda cb, x, s: cb.perturb(x, "blur", NAN, 8, 10, "untargeted", *s), "corruption severity = nan is not a fin"),
    (lambda cb, x, s: cb.maps(x, "rotate", NAN, "linear", "", *s), "rotate:nan': the value must be finite"),
])
def test_non_finite_numbers_are_messages(cb, session, call, message):
    """NaN/inf from a slider, a number box or an API call: a message naming the setting, nothing sampled."""
    with pytest.raises(gr.Error, match=message):
        call(cb, session.examples[0], sampler(session, k=1))


def test_steer_clamp_keeps_the_reconstructions_following_the_edit(cb, session):
    """Clamping to the training digits' feature range: α = 0 untouched; at α = 2 along class 7 the
    reconstruction of a 3 reads as a 7 (unclamped, the edit leaves the range the decoder was trained on)."""
    args = (session.examples[3], "class", "7", 0, 2.0)
    free, _ = cb.steer(*args, "none", "whole map", "", *sampler(session, k=1))
    clamped, table = cb.steer(*args, "per channel", "whole map", "", *sampler(session, k=1))
    assert np.abs(pixels(free[0][0]) - pixels(clamped[0][0])).max() == 0
    assert np.abs(pixels(free[-1][0]) - pixels(clamped[-1][0])).max() > 10
    assert table.iloc[-1, 1].startswith("7 ") and table.iloc[-1, 2].startswith("7 "), table
    per_location, _ = cb.steer(*args, "per channel and location", "whole map", "", *sampler(session, k=1))
    assert np.abs(pixels(per_location[-1][0]) - pixels(clamped[-1][0])).max() > 0


def test_face_help_and_bad_checkpoint(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--checkpoint" in capsys.readouterr().out
    assert main(["--checkpoint", str(tmp_path / "missing.safetensors"), "--port", "1"]) == 2
    assert "featinv app: error:" in capsys.readouterr().err


def test_page_has_a_tab_per_registered_panel_and_one_error_path(session):
    """The tabs are featinv.registry.PANELS in order; every panel's event is its registered run, and when it
    fails its outputs are emptied (the message stays; no earlier result under it)."""
    from featinv.app.ui import build
    from featinv.registry import PANELS

    page = build(session)
    assert [b.label for b in page.blocks.values() if isinstance(b, gr.Tab)] == list(PANELS)
    fns = list(page.fns.values())
    for name in PANELS:
        runs = [f for f in fns if f.name == name.lower()]
        assert runs, name
        for run in runs:
            [cleanup] = [f for f in fns if f.trigger_after == run._id and f.trigger_only_on_failure]
            assert [o._id for o in cleanup.outputs] == [o._id for o in run.outputs], name


def test_library_never_imports_the_app():
    root = Path(__file__).resolve().parents[1] / "featinv"
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if p.relative_to(root).parts[0] not in ("app", "commands")  # the faces may
                 and re.search(r"^\s*(from|import)\s+featinv\.app\b", p.read_text(), re.M)]
    assert offenders == []


def test_checkpoint_session_serves_a_run_folder(tmp_path):
    """--checkpoint <run folder>: featinv.safetensors + config.yaml (a random timm resnet18 at 64 px)."""
    from omegaconf import OmegaConf
    from PIL import Image

    from featinv.app.session import checkpoint_session
    from featinv.app.ui import Callbacks
    from featinv.checkpoint.config_file import merge
    from featinv.checkpoint.load import save_featinv
    from featinv.config import PRESETS, PairSource
    from featinv.nets.model import FeatInv

    cfg = merge(PRESETS["tiny"], {"model": {"adapter": {"in_channels": 512}}})  # resnet18's final stage
    torch.manual_seed(0)
    save_featinv(FeatInv(cfg.model), tmp_path / "run" / "featinv.safetensors")
    (tmp_path / "run" / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    session = checkpoint_session(PairSource(checkpoint=str(tmp_path / "run")))
    assert session.image_size == 64 and len(session.class_names) == 1000
    photo = tmp_path / "photo.jpg"  # not square, not 64 px: resized and centre-cropped
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(photo)
    gallery, spread, table, _ = Callbacks(session).reconstruct(str(photo), 2, 1.5, "prompt", 0, 2)
    assert len(gallery) == 2 and len(table) == 5 and spread.size == gallery[0][0].size
    with pytest.raises(ValueError, match="does not match the model"):  # the tiny preset's adapter takes 16 channels
        checkpoint_session(PairSource(checkpoint=str(tmp_path / "run" / "featinv.safetensors"), config="tiny"))
