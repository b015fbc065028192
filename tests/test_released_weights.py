"""The authors' released weights used as they come (issue 29), on tiny files in the reference key layout: a
Lightning ``.ckpt`` of the full model, a bare state dict, a control branch shipped alone beside a miniSD
``.ckpt``, and the safetensors file ``featinv convert`` makes. Each gives the same reconstructions, bit for bit,
through ``featinv reconstruct`` and the Python API; the README's released-weights block runs as written (the
file names, config and folders swapped for the tiny ones); a control branch that does not fit is one line, exit 2.

One module-scoped chain (in-process CLI calls, ~1-2 min on 2 cores); each test checks one part of it."""
from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest
import torch
from conftest import write_ldm_checkpoint
from helpers import sample_photos_folder

from featinv.checkpoint.layout import to_reference
from featinv.cli import main as cli_main
from featinv.config import PRESETS, PairSource, SampleConfig
from featinv.testing import random_featinv

README = Path(__file__).resolve().parents[1] / "README.md"
FAST = ["--steps", "2"]  # appended to the README's sampling commands: the tiny chain samples two steps
EXTRA = {"reconstruct": [*FAST, "--per-class", "1", "--batch-size", "2", "--num-workers", "0"],
         "steer": [*FAST, "--device", "cpu"],
         "concepts": [*FAST, "--device", "cpu", "--method", "pca", "-k", "2", "--alphas", "1", "--exemplars", "1"]}
pytestmark = pytest.mark.slow


def readme_block() -> list[list[str]]:
    """The commands of the README's released-weights block (comments and line continuations removed)."""
    text = README.read_text()
    section = text[text.index("## Start from the authors' released weights"):]
    block = section[section.index("```bash") + len("```bash"):section.index("```", section.index("```bash") + 7)]
    block = re.sub(r"\\\n\s*", " ", block)
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def tiny_control(cfg, seed: int) -> dict[str, torch.Tensor]:
    sd = to_reference(dict(random_featinv(cfg, seed=seed).state_dict()), cfg.diffusion)
    return {k: v for k, v in sd.items() if k.startswith("control_model.")}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """The tiny model (resnet18's 512 channels, adapter width 64) in each packing; a YAML config for it."""
    tmp = tmp_path_factory.mktemp("released")
    cfg = PRESETS["tiny"].model
    cfg = dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, in_channels=512, width=64))
    sd = to_reference(dict(random_featinv(cfg, seed=0).state_dict()), cfg.diffusion)
    f = {"tmp": tmp, "sd": sd, "full": write_ldm_checkpoint(tmp / "featinv_full.ckpt", sd),
         "bare": tmp / "bare.pt", "control": tmp / "control.ckpt", "config": tmp / "released.yaml",
         "minisd": write_ldm_checkpoint(tmp / "minisd.ckpt", {k: v for k, v in sd.items()
                                                                if not k.startswith("control_model.")}),
         "photos": sample_photos_folder(tmp / "photos", size=72)}
    torch.save(sd, f["bare"])
    torch.save({"state_dict": {k: v for k, v in sd.items() if k.startswith("control_model.")}, "epoch": 3},
               f["control"])
    narrow = dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, width=32))
    torch.save({"state_dict": tiny_control(narrow, 1)}, tmp / "control_w32.ckpt")
    wide = dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, model_channels=64))
    torch.save(tiny_control(wide, 1), tmp / "control_unet64.pt")
    f["config"].write_text("preset: tiny\nmodel:\n  adapter:\n    in_channels: 512\n    width: 64\n")
    return f


@pytest.fixture(scope="module")
def chain(files) -> dict:
    """The README block on the tiny files, then `featinv reconstruct` on every other packing."""
    tmp, runs = files["tmp"], {}
    swap = {"featinv_convnext.ckpt": str(files["full"]), "featinv_convnext.safetensors": str(tmp / "converted.safetensors"),
            "featinv_convnext": str(files["config"]), "/data/imagenet/val": str(files["photos"]),
            "my_photos": str(files["photos"])}
    for argv in readme_block():
        assert argv[0] == "featinv", argv
        argv = [swap.get(a, a) for a in argv[1:]]
        argv = [str(tmp / a) if a.startswith(("recon_", "steer_", "concepts_")) else a for a in argv]
        name = argv[0]
        if name == "app":  # everything but serving: parse, then load the session the page is built on
            from featinv.commands import app

            runs["app"] = app._session(app.parse(argv[1:] + ["--device", "cpu"]), "cpu")
            continue
        runs.setdefault(name, []).append(cli_main(argv + EXTRA.get(name, [])))
    recon = ["--config", str(files["config"]), "--data", str(files["photos"]), *EXTRA["reconstruct"]]
    for key, source in (("bare", [str(files["bare"])]), ("control", [str(files["control"]), "--minisd", str(files["minisd"])]),
                        ("converted", [str(tmp / "converted.safetensors")])):
        runs[f"recon_{key}"] = cli_main(["reconstruct", "--checkpoint", *source, "--out", str(tmp / f"out_{key}"), *recon])
    return runs


