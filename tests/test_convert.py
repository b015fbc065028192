"""``featinv convert``: a checkpoint as safetensors; a pickle needing code only with --trust-pickle."""
from __future__ import annotations

import argparse

import torch
from conftest import Evil, write_ldm_checkpoint
from safetensors.torch import load_file

from featinv.cli import main as cli_main


def test_convert_ldm_checkpoint(tiny_sd, tmp_path, capsys):
    src = write_ldm_checkpoint(tmp_path / "ldm.ckpt", tiny_sd)
    assert cli_main(["convert", str(src), str(tmp_path / "out.safetensors")]) == 0
    out = load_file(tmp_path / "out.safetensors")
    assert out.keys() == tiny_sd.keys() and all(torch.equal(out[k], v) for k, v in tiny_sd.items())
    assert "wrote" in capsys.readouterr().out
    assert cli_main(["convert", str(src), str(tmp_path / "out.safetensors")]) == 2  # refuses to overwrite
    assert capsys.readouterr().err.startswith("featinv convert: error: ")


def test_code_needs_trust_pickle(tiny_sd, tmp_path, capsys):
    marker = tmp_path / "code_ran"
    evil = write_ldm_checkpoint(tmp_path / "evil.ckpt", tiny_sd, hyper_parameters=Evil(marker))
    assert cli_main(["convert", str(evil), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("featinv convert: error: ") and err.count("\n") == 1 and "--trust-pickle" in err
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()
    trusted = tmp_path / "trusted.ckpt"
    torch.save({"state_dict": tiny_sd, "hyper_parameters": argparse.Namespace(lr=1e-5)}, trusted)
    assert cli_main(["convert", str(trusted), str(tmp_path / "out.safetensors"), "--trust-pickle"]) == 0
    assert load_file(tmp_path / "out.safetensors").keys() == tiny_sd.keys()
