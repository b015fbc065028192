"""Image manipulations (featinv maps): deterministic for a seed, in shape and range, each doing what its help says;
their specs read without torch; before/after folders paired by name, with one-line errors naming the file."""
from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from featinv import registry
from featinv.analysis.manipulations import GREY, MANIPULATIONS, load_folder_pairs, manipulate
from featinv.analysis.specs import MANIPULATION_RANGES, parse_manipulation
from featinv.config import MANIPULATION_DEFAULTS
from featinv.data import crop_transform

RANDOM = ("jitter", "occlude")  # the manipulations that draw from the generator


def images(b: int = 4, side: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, side, side, generator=torch.Generator().manual_seed(seed))


def astronaut(side: int = 64) -> torch.Tensor:
    """scikit-image's sample photo, (1, 3, side, side) in [0, 1]: a realistic image beside the noise."""
    from skimage.data import astronaut as photo
    x = torch.from_numpy(photo()).permute(2, 0, 1)[None].float() / 255
    return torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", antialias=True).clamp(0, 1)


def test_the_tables_agree():
    assert set(registry.MANIPULATIONS) == set(MANIPULATION_DEFAULTS) == set(MANIPULATION_RANGES)
    for name, spec in registry.MANIPULATIONS.items():
        assert spec.syntax == "[<value>]" and callable(spec.load())
        assert MANIPULATION_DEFAULTS[name] in MANIPULATION_RANGES[name], name


@pytest.mark.parametrize("name", MANIPULATIONS)
def test_each_is_deterministic_and_keeps_shape_and_range(name):
    x = torch.cat([images(3), astronaut(32)])
    out = manipulate(x, name, seed=5)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, manipulate(x, name, seed=5))
    assert not torch.equal(out, x)  # every default does something
    if name in RANDOM:
        assert not torch.equal(out, manipulate(x, name, seed=6))


def test_dtype_kept_and_input_untouched():
    x = images(2, 16)
    before = x.clone()
    for name in MANIPULATIONS:
        assert manipulate(x.half(), name).dtype == torch.float16
        manipulate(x, name)
    assert torch.equal(x, before)


def test_hflip_twice_is_the_identity_and_zero_values_nearly_so():
    x = images()
    assert torch.equal(manipulate(manipulate(x, "hflip"), "hflip"), x)
    for spec in ("rotate:0", "translate:0", "crop:1", "blur:0", "grayscale:0", "jitter:0", "invert:0"):
        assert (manipulate(x, spec) - x).abs().max() < 1e-5, spec


def test_rotate_quarter_turns_and_translate_moves_whole_pixels():
    x = images(2, 16)
    # torchvision turns counter-clockwise for a positive angle: rot90 over (H, W) is the same turn.
    assert (manipulate(x, "rotate:90") - torch.rot90(x, 1, dims=(2, 3))).abs().max() < 1e-4
    out = manipulate(x, "translate:0.25")  # 4 px right and down, the uncovered band grey
    assert torch.equal(out[..., 4:, 4:], x[..., :12, :12])
    assert (out[..., :4, :] == GREY).all() and (out[..., :, :4] == GREY).all()


def test_crop_zooms_into_the_centre():
    x = torch.zeros(1, 3, 32, 32)
    x[..., 8:24, 8:24] = 1  # a white centre half the side
    out = manipulate(x, "crop:0.5")
    assert out.min() > 0.99  # the central half, resized back, is all white


def rough(y: torch.Tensor) -> float:
    """Mean step between neighbouring pixels along a row: lower when blurred."""
    return (y[..., 1:] - y[..., :-1]).abs().mean().item()


def test_blur_smooths_and_grows_with_sigma():
    x = astronaut()
    assert rough(x) > rough(manipulate(x, "blur:0.5")) > rough(manipulate(x, "blur:2"))
    tiny = manipulate(images(1, 4), "blur:10")  # a kernel wider than the image still runs
    assert tiny.shape == (1, 3, 4, 4)


