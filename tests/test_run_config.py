"""What a run records is what it ran: the effective config, and where reconstruct finds the backbone."""
from __future__ import annotations

import json

import pytest

from featinv.checkpoint.build_control import build_control
from featinv.checkpoint.config_file import load_config
from featinv.cli import main
from featinv.commands._common import one_line
from featinv.config import PRESETS
from featinv.training.loop import check_init_channels, effective_config


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


def _record(run_dir, cfg):
    from omegaconf import OmegaConf

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    return (run_dir / "config.yaml").read_text()


def test_resuming_with_another_config_names_each_field_and_both_values(tmp_path):
    from featinv.checkpoint.config_file import merge
    from featinv.training.run_config import check_resumed_config

    run = tmp_path / "run"
    recorded = effective_config(PRESETS["tiny"], 512)
    _record(run, recorded)
    check_resumed_config(run, merge(recorded, ["train.max_steps=500", "train.log_images_every=7"]))  # may change
    changed = merge(recorded, ["backbone.name=resnet34", "train.lr=0.5", "data.batch_size=2"])
    with pytest.raises(ValueError, match=r"backbone.name: the run trained 'resnet18', now 'resnet34'.*"
                                         r"data.batch_size: the run trained 4, now 2.*train.lr: .*0.0001, now 0.5"):
        check_resumed_config(run, changed)
    with pytest.raises(ValueError, match=r"accept_change train.lr") as err:  # the library names the setting
        check_resumed_config(run, changed, accept=("backbone",))
    assert "--accept-change train.lr" in one_line(err.value)  # the train face names its flag
    check_resumed_config(run, changed, accept=("backbone", "train.lr", "data.batch_size"))
    with pytest.raises(ValueError, match="accept_change: 'train.max_steps' is not a field"):
        check_resumed_config(run, recorded, accept=("train.max_steps",))


def test_a_run_config_that_does_not_parse_is_named_and_kept(tmp_path):
    from featinv.training.run_config import check_resumed_config

    (tmp_path / "config.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'config.yaml'} does not parse .*not rewritten"):
        check_resumed_config(tmp_path, PRESETS["tiny"])
    assert (tmp_path / "config.yaml").read_text() == "model: [unclosed\n"


def test_fewer_images_than_the_batch_size_is_refused_before_training():
    from featinv.training.loop import check_enough_images

    check_enough_images(8, 8, "photos")
    with pytest.raises(ValueError, match=r"--data photos: 3 images < data.batch_size 8, so no training batch"):
        check_enough_images(3, 8, "photos")
    with pytest.raises(ValueError, match=r"8 images < data.batch_size 8 per device \(8 over 2 devices\)"):
        check_enough_images(8, 8, "photos", world_size=2)
