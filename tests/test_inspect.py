"""``featinv inspect``: what a checkpoint holds, which config it matches, whether it loads."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import Evil, write_ldm_checkpoint
from safetensors.torch import save_file

from featinv.checkpoint.config_file import to_dict
from featinv.checkpoint.inspect import describe, match_preset
from featinv.checkpoint.layout import CheckpointError
from featinv.checkpoint.load import load_into, save_featinv
from featinv.cli import main as cli_main
from featinv.commands.inspect import main
from featinv.config import PRESETS, AdapterConfig
from featinv.nets.model import FeatInv

TINY = PRESETS["tiny"].model
FULL = PRESETS["featinv_convnext"].model
TINY_COUNTS = {"unet": 985_444, "control": 3_052_384, "vae": 658_375, "text_encoder": 1_592_128, "schedule": 13_000}


@pytest.fixture(scope="module")
def files(tiny_sd, tmp_path_factory):
    """The tiny fixture as .safetensors, as a Lightning .ckpt, and a miniSD-only file."""
    root = tmp_path_factory.mktemp("inspect")
    save_file(tiny_sd, root / "tiny.safetensors")
    torch.save({"state_dict": tiny_sd, "epoch": 3, "global_step": 1200, "optimizer_states": [{}]}, root / "tiny.ckpt")
    save_file({k: v for k, v in tiny_sd.items() if not k.startswith("control_model.")}, root / "minisd.safetensors")
    return root


@pytest.fixture()
def ref_model_file(tiny_sd, tmp_path):
    """The tiny model saved by save_featinv (config in the metadata)."""
    model = FeatInv(TINY)
    load_into(model, tiny_sd)
    return save_featinv(model, tmp_path / "featinv.safetensors")


@pytest.mark.parametrize("name", ["tiny.safetensors", "tiny.ckpt"])
def test_full_featinv_file(files, name):
    info = describe(files / name)
    assert info["tensors"] == 483 and info["values"] == 6_301_331 and info["dtypes"] == {"float32": 483}
    assert info["kind"].startswith("full FeatInv")
    assert {c: e["params"] for c, e in info["components"].items()} == TINY_COUNTS
    assert info["components"]["control"]["adapter_params"] == 2_581_536
    assert info["config"]["preset"] == "tiny" and info["config"]["source"].startswith("inferred")
    assert info["config"]["model"] == to_dict(TINY)
    assert info["strict_load"]["full"] == {"ok": True, "problems": None}
    assert "present_components" not in info["strict_load"]


def test_format_and_training_state(files):
    st, ck = describe(files / "tiny.safetensors"), describe(files / "tiny.ckpt")
    assert st["format"] == "safetensors" and st["training"] is None
    assert "zip archive" in ck["format"] and "state_dict" in ck["format"]
    assert ck["training"] == {"epoch": 3, "global_step": 1200, "optimizer_states": 1, "other_entries": []}


def test_minisd_file(files):
    info = describe(files / "minisd.safetensors")
    assert info["kind"].startswith("miniSD") and "control" not in info["components"]
    assert info["config"]["preset"] == "tiny"  # adapter fields are unknown without a control branch
    full = info["strict_load"]["full"]
    assert not full["ok"] and "control branch: 118 missing" in full["problems"]
    assert info["strict_load"]["present_components"]["ok"]


def test_metadata_config_and_mismatch(ref_model_file):
    info = describe(ref_model_file)
    assert info["config"]["source"] == "file metadata" and info["config"]["preset"] == "tiny"
    # the same file checked against another config: the grouped problems are reported
    info = describe(ref_model_file, "featinv_convnext")
    assert info["config"]["source"].startswith("given") and info["config"]["preset"] == "featinv_convnext"
    problems = info["strict_load"]["full"]["problems"]
    assert not info["strict_load"]["full"]["ok"] and "UNet:" in problems and "mis-shaped" in problems


def test_failed_strict_load_exits_1(ref_model_file, capsys):
    assert main([str(ref_model_file)]) == 0
    assert main([str(ref_model_file), "--config", "featinv_convnext"]) == 1
    assert "strict load as a full FeatInv model: FAILS" in capsys.readouterr().out


def test_own_training_checkpoint_layout(tiny_sd, tmp_path):
    # FeatInvModule checkpoints: trainable weights only, under the module's `model.` attribute
    control = {"model.control." + k[len("control_model."):]: v for k, v in tiny_sd.items()
               if k.startswith("control_model.")}
    torch.save({"state_dict": control, "global_step": 50, "featinv": {"model": to_dict(TINY)}}, tmp_path / "s.ckpt")
    info = describe(tmp_path / "s.ckpt")
    assert info["key_prefix_stripped"] == "model." and info["kind"] == "partial: control branch only"
    assert info["config"]["source"].startswith("training checkpoint") and info["config"]["preset"] == "tiny"
    assert info["strict_load"]["present_components"]["ok"] and not info["strict_load"]["full"]["ok"]


def test_match_preset():
    assert match_preset(FULL) == "featinv_convnext"
    assert match_preset(dataclasses.replace(FULL, unet=dataclasses.replace(FULL.unet, gradient_checkpointing=True))) \
        == "featinv_convnext"
    wide = dataclasses.replace(FULL, adapter=AdapterConfig(in_channels=2048))
    assert match_preset(wide) == "featinv_convnext with adapter.in_channels=2048"
    assert match_preset(wide, has_control=False) == "featinv_convnext"
    assert match_preset(dataclasses.replace(FULL, unet=dataclasses.replace(FULL.unet, model_channels=256))) is None


def test_unknown_keys_and_no_config(tmp_path):
    save_file({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "other.safetensors")
    info = describe(tmp_path / "other.safetensors")
    assert info["kind"].startswith("unrecognised") and info["components"]["other"]["tensors"] == 1
    assert info["config"]["model"] is None and "cannot infer" in info["config"]["error"]
    assert info["strict_load"] is None


def test_cli_table_and_json(files, capsys):
    assert cli_main(["inspect", str(files / "tiny.ckpt")]) == 0
    out = capsys.readouterr().out
    for text in ("full FeatInv", "matches tiny", "control branch", "of which adapter", "3,052,384",
                 "epoch=3", "strict load as a full FeatInv model: OK"):
        assert text in out, text
    assert main([str(files / "minisd.safetensors"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"].startswith("miniSD") and info["strict_load"]["present_components"]["ok"]


def test_cli_failed_load_prints_problems(files, capsys):
    assert main([str(files / "minisd.safetensors")]) == 0  # a miniSD file: the parts it holds load
    out = capsys.readouterr().out
    assert "FAILS" in out and "control branch: 118 missing" in out
    assert "parts present (UNet, VAE, text encoder): OK" in out


def test_corrupt_file(tmp_path, capsys):
    (tmp_path / "broken.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="broken.safetensors"):
        describe(tmp_path / "broken.safetensors")
    assert main([str(tmp_path / "broken.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "broken.safetensors" in err and "not a readable safetensors file" in err
    assert main([str(tmp_path / "missing.ckpt")]) == 2
    assert "not found" in capsys.readouterr().err


def test_half_precision_file_with_harmless_extras(tiny_sd, tmp_path):
    sd = {k: v.half() for k, v in tiny_sd.items() if not k.startswith("control_model.")}
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["model_ema.decay"] = torch.tensor(0.9999)
    save_file(sd, tmp_path / "sd16.safetensors")
    info = describe(tmp_path / "sd16.safetensors")
    assert info["dtypes"] == {"float16": 365, "int64": 1, "float32": 1}
    assert info["components"]["ignored"]["tensors"] == 2 and info["components"]["unet"]["dtypes"] == ["float16"]
    assert info["kind"].startswith("miniSD") and info["strict_load"]["present_components"]["ok"]


def test_ldm_era_checkpoint_and_code_refused(tiny_sd, tmp_path, capsys):
    info = describe(write_ldm_checkpoint(tmp_path / "ldm.ckpt", tiny_sd))
    assert info["training"]["global_step"] == 88000 and info["strict_load"]["full"]["ok"]
    marker = tmp_path / "code_ran"
    evil = write_ldm_checkpoint(tmp_path / "evil.ckpt", tiny_sd, hyper_parameters=Evil(marker))
    with pytest.raises(CheckpointError, match="arbitrary code"):
        describe(evil)
    assert main([str(evil)]) == 2 and "--trust-pickle" in capsys.readouterr().err
    assert not marker.exists()


def test_non_finite_weights_reported_per_component(tiny_sd, tmp_path, capsys):
    sd = dict(tiny_sd)
    key = "control_model.input_hint_block.block.1.weight"
    sd[key] = sd[key].clone()
    sd[key].view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    save_file(sd, tmp_path / "nan.safetensors")
    info = describe(tmp_path / "nan.safetensors")
    assert {c: e["nonfinite"] for c, e in info["components"].items() if e["nonfinite"]} == {"control": 3}
    assert info["components"]["control"]["nonfinite_first"] == key
    assert main([str(tmp_path / "nan.safetensors")]) == 0
    assert f"control branch 3 (first {key})" in capsys.readouterr().out
