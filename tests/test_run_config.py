"""What a run records is what it ran: the effective config, and where reconstruct finds the backbone."""
from __future__ import annotations

import json

import pytest

from featinv.build_control import build_control
from featinv.cli import main
from featinv.config import PRESETS
from featinv.config_file import load_config
from featinv.training import check_init_channels, effective_config


def error_line(capsys, name: str) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"featinv {name}: error: "), lines
    return lines[0]


def test_effective_config_round_trips_through_yaml(tmp_path):
    from omegaconf import OmegaConf

    cfg = effective_config(PRESETS["tiny"], 512)
    assert PRESETS["tiny"].model.adapter.in_channels == 16 and cfg.model.adapter.in_channels == 512
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    assert load_config(str(tmp_path / "config.yaml")) == cfg


def test_init_built_for_another_backbone_names_build_controls_flag(tiny_minisd, tmp_path):
    init = tmp_path / "init.safetensors"
    build_control(tiny_minisd, init, hint_channels=1024)  # what build-control's default convnext_base gives
    with pytest.raises(ValueError, match=r"1024-channel .* 'resnet18' gives 512 .*--backbone resnet18"):
        check_init_channels(init, 512, "resnet18")
    check_init_channels(init, 1024, "convnext_base")  # the matching backbone passes


def test_reconstruct_without_a_known_backbone_names_the_flag(tiny_job, tmp_path, capsys):
    out = tmp_path / "out"  # tiny_job's checkpoint has no config.yaml beside it
    assert main(["reconstruct", "--checkpoint", str(tiny_job["ckpt"]), "--data", str(tiny_job["root"]),
                 "--out", str(out)]) == 2
    assert "pass --backbone" in error_line(capsys, "reconstruct") and not out.exists()
    assert main(["reconstruct", "--checkpoint", str(tiny_job["ckpt"]), "--run-dir", str(tmp_path),
                 "--data", str(tiny_job["root"]), "--out", str(out)]) == 2
    line = error_line(capsys, "reconstruct")
    assert "--run-dir" in line and "config.yaml" in line


def test_evaluate_without_a_known_backbone_names_the_flag(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text(json.dumps({"backbone": None}))
    assert main(["evaluate", "--out", str(tmp_path), "--no-fid"]) == 2
    assert "pass --backbone" in error_line(capsys, "evaluate")
