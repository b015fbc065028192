"""Building the initial FeatInv checkpoint from a (tiny) miniSD checkpoint."""
from __future__ import annotations

import pytest
import torch
from conftest import Evil, write_ldm_checkpoint
from safetensors.torch import load_file

from featinv.checkpoint.build_control import build_control
from featinv.checkpoint.layout import CheckpointError
from featinv.checkpoint.load import load_featinv
from featinv.commands.build_control import main


def test_copied_tensors_equal_and_new_ones_as_specified(tiny_minisd, tmp_path, capsys):
    out = tmp_path / "init.safetensors"
    assert main([str(tiny_minisd), str(out), "--hint-channels", "24"]) == 0
    printed = capsys.readouterr().out
    assert "checked equal" in printed and str(out) in printed
    src, sd = load_file(tiny_minisd), load_file(out)
    copied = [k for k in sd if k.startswith("control_model.") and "model.diffusion_model." + k[14:] in src]
    new = [k for k in sd if k.startswith("control_model.") and k not in set(copied)]
    assert copied and all(torch.equal(sd[k], src["model.diffusion_model." + k[14:]]) for k in copied)
    assert sorted({k.split(".")[1] for k in copied}) == ["input_blocks", "middle_block", "time_embed"]
    zero = [k for k in new if "zero_convs" in k or "middle_block_out" in k or "input_hint_block.block.5" in k]
    assert len(new) == 2 * 5 + 6 and all(sd[k].abs().sum() == 0 for k in zero)
    assert sd["control_model.input_hint_block.block.1.weight"].shape[1] == 24
    assert sd["control_model.input_hint_block.block.1.weight"].std() > 0  # default init, not zero
    for k, v in src.items():  # everything else is carried over unchanged
        assert torch.equal(sd[k], v), k
    model = load_featinv(out)  # and it loads strictly, config from the metadata
    assert model.cfg.adapter.in_channels == 24


def test_refuses_to_overwrite_and_rejects_wrong_input(tiny_minisd, tmp_path):
    out = tmp_path / "init.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        build_control(tiny_minisd, out)
    assert out.read_bytes() == b"precious"
    featinv_ckpt = tmp_path / "featinv.safetensors"
    build_control(tiny_minisd, featinv_ckpt)
    with pytest.raises(CheckpointError, match="already holds a control branch"):
        build_control(featinv_ckpt, tmp_path / "again.safetensors")
    broken = tmp_path / "broken.safetensors"
    sd = load_file(tiny_minisd)
    sd.pop("model.diffusion_model.out.2.weight")
    from safetensors.torch import save_file
    save_file(sd, broken)
    with pytest.raises(CheckpointError, match=r"UNet: 1 missing: model\.diffusion_model\.out\.2\.weight"):
        build_control(broken, tmp_path / "x.safetensors", cfg=load_featinv(featinv_ckpt).cfg)
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        build_control(tmp_path / "nope.ckpt", tmp_path / "y.safetensors")


def test_ldm_era_minisd_is_read_and_code_refused(tiny_minisd, tmp_path):
    minisd = {k: v for k, v in load_file(tiny_minisd).items()}
    report = build_control(write_ldm_checkpoint(tmp_path / "minisd.ckpt", minisd), tmp_path / "a.safetensors",
                           hint_channels=16)
    assert report["copied"] > 0 and load_featinv(tmp_path / "a.safetensors").cfg.adapter.in_channels == 16
    marker = tmp_path / "code_ran"
    evil = write_ldm_checkpoint(tmp_path / "evil.ckpt", minisd, hyper_parameters=Evil(marker))
    with pytest.raises(CheckpointError, match="arbitrary code"):
        build_control(evil, tmp_path / "b.safetensors", hint_channels=16)
    assert not marker.exists() and not (tmp_path / "b.safetensors").exists()