def pngs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.glob("*/reconstructed_*.png"))}


def test_the_readme_block_runs_on_the_tiny_files(chain, files):
    assert {name: codes for name, codes in chain.items() if isinstance(codes, list)} == \
        {"inspect": [0], "reconstruct": [0], "steer": [0], "concepts": [0], "convert": [0]}
    assert chain["app"].pair.model.cfg.adapter.in_channels == 512
    assert (files["tmp"] / "converted.safetensors").is_file()


def test_every_packing_reconstructs_the_same_pixels(chain, files):
    tmp = files["tmp"]
    first = pngs(tmp / "recon_released")
    assert len(first) == 3
    for key in ("bare", "control", "converted"):
        assert chain[f"recon_{key}"] == 0
        assert pngs(tmp / f"out_{key}") == first, key


def test_the_python_api_loads_every_packing_to_the_same_model(chain, files):
    from featinv.pair import load_pair

    sources = [PairSource(checkpoint=str(files["full"]), config=str(files["config"])),
               PairSource(checkpoint=str(files["bare"]), config=str(files["config"])),
               PairSource(checkpoint=str(files["control"]), minisd=str(files["minisd"]), config=str(files["config"])),
               PairSource(checkpoint=str(files["tmp"] / "converted.safetensors"), config=str(files["config"]))]
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    outputs = []
    for source in sources:
        pair = load_pair(source, "cpu")
        assert all(torch.equal(pair.model.state_dict()[k], v) for k, v in
                   load_pair(sources[0], "cpu").model.state_dict().items())
        outputs.append(pair.reconstructor(SampleConfig(steps=2, seed=3))(images, ["a", "b"]))
    assert all(torch.equal(out, outputs[0]) for out in outputs[1:])


def test_the_converted_file_is_the_full_model_and_loads_without_trust_pickle(chain, files):
    from featinv.checkpoint.load import read_state_dict

    for path in (files["tmp"] / "converted.safetensors", files["tmp"] / "paired.safetensors"):
        if not path.exists():
            assert cli_main(["convert", str(files["control"]), str(path), "--minisd", str(files["minisd"])]) == 0
        sd, metadata = read_state_dict(path)
        assert sd.keys() == files["sd"].keys() and all(torch.equal(sd[k], v) for k, v in files["sd"].items())
        assert metadata["featinv_converted_from"] in ("featinv_full.ckpt", "control.ckpt")


@pytest.mark.parametrize("argv, phrases", [
    (["reconstruct", "--checkpoint", "control_w32.ckpt", "--minisd", "minisd.ckpt", "--config", "released.yaml"],
     ["adapter width 32, expected 64", "found (32, 512, 3, 3), expected (64, 512, 3, 3)"]),
    (["reconstruct", "--checkpoint", "control_unet64.pt", "--minisd", "minisd.ckpt", "--backbone", "resnet18"],
     ["control_unet64.pt: its control branch does not fit the UNet of", "found (256, 64), expected (128, 32)"]),
    (["reconstruct", "--checkpoint", "featinv_full.ckpt", "--minisd", "minisd.ckpt", "--backbone", "resnet18"],
     ["featinv_full.ckpt: holds the UNet, VAE, text encoder besides the control branch", "drop --minisd"]),
    (["reconstruct", "--checkpoint", "control.ckpt", "--backbone", "resnet18"],
     ["control.ckpt: holds the control branch alone", "--minisd"]),
    (["convert", "control_unet64.pt", "OUT.safetensors", "--minisd", "minisd.ckpt"],
     ["its control branch does not fit the UNet of", "expected (128, 32)"]),
    (["convert", "minisd.ckpt", "OUT.safetensors", "--minisd", "control.ckpt"],
     ["minisd.ckpt: holds no control branch"]),
], ids=["adapter-width", "other-unet", "full-with-minisd", "control-alone", "convert-other-unet", "convert-swapped"])
def test_a_control_branch_that_does_not_fit_is_one_line_exit_2(argv, phrases, files, capsys):
    tmp = files["tmp"]
    argv = [str(tmp / a) if (tmp / a).exists() or a == "OUT.safetensors" else a for a in argv]
    if argv[0] == "reconstruct":
        argv += ["--data", str(files["photos"]), "--out", str(tmp / "refused"), *EXTRA["reconstruct"]]
    before = sorted(p.name for p in tmp.iterdir())
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"featinv {argv[0]}: error: "), err
    assert all(p in err[0] for p in phrases), err[0]
    assert sorted(p.name for p in tmp.iterdir()) == before


def test_inspect_names_the_presets_that_fit_the_adapter():
    from featinv.checkpoint.inspect import adapter_fit

    fit = adapter_fit({"control_model.input_hint_block.block.1.weight": torch.empty(512, 1024, 3, 3)})
    assert fit["config_presets"] == ["featinv_convnext"] and fit["backbone_presets"] == ["convnext_base", "swinv2"]
    assert adapter_fit({"control_model.input_hint_block.block.1.weight": torch.empty(512, 768, 3, 3)}) == \
        {"in_channels": 768, "width": 512, "config_presets": [], "backbone_presets": ["vit"]}