def test_grayscale_gives_equal_channels_and_invert_the_negative():
    x = torch.cat([images(2), astronaut(32)])
    grey = manipulate(x, "grayscale")
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])
    half = manipulate(x, "grayscale:0.5")
    assert (half - (x + grey) / 2).abs().max() < 1e-5
    assert (manipulate(x, "invert") - (1 - x)).abs().max() < 1e-6


def test_jitter_factors_are_drawn_per_image():
    x = astronaut(32).expand(4, -1, -1, -1)
    out = manipulate(x, "jitter:0.8")
    assert not torch.equal(out[0], out[1])  # the same image, jittered differently


@pytest.mark.parametrize("fraction", [0.25, 0.4, 0.7])
def test_occlude_greys_one_box_of_its_fraction(fraction):
    x = images(6, 40) * 0.4  # no pixel is grey already, so every box pixel changes
    out = manipulate(x, f"occlude:{fraction}", seed=2)
    side = round(fraction * 40)
    corners = set()
    for before, after in zip(x, out):
        changed = (before != after).any(dim=0)
        rows, cols = changed.any(dim=1).nonzero().flatten(), changed.any(dim=0).nonzero().flatten()
        assert changed.sum() == side * side  # exactly the box, a square of the side fraction
        assert rows[-1] - rows[0] + 1 == side and cols[-1] - cols[0] + 1 == side
        assert (after[:, changed] == GREY).all()
        corners.add((rows[0].item(), cols[0].item()))
    assert len(corners) > 1  # the place is drawn per image


def test_manipulate_rejects_a_wrong_shape():
    with pytest.raises(ValueError, match=r"manipulation 'hflip': images must be \(B, 3, H, W\).*\(3, 8, 8\)"):
        manipulate(torch.rand(3, 8, 8), "hflip")
    with pytest.raises(ValueError, match=r"\(2, 1, 8, 8\)"):
        manipulate(torch.rand(2, 1, 8, 8), "blur")


@pytest.mark.parametrize("spec, expected", [
    ("rotate", ("rotate", 30.0)), ("rotate:45", ("rotate", 45.0)), ("rotate:-90", ("rotate", -90.0)),
    ("crop:1", ("crop", 1.0)), ("translate:-0.5", ("translate", -0.5)), ("blur:0", ("blur", 0.0)),
    ("hflip", ("hflip", 1.0)), ("hflip:1", ("hflip", 1.0)), (" occlude:0.3 ", ("occlude", 0.3)),
])
def test_parse_manipulation_reads_good_specs(spec, expected):
    assert parse_manipulation(spec) == expected


@pytest.mark.parametrize("spec, message", [
    ("spin", r"manipulation 'spin': unknown name 'spin' \(choose from hflip, rotate, .* and occlude\)"),
    ("Rotate:4", "unknown name 'Rotate'"), ("", "unknown name ''"),
    ("rotate:", "manipulation 'rotate:': '' is not a number"), ("rotate:ten", "'ten' is not a number"),
    ("rotate:45:3", "'45:3' is not a number"),
    ("rotate:nan", "manipulation 'rotate:nan': the value must be finite"), ("blur:inf", "must be finite"),
    ("crop:0", r"crop's value must be in \(0, 1\], got 0"), ("crop:1.5", r"in \(0, 1\], got 1.5"),
    ("translate:-2", r"translate's value must be in \[-1, 1\]"), ("blur:-1", "blur's value must be >= 0"),
    ("hflip:0", "hflip's value must be 1, got 0"), ("occlude:0", r"occlude's value must be in \(0, 1\]"),
    ("jitter:2", r"jitter's value must be in \[0, 1\]"), ("rotate:720", r"\[-360, 360\]"),
])
def test_parse_manipulation_rejects_bad_specs_in_one_line(spec, message):
    with pytest.raises(ValueError, match=message) as e:
        parse_manipulation(spec)
    assert "\n" not in str(e.value)


