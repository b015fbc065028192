"""featinv steer / compose / perturb end to end: pictures and tables written, exit codes, one-line errors."""
from __future__ import annotations

import json

import pytest
from analysis_helpers import tiny_checkpoint
from PIL import Image

from featinv import cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    t = tiny_checkpoint(tmp_path_factory.mktemp("analysis"))
    t["args"] = ["--checkpoint", str(t["ckpt"]), "--backbone", "resnet18", "--backbone-checkpoint", str(t["bb_file"]),
                 "--backbone-size", "64", "--steps", "2", "--device", "cpu"]
    return t


def check_outputs(out, picture: str, rows: int) -> dict:
    image = Image.open(out / picture)
    assert image.width > 64 and image.height > 64
    table = json.loads((out / "table.json").read_text())
    assert len(table["rows"]) == rows
    assert (out / "table.md").read_text().count("\n|") >= rows + 1
    return table


def test_steer_on_a_checkpoint(tiny, tmp_path):
    photos = tiny["photos"]
    args = ["steer", *tiny["args"], "--images", str(photos / "person"), "--alphas", "1,0,2",
            "--direction", f"mean-diff:{photos / 'person'}:{photos / 'thing'}", "--target", "3", "--clamp", "channel",
            "--mask", "0,0,32,64", "--samples", "2", "--out", str(tmp_path / "steer")]
    assert cli.main(args) == 0
    table = check_outputs(tmp_path / "steer", "steer.png", 3)
    assert table["alphas"] == [0.0, 1.0, 2.0] and table["clamp"] == "per channel" and table["masked"]
    assert table["rows"][0]["shift_features"] == 0.0


def test_compose_and_perturb_on_a_checkpoint(tiny, tmp_path):
    photos = tiny["photos"]
    args = ["compose", *tiny["args"], "--images", str(photos / "thing"), str(photos / "animal"),
            "--ts", "0,1", "--channels", "4", "--out", str(tmp_path / "compose")]
    assert cli.main(args) == 0
    table = check_outputs(tmp_path / "compose", "compose.png", 2 + 1 + 2 + 1)
    assert all(-1 <= r["cosine"] <= 1 for r in table["rows"])
    args = ["perturb", *tiny["args"], "--images", str(photos / "thing"), "--corruptions", "blur,jpeg",
            "--severities", "2", "--eps", "0.02", "--pgd-steps", "2", "--out", str(tmp_path / "perturb")]
    assert cli.main(args) == 0
    table = check_outputs(tmp_path / "perturb", "perturb.png", 1 + 2 + 1)
    assert table["rows"][0]["input"] == "clean" and table["rows"][0]["flipped_share"] == 0.0


