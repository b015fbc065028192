"""Analysis plumbing: input images, demo digit sets, labelled tiles and grids, tables written atomically."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from featinv.analysis.common import (
    TILE,
    demo_digits,
    digit_classes,
    grid,
    heat_tiles,
    load_images,
    markdown_table,
    tile,
    write_outputs,
)


def fake_digits() -> dict:
    y = torch.arange(30) % 10
    x = torch.rand(30, 1, 8, 8)
    return {"x_test": x, "y_test": y, "x_train": x, "y_train": y}


def test_load_images_resizes_any_size_and_names_bad_input(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "imgs" / "wide.png")
    Image.new("L", (9, 9), 128).save(tmp_path / "imgs" / "grey.jpg")
    images, names = load_images([tmp_path / "imgs"], 16)
    assert images.shape == (2, 3, 16, 16) and names == ["grey", "wide"]
    assert images[1, 0].min() > 0.99 and images[1, 1].max() < 0.01
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images .* in folder .*empty"):
        load_images([tmp_path / "empty"], 16)
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match="unreadable image .*bad.png"):
        load_images([tmp_path / "bad.png"], 16)


def test_demo_digits_and_classes():
    images, names, labels = demo_digits(fake_digits(), [3, 7], 2)
    assert images.shape == (4, 3, 8, 8) and labels.tolist() == [3, 3, 7, 7]
    assert names[0].startswith("d3_")
    assert digit_classes("digit4") == [4] and digit_classes("digits1+9") == [1, 9]
    for bad in ("digit", "digit12", "cats", "digits1+x"):
        with pytest.raises(ValueError, match="neither an image folder nor digit classes"):
            digit_classes(bad)
    with pytest.raises(ValueError, match="digit classes must be 0..9"):
        demo_digits(fake_digits(), [11], 1)


def test_tiles_and_grid_sizes():
    t = tile(torch.rand(3, 8, 8), ["alpha=1", "rec 3 (0.90)"])
    assert t.size[0] == TILE and t.size[1] > TILE
    band = torch.from_numpy(np.asarray(t.crop((0, TILE, TILE, t.size[1]))).copy())
    assert (band < 128).any()  # the caption drew dark pixels in the white band
    heat = heat_tiles(torch.rand(2, 3, 3, 8, 8))
    assert len(heat) == 2
    picture = grid([[t, None, heat[0]], [heat[1]]], ["a title"], ["row 1", "row 2"])
    assert picture.height > 2 * TILE and picture.width > 3 * TILE


def test_tables_and_outputs(tmp_path):
    md = markdown_table([{"a": 0.5, "x_share": 0.25, "s": "t"}, {"a": None}],
                        [("a", "A"), ("x_share", "X"), ("s", "S")])
    assert "| 0.500 | 25.0 % | t |" in md and "| n/a | n/a | n/a |" in md
    paths = write_outputs(tmp_path / "out", Image.new("RGB", (4, 4)), "p.png", md, {"v": torch.tensor([1, 2])})
    assert json.loads((tmp_path / "out" / "table.json").read_text()) == {"v": [1, 2]}
    assert Image.open(paths["picture"]).size == (4, 4)
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left behind


def test_table_json_is_strict_json_with_null_for_non_finite_numbers(tmp_path):
    import json as _json

    from PIL import Image as _Image

    from featinv.analysis.common import write_outputs

    paths = write_outputs(tmp_path, _Image.new("RGB", (4, 4)), "p.png", "md",
                          {"rows": [{"cosine": float("nan"), "p": float("inf"), "ok": 0.5}]})
    text = open(paths["json"]).read()
    assert "NaN" not in text and "Infinity" not in text
    assert _json.loads(text)["rows"] == [{"cosine": None, "p": None, "ok": 0.5}]
