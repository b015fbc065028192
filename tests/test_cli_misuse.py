"""Misuse of every command, as a new user makes it: one line naming the flag (or file) at fault, exit 2, at once
(before any model loads or the demo pair trains), and no file written or changed. `--help` and a bad flag do not
even import torch, timm or Lightning."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from featinv.analysis.concepts import ConceptBasis
from featinv.analysis.shards import write_shards
from featinv.cli import COMMANDS, main

HEAVY = ("torch", "timm", "pytorch_lightning", "lightning")


def test_help_and_a_bad_flag_import_no_torch_timm_or_lightning():
    """In one fresh process: every command's --help, then a bad flag; after each, none of the heavy
    libraries is loaded (the parse-then-run split of featinv.commands._common.command)."""
    code = f"""
import sys
from featinv.cli import main
for name in {sorted(COMMANDS)!r}:
    for extra in (["--help"], ["--no-such-flag"]):
        try:
            code = main([name, *extra])
        except SystemExit as e:
            code = e.code
        assert code == (0 if extra == ["--help"] else 2), (name, extra, code)
        loaded = [m for m in {HEAVY!r} if m in sys.modules]
        assert not loaded, (name, extra, loaded)
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


@pytest.fixture()
def files(tmp_path):
    """The things a user points flags at: a folder, a text file named like an image, a real image, a
    basis of NaNs, a basis of 3 concepts in 16 channels, a garbage checkpoint; plus the demo folder that must never
    be made."""
    from PIL import Image

    (tmp_path / "folder").mkdir()
    (tmp_path / "notimage.png").write_text("not an image")
    Image.new("RGB", (8, 8), "white").save(tmp_path / "one.png")
    basis = ConceptBasis(torch.full((3, 16), float("nan")), "pca", torch.zeros(16), 1.0, 0.1, "test")
    basis.save(tmp_path / "nan.safetensors")
    ConceptBasis(torch.eye(16)[:3], "pca", torch.zeros(16), 1.0, 0.0, "test").save(tmp_path / "c16.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 64)
    (tmp_path / "recon").mkdir()  # a folder that is not a reconstruction folder
    write_shards([torch.zeros(10, 16)], tmp_path / "shards16")  # vectors of 16 channels, with shards.json
    write_shards([torch.zeros(10, 16)], tmp_path / "gone", shard_rows=5)
    (tmp_path / "gone" / "shard_00001.npy").unlink()               # listed in shards.json, missing
    (tmp_path / "cut").mkdir()
    np.save(tmp_path / "cut" / "a.npy", np.zeros((10, 16), np.float32))
    (tmp_path / "cut" / "a.npy").write_bytes((tmp_path / "cut" / "a.npy").read_bytes()[:-8])   # truncated
    torch.save({"encoder.final_block.0.weight": torch.zeros(8, 16), "encoder.final_block.0.bias": torch.zeros(8),
                "dictionary._weights": torch.ones(8, 16)}, tmp_path / "sae.pt")   # an Overcomplete TopKSAE's keys
    return tmp_path


# (argv, phrases the one error line must contain); F/ = a path under the `files` fixture,
# every analysis writes to F/out and runs on the demo pair under F/demo unless it names a checkpoint; TINY = a random
# tiny checkpoint and its images, for the checks that need the model (the `tiny` fixture, made only when used)
ANALYSIS = ["--out", "F/out", "--demo-out", "F/demo"]
EDIT = ["--edit", "set:F/c16.safetensors:0"]
CASES = [
    (["steer", "--mask-image", "F/notimage.png", *ANALYSIS], ["--mask-image", "not an image"]),
    (["steer", "--mask-image", "F/folder", *ANALYSIS], ["--mask-image", "is a folder"]),
    (["steer", "--mask-image", "F/missing.png", *ANALYSIS], ["--mask-image", "not found"]),
    (["steer", "--direction", "class:x", *ANALYSIS], ["--direction", "class:<i>"]),
    (["steer", "--direction", "bogus:1", *ANALYSIS], ["--direction", "unknown kind"]),
    (["steer", "--direction", "concept:F/nan.safetensors:0", *ANALYSIS], ["--direction", "non-finite"]),
    (["steer", "--direction", "concept:F/folder:0", *ANALYSIS], ["--direction", "is a folder"]),
    (["steer", "--direction", "mean-diff:F/missing:rest", *ANALYSIS], ["--direction", "not an image folder"]),
    (["steer", "--digits", "11", *ANALYSIS], ["--digits", "0-9"]),
    (["steer", "--edit", "set:F/missing.safetensors:0", *ANALYSIS], ["--edit", "concept basis", "not found"]),
    (["steer", "--edit", "set:F/folder:0", *ANALYSIS], ["--edit", "is a folder"]),
    (["steer", "--edit", "set:F/nan.safetensors:0", *ANALYSIS], ["--edit", "non-finite"]),
    (["steer", "--edit", "set:F/c16.safetensors", *ANALYSIS], ["--edit", "use set:<basis>:<concepts>"]),
    (["steer", "--edit", "move:F/c16.safetensors:0", *ANALYSIS], ["--edit", "unknown kind", "set, swap"]),
    (["steer", "--edit", "swap:F/c16.safetensors:rest:digit3", *ANALYSIS], ["--edit", "'rest' is not an image folder"]),
    (["steer", "--edit", "set:F/c16.safetensors:digit3", "--checkpoint", "F/garbage.safetensors", "--images",
      "F/one.png", *ANALYSIS], ["--edit", "'digit3' is not an image folder"]),
    (["steer", "--edit", "set:F/c16.safetensors:7", *ANALYSIS],
     ["--edit", "concept index 7 out of range", "3 concepts"]),
    (["steer", "--edit", "set:F/c16.safetensors:0", "TINY", *ANALYSIS],
     ["--edit", "was fitted on 16 channels, the feature map has 512"]),
    (["steer", *EDIT, "--direction", "class:1", *ANALYSIS], ["--edit", "not both"]),
    (["steer", *EDIT, "--alphas", "1", *ANALYSIS], ["--alphas", "--levels"]),
    (["steer", *EDIT, "--levels", "nan", *ANALYSIS], ["--levels", "finite"]),
    (["steer", *EDIT, "--levels", "qinf", *ANALYSIS], ["--levels", "finite"]),
    (["steer", *EDIT, "--levels", "q1.5", *ANALYSIS], ["--levels", "[0, 1]"]),
    (["steer", *EDIT, "--levels", "q0.5,high", *ANALYSIS], ["--levels", "'high'"]),
    (["steer", "--levels", "q0.5", *ANALYSIS], ["--levels", "goes with --edit"]),
    (["steer", "--concepts", "2", *ANALYSIS], ["--concepts", "goes with --edit"]),
    (["steer", *EDIT, "--concepts", "2", *ANALYSIS], ["--concepts", "names its concepts"]),
    (["steer", "--edit", "set:F/c16.safetensors:digit3", "--concepts", "4", *ANALYSIS], ["--concepts", "has 3"]),
    (["steer", "--edit", "swap:F/c16.safetensors:digit1:digit3", "--concepts", "0", *ANALYSIS], ["--concepts", ">= 1"]),
    (["steer", "--images", "F/notimage.png", *ANALYSIS], ["--images", "not an image"]),
    (["steer", "--checkpoint", "F/garbage.safetensors", *ANALYSIS], ["--images"]),
    (["steer", "--config", "F/missing.yaml", *ANALYSIS], ["--config", "neither a preset"]),
    (["steer", "--samples", "0", *ANALYSIS], ["--samples", ">= 1"]),
    (["compose", "--images", "F/one.png", "--ops", "paste", *ANALYSIS], ["--images", "at least 2", "A and B"]),
    (["compose", "--channels", "0", *ANALYSIS], ["--channels", ">= 1"]),
    (["compose", "--ops", "melt", *ANALYSIS], ["--ops", "melt"]),
    (["perturb", "--eps", "-1", *ANALYSIS], ["--eps", "> 0"]),
    (["perturb", "--step-size", "0", *ANALYSIS], ["--step-size", "> 0"]),
    (["perturb", "--severities", "4", *ANALYSIS], ["--severities"]),
    (["concepts", "-k", "0", *ANALYSIS], ["-k", ">= 1"]),
    (["concepts", "--method", "svd", *ANALYSIS], ["--method", "invalid choice"]),
    (["concepts", "--basis", "F/folder", *ANALYSIS], ["--basis", "is a folder"]),
    (["concepts", "--basis", "F/nan.safetensors", *ANALYSIS], ["--basis", "non-finite"]),
    (["concepts", "--basis", "F/nan.safetensors", "-k", "3", *ANALYSIS], ["--basis", "not both"]),
    (["concepts", "TINY", "--basis", "F/c16.safetensors", "--out", "F/out"], ["--basis", "fitted on 16 channels"]),
    (["concepts", "--method", "jumprelu", *ANALYSIS], ["--method", "invalid choice"]),
    (["concepts", "--fit-shards", "F/missing", *ANALYSIS], ["--fit-shards", "not found"]),
    (["concepts", "--fit-shards", "F/cut", "--method", "topk", *ANALYSIS], ["--fit-shards", "a.npy", "truncated"]),
    (["concepts", "--fit-shards", "F/gone", "--method", "topk", *ANALYSIS],
     ["--fit-shards", "shard_00001.npy", "is missing"]),
    (["concepts", "--fit-shards", "F/shards16", "--basis", "F/c16.safetensors", *ANALYSIS], ["--fit-shards", "not both"]),
    (["concepts", "TINY", "--fit-shards", "F/shards16", "--method", "topk", "--out", "F/out"],
     ["--fit-shards", "16 channels", "has 512"]),
    (["concepts", "--import-sae", "F/sae.pt", "--sae-type", "jumprelu", "--top-k", "4", *ANALYSIS],
     ["--top-k", "threshold per latent"]),
    (["concepts", "--import-sae", "F/sae.pt", "--sae-type", "jumprelu", *ANALYSIS],
     ["--import-sae", "not an Overcomplete JumpSAE", "missing thresholds"]),
    (["concepts", "--import-sae", "F/sae.pt", "--top-k", "4", "--sae-threshold", "0.5", *ANALYSIS],
     ["--sae-threshold", "batchtopk"]),
    (["concepts", "--import-sae", "F/garbage.safetensors", "--top-k", "4", *ANALYSIS], ["--import-sae", "garbage"]),
    (["demo", "--threads", "-1", "--out", "F/demo"], ["--threads", ">= 0"]),
    (["app", "--port", "99999", "--demo-out", "F/demo"], ["--port", "1-65535"]),
    (["app", "--port", "-1", "--demo-out", "F/demo"], ["--port", "1-65535"]),
    (["app", "--threads", "-1", "--demo-out", "F/demo"], ["--threads", ">= 0"]),
    (["app", "--examples", "F/one.png", "--demo-out", "F/demo"], ["--examples", "is a file"]),
    (["train", "--config", "tiny", "--init", "F/folder", "--run-dir", "F/run"], ["--init", "is a folder"]),
    (["train", "--config", "tiny", "--init", "F/missing.safetensors", "--run-dir", "F/run"], ["--init", "not found"]),
    (["train", "--config", "F/folder", "--init", "F/one.png", "--run-dir", "F/run"], ["--config", "is a folder"]),
    (["train", "--config", "tiny", "--init", "F/one.png", "--data", "F/one.png", "--run-dir", "F/run"],
     ["--data", "is a file"]),
    (["train", "--config", "tiny", "--init", "F/one.png", "--run-dir", "F/run", "train.max_steps=nan"],
     ["train.max_steps", "could not be converted to Integer"]),
    (["reconstruct", "--checkpoint", "F/missing.safetensors", "--data", "F/folder", "--out", "F/out"],
     ["--checkpoint", "not found"]),
    (["reconstruct", "--checkpoint", "F/garbage.safetensors", "--data", "F/missing", "--out", "F/out"],
     ["--data", "not found"]),
    (["reconstruct", "--checkpoint", "F/garbage.safetensors", "--data", "F/folder", "--out", "F/out",
      "--backbone-checkpoint", "F/folder"], ["--backbone-checkpoint", "is a folder"]),
    (["reconstruct", "--checkpoint", "F/garbage.safetensors", "--data", "F/folder", "--out", "F/out",
      "--sampler", "dpmpp_2m", "--eta", "0.5"], ["eta"]),
    (["evaluate", "--out", "F/recon"], ["--out", "not a reconstruction folder"]),
    (["evaluate", "--out", "F/missing"], ["--out", "not found"]),
    (["evaluate", "--out", "F/recon", "--fid-weights", "F/folder"], ["--fid-weights", "is a folder"]),
    (["inspect", "F/nan.safetensors"], ["nan.safetensors", "concept basis"]),
    (["inspect", "F/missing.safetensors"], ["checkpoint", "not found"]),
    (["convert", "F/missing.ckpt", "F/out.safetensors"], ["src", "not found"]),
    (["convert", "F/garbage.safetensors", "F/out.txt"], ["dst", ".safetensors"]),
    (["build-control", "F/garbage.safetensors", "F/out.txt"], ["out", ".safetensors"]),
    (["build-control", "F/garbage.safetensors", "F/out.safetensors", "--config", "F/missing.yaml"],
     ["--config", "neither a preset"]),
    (["export", "F/missing", "F/export"], ["source", "not found"]),
    (["export", "F/folder", "F/export", "--eval", "F/one.png"], ["--eval", "is a file"]),
    (["steer", "--minisd", "F/one.png", *ANALYSIS], ["--minisd", "goes with --checkpoint"]),
    (["app", "--minisd", "F/one.png", "--demo-out", "F/demo"], ["--minisd", "goes with --checkpoint"]),
    (["reconstruct", "--checkpoint", "F/garbage.safetensors", "--minisd", "F/missing.ckpt", "--data", "F/folder",
      "--out", "F/out"], ["--minisd", "not found"]),
    (["steer", "TINY", "--minisd", "F/garbage.safetensors", *ANALYSIS],
     ["tiny.safetensors", "besides the control branch", "drop --minisd"]),
    (["maps", "--manipulation", "spin", *ANALYSIS], ["--manipulation", "'spin'", "choose from"]),
    (["maps", "--manipulation", "crop:2", *ANALYSIS], ["--manipulation", "crop", "(0, 1]"]),
    (["maps", "--manipulation", "rotate:nan", *ANALYSIS], ["--manipulation", "finite"]),
    (["maps", "--map", "linear,cubic", *ANALYSIS], ["--map", "choose from identity"]),
    (["maps", "--before", "F/folder", *ANALYSIS], ["--before/--after", "both folders"]),
    (["maps", "--before", "F/folder", "--after", "F/folder", "--manipulation", "hflip", *ANALYSIS],
     ["--before", "not with --manipulation"]),
    (["maps", "--map-file", "F/garbage.safetensors", *ANALYSIS], ["--map-file", "not a readable safetensors"]),
    (["maps", "--map-file", "F/c16.safetensors", *ANALYSIS], ["--map-file", "holds no featinv map"]),
    (["maps", "--before", "F/folder", "--after", "F/recon", *ANALYSIS], ["--before/--after", "no image pairs"]),
    (["convert", "F/garbage.safetensors", "F/out.safetensors", "--minisd", "F/missing.ckpt"], ["--minisd", "not found"]),
    (["convert", "F/garbage.safetensors", "F/out.safetensors", "--minisd", "F/one.png", "--trust-pickle"],
     ["--trust-pickle", "not with --minisd"]),
]


def tree(root) -> dict:
    """Every path under ``root`` with its size and modification time."""
    return {os.path.join(d, n): (os.stat(os.path.join(d, n)).st_size, os.stat(os.path.join(d, n)).st_mtime_ns)
            for d, dirs, names in os.walk(root) for n in names + dirs}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> list[str]:
    from analysis_helpers import tiny_checkpoint

    t = tiny_checkpoint(tmp_path_factory.mktemp("tiny"))
    return ["--checkpoint", str(t["ckpt"]), "--backbone", "resnet18", "--backbone-checkpoint", str(t["bb_file"]),
            "--backbone-size", "64", "--device", "cpu", "--images", str(t["photos"] / "thing")]


@pytest.mark.parametrize("argv, phrases", CASES, ids=[" ".join(a[:3]) for a, _ in CASES])
def test_misuse_is_one_line_exit_2_and_writes_nothing(argv, phrases, files, capsys, request):
    argv = [a.replace("F/", f"{files}/") for a in argv]
    if "TINY" in argv:
        i = argv.index("TINY")
        argv[i:i + 1] = request.getfixturevalue("tiny")
    before = tree(files)
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"featinv {argv[0]}: error: "), captured.err
    assert all(p in lines[0] for p in phrases), lines[0]
    assert captured.out == ""
    assert tree(files) == before  # nothing written, nothing changed, no demo pair trained


def test_help_says_what_the_commands_do(tmp_path, capsys):
    """Help texts agree with the behaviour: what concepts --out holds, steer's and the app's one default clamp."""
    from featinv.app.session import CLAMPS
    from featinv.commands import concepts, steer
    from featinv.config import STEER_CLAMP

    with pytest.raises(SystemExit):
        concepts.parse(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ("--out OUT output folder: concepts.png, concepts.safetensors (the basis), table.md, table.json, atlas.html "
            "and index.json") in text
    assert all(f"{name} " in text for name in ("nmf", "dict", "pca", "kmeans"))  # the methods, from the registry
    args = steer.parse(["--out", str(tmp_path / "o"), "--demo-out", str(tmp_path / "d")])
    assert args.clamp == STEER_CLAMP and STEER_CLAMP in CLAMPS.values()
    with pytest.raises(SystemExit):
        steer.parse(["--help"])
    assert "the app's Steer panel starts from the same (default: channel)" in " ".join(capsys.readouterr().out.split())


def test_readme_says_the_disk_the_install_needs_and_the_cpu_only_line():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "about 6 GB" in readme and "--index-url https://download.pytorch.org/whl/cpu" in readme