@pytest.mark.parametrize("command, extra, message", [
    ("steer", ["--alphas", "0,a"], "--alphas: '0,a' is not a comma-separated list of numbers"),
    ("steer", ["--direction", "class:1000"], "--direction: class index 1000 out of range"),
    ("steer", ["--mask", "0,0,65,8"], "--mask: mask box"),
    ("steer", ["--mask-image", "MASK"], "must be 64x64 (the backbone input)"),
    ("steer", ["--direction", "probe:EMPTY:EMPTY"], "no images"),
    ("compose", ["--class", "-1"], "argument --class: must be >= 0, got -1"),
    ("compose", ["--class", "1000"], "--class 1000 out of range"),
    ("compose", ["--channels", "9999"], "--channels: 9999 is more than the feature map's 512 channels"),
    ("compose", ["--ops", "paste,blend"], "--ops: unknown composite(s) ['blend']"),
    ("perturb", ["--severities", "4"], "--severities: '4' must list values from 1, 2, 3"),
    ("perturb", ["--images", "EMPTY"], "no images"),
    ("steer", ["--alphas", "0,nan"], "--alphas: '0,nan' holds nan; every value must be a finite number"),
    ("compose", ["--ts", "0,inf"], "--ts: '0,inf' holds inf"),
    ("perturb", ["--eps", "nan"], "argument --eps: 'nan' is not a finite number"),
    ("steer", ["--samples", "1000"], "argument --samples: 1000 is above the limit of 64 samples per input"),
    ("steer", ["--count", "0"], "argument --count: must be >= 1, got 0"),
])
def test_bad_input_is_one_line_naming_it(tiny, tmp_path, capsys, command, extra, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    Image.new("L", (5, 5), 255).save(tmp_path / "mask.png")
    extra = [e.replace("EMPTY", str(empty)).replace("MASK", str(tmp_path / "mask.png")) for e in extra]
    base = [] if "--images" in extra else ["--images", str(tiny["photos"] / "thing"), str(tiny["photos"] / "animal")]
    assert cli.main([command, *tiny["args"], *base, *extra, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"featinv {command}: error: ") and message in err[-1], err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_commands_on_the_demo_pair(quick_demo_out, tmp_path):
    """The default: no --checkpoint runs on the (cached) demo pair, digits chosen by class."""
    demo = ["--demo-out", str(quick_demo_out)]
    out = tmp_path / "steer"
    assert cli.main(["steer", *demo, "--direction", "mean-diff:digit3:rest", "--digits", "1,7", "--count", "1",
                     "--alphas", "0,1", "--samples", "2", "--clamp", "location", "--out", str(out)]) == 0
    table = check_outputs(out, "steer.png", 2)
    assert table["target"] == 3 and table["rows"][0]["target_features_share"] == 0.0
    assert table["rows"][1]["target_prob_features"] > table["rows"][0]["target_prob_features"]
    assert cli.main(["compose", *demo, "--ops", "interpolate", "--ts", "0,0.5,1", "--out", str(tmp_path / "c")]) == 0
    check_outputs(tmp_path / "c", "compose.png", 3)
    assert cli.main(["perturb", *demo, "--corruptions", "contrast", "--severities", "3", "--out",
                     str(tmp_path / "p")]) == 0
    table = check_outputs(tmp_path / "p", "perturb.png", 3)
    assert table["rows"][-1]["flipped_share"] > 0.5  # the default PGD budget flips most digits


def test_checkpoint_without_run_config_or_backbone_names_the_flag(tiny, tmp_path, capsys):
    """No config.yaml beside the checkpoint and no --backbone: one line naming --backbone, no silent default."""
    assert cli.main(["steer", "--checkpoint", str(tiny["ckpt"]), "--images", str(tiny["photos"] / "thing"),
                     "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("featinv steer: error:") and "--backbone" in err[0]
    assert not (tmp_path / "s").exists()


def bomb_png(path):
    """A PNG header declaring 20000 x 20000 pixels: PIL refuses it as a decompression bomb on open."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def test_a_bomb_image_among_good_ones_is_skipped_with_a_warning(tiny, tmp_path, capsys):
    """In a folder: skipped with a warning; named on the command line: refused before the model loads."""
    (tmp_path / "images").mkdir()
    bomb = bomb_png(tmp_path / "images" / "bomb.png")
    args = ["compose", *tiny["args"], "--images", str(tiny["photos"] / "thing"), str(tmp_path / "images"),
            "--ops", "interpolate", "--ts", "0,1"]
    assert cli.main([*args, "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert f"warning: skipping unreadable image '{bomb}': DecompressionBombError" in err and "Traceback" not in err
    assert len(json.loads((tmp_path / "out" / "table.json").read_text())["rows"]) == 2
    assert "; 1 sample per composite" in (tmp_path / "out" / "table.md").read_text()
    assert cli.main(["steer", *tiny["args"], "--images", str(bomb), "--out", str(tmp_path / "only")]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("featinv steer: error: argument --images: ") and "bomb.png" in line
    assert "cannot be read as an image (DecompressionBombError)" in line


def test_a_users_folder_is_not_overwritten_but_the_commands_own_output_is(tiny, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "table.md").write_text("my notes")
    args = ["compose", *tiny["args"], "--images", str(tiny["photos"] / "thing"), "--ops", "interpolate", "--ts", "0,1",
            "--out", str(out)]
    assert cli.main(args) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "holds files that are not featinv compose's output (table.md)" in line and "--overwrite" in line
    assert (out / "table.md").read_text() == "my notes"
    assert cli.main([*args, "--overwrite"]) == 0 and (out / "table.md").read_text() != "my notes"
    assert cli.main(args) == 0  # now the folder holds compose's own output: rerun replaces it
    assert cli.main(["steer", *args[1:]]) == 2  # but not another command's
