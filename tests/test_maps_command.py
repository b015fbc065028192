"""featinv maps end to end on the demo pair: manipulations, folder pairs and a second network mapped into the
decoder; the fitted maps reapplied with --map-file; a map of another shape refused."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from featinv import cli
from featinv.analysis.feature_maps import fit_map
from featinv.analysis.map_files import save_map

FAST = ["--decode", "4", "--show", "2", "--steps", "4"]


def rows_of(out) -> list[dict]:
    table = json.loads((out / "table.json").read_text())
    assert (out / "table.md").read_text().count("\n|") >= len(table["rows"]) + 1
    return table["rows"]


def test_maps_then_the_saved_map_on_the_held_out_digits(quick_demo_out, tmp_path, capsys):
    demo = ["--demo-out", str(quick_demo_out)]
    out = tmp_path / "maps"
    argv = ["maps", *demo, *FAST, "--manipulation", "hflip,blur:0.5", "--map", "identity,linear,local", "--out", str(out)]
    assert cli.main(argv) == 0
    rows = rows_of(out)
    assert [(r["task"], r["map"]) for r in rows] == [(t, m) for t in ("hflip:1", "blur:0.5")
                                                     for m in ("identity", "linear", "local")]
    by = {(r["task"], r["map"]): r for r in rows}
    for task in ("hflip:1", "blur:0.5"):  # a fitted map beats the unmapped one in feature space
        assert by[(task, "linear")]["r2"] > by[(task, "identity")]["r2"] + 0.2
        assert 1 <= by[(task, "linear")]["effective_rank"] <= 64
    for name in ("maps_hflip_1.png", "maps_blur_0.5.png", "spectrum.png"):
        assert Image.open(out / name).width > 100
    saved = sorted(p.name for p in (out / "maps").iterdir())
    assert saved == ["blur_0.5_linear.safetensors", "blur_0.5_local.safetensors", "hflip_1_linear.safetensors",
                     "hflip_1_local.safetensors"]
    assert cli.main(argv) == 0  # a rerun into its own output folder

    applied = tmp_path / "applied"
    assert cli.main(["maps", *demo, *FAST, "--map-file", str(out / "maps" / "blur_0.5_linear.safetensors"),
                     "--out", str(applied)]) == 0
    (row,) = rows_of(applied)
    assert row["task"] == "blur:0.5" and row["map"] == "linear"
    assert row["r2"] == pytest.approx(by[("blur:0.5", "linear")]["r2"], abs=1e-5)  # same map, same held-out digits
    assert (applied / "maps_blur_0.5.png").exists() and not (applied / "maps").exists()

    other = tmp_path / "other.safetensors"   # a map made for 16-channel maps, offered to the 64-channel demo
    x = torch.randn(40, 16, 2, 2)
    fmap = fit_map("linear", lambda: [(x[:30], x[:30])], (x[30:], x[30:]))
    save_map(fmap, other, about={"manipulation": "hflip:1"})
    capsys.readouterr()
    assert cli.main(["maps", *demo, *FAST, "--map-file", str(other), "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the pair's log lines: one error line
    assert err.startswith(f"featinv maps: error: {other}: the map takes 16x2x2 maps"), err
    assert "the demo pair's backbone gives 64x2x2" in err, err
    assert not (tmp_path / "refused").exists()


def test_a_second_network_and_folder_pairs(quick_demo_out, tmp_path, capsys):
    from featinv.demo.digits import load_digits_split

    demo = ["--demo-out", str(quick_demo_out)]
    out = tmp_path / "net"
    assert cli.main(["maps", *demo, *FAST, "--source-backbone", "digits-b", "--map", "linear", "--out", str(out)]) == 0
    (row,) = rows_of(out)
    assert row["task"].startswith("digits-b -> ") and row["r2"] > 0.3
    assert 0 <= row["source_agreement_mapped"] <= 1 and 0 <= row["source_agreement_own"] <= 1
    (saved,) = (out / "maps").iterdir()
    again = tmp_path / "net_again"
    assert cli.main(["maps", *demo, *FAST, "--map-file", str(saved), "--out", str(again)]) == 0
    assert rows_of(again)[0]["r2"] == pytest.approx(row["r2"], abs=1e-5)

    before, after = tmp_path / "before", tmp_path / "after"
    before.mkdir(), after.mkdir()
    digits = load_digits_split(8)["x_test"][:15, 0]
    for i, d in enumerate(digits):
        Image.fromarray((d * 255).byte().numpy()).convert("RGB").save(before / f"d{i:02d}.png")
        Image.fromarray(((1 - d) * 255).byte().numpy()).convert("RGB").save(after / f"d{i:02d}.png")
    Image.new("RGB", (8, 8)).save(before / "alone.png")
    capsys.readouterr()
    pairs = tmp_path / "pairs"
    assert cli.main(["maps", *demo, *FAST, "--before", str(before), "--after", str(after), "--map", "identity,linear",
                     "--out", str(pairs)]) == 0
    assert "alone.png" in capsys.readouterr().err  # the unpaired file is named as skipped
    rows = rows_of(pairs)
    assert [r["task"] for r in rows] == ["folder pairs"] * 2 and rows[1]["r2"] > rows[0]["r2"]