def test_specs_read_without_torch():
    code = ("import featinv.analysis.specs as s, sys; assert s.parse_manipulation('crop:0.5') == ('crop', 0.5); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ----- before/after folders ---------------------------------------------------------------------------

def save(path, size=(24, 20), seed=0):
    """A random RGB image of ``size`` (W, H) at ``path``."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_folder_pairs_match_by_name(tmp_path):
    for i, name in enumerate(("b", "a", "c")):
        save(tmp_path / "before" / f"{name}.png", seed=i)
        save(tmp_path / "after" / f"{name}.{'jpg' if name == 'a' else 'png'}", seed=10 + i)
    (tmp_path / "after" / "notes.txt").write_text("not an image")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every file has its partner: no warning
        x, y, names = load_folder_pairs(tmp_path / "before", str(tmp_path / "after"), 16)
    assert names == ["a", "b", "c"]
    assert x.shape == y.shape == (3, 3, 16, 16) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1 and not torch.equal(x, y)
    # each row is its name's image, resized (shorter side) and centre-cropped as in evaluation
    crop = crop_transform(16, train=False)
    for i, name in enumerate(names):
        for folder, loaded in (("before", x), ("after", y)):
            path = next((tmp_path / folder).glob(f"{name}.*"))
            expected = np.asarray(crop(Image.open(path).convert("RGB")), np.float32) / 255
            assert torch.equal(loaded[i], torch.from_numpy(expected).permute(2, 0, 1)), (folder, name)


def test_a_missing_partner_warns_naming_it(tmp_path):
    for name in ("a", "b"):
        save(tmp_path / "before" / f"{name}.png")
    save(tmp_path / "after" / "a.png")
    save(tmp_path / "after" / "z.png")
    with pytest.warns(UserWarning) as record:
        _, _, names = load_folder_pairs(tmp_path / "before", tmp_path / "after", 8)
    assert names == ["a"]
    text = [str(w.message) for w in record]
    assert any("b.png" in t and "no image named 'b'" in t for t in text)
    assert any("z.png" in t and "no image named 'z'" in t for t in text)


def test_no_pair_left_names_both_folders(tmp_path):
    save(tmp_path / "before" / "a.png")
    save(tmp_path / "after" / "b.png")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"no image pairs .*before.* and .*after"):
        load_folder_pairs(tmp_path / "before", tmp_path / "after", 8)


def test_pairs_of_other_sizes_are_refused_naming_both_files(tmp_path):
    save(tmp_path / "before" / "a.png", size=(24, 20))
    save(tmp_path / "after" / "a.png", size=(20, 24))
    with pytest.raises(ValueError, match=r"before/a.png' is 24x20 px but .*after/a.png' is 20x24 px") as e:
        load_folder_pairs(tmp_path / "before", tmp_path / "after", 8)
    assert "\n" not in str(e.value)


def test_unreadable_files_and_missing_folders_are_named(tmp_path):
    save(tmp_path / "before" / "a.png")
    (tmp_path / "after").mkdir()
    (tmp_path / "after" / "a.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"unreadable image '.*after/a.jpg': ") as e:
        load_folder_pairs(tmp_path / "before", tmp_path / "after", 8)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"image folder '.*nowhere' not found"):
        load_folder_pairs(tmp_path / "before", tmp_path / "nowhere", 8)
    with pytest.raises(ValueError, match=r"image folder '.*a.png' is a file"):
        load_folder_pairs(tmp_path / "before" / "a.png", tmp_path / "after", 8)


def test_two_files_of_one_name_are_refused(tmp_path):
    save(tmp_path / "before" / "a.png")
    save(tmp_path / "before" / "a.jpg")
    save(tmp_path / "after" / "a.png")
    with pytest.raises(ValueError, match=r"a.jpg' and .*a.png' share the name 'a'"):
        load_folder_pairs(tmp_path / "before", tmp_path / "after", 8)


def test_defaults_are_moderate():
    """The defaults change a photo clearly but keep it recognisable: a mean change between 2 % and 50 %."""
    x = astronaut()
    for name in MANIPULATIONS:
        change = (manipulate(x, name) - x).abs().mean().item()
        assert 0.02 < change < 0.5 or name == "invert", (name, change)
