"""Checkpoint layout, strict loading, file formats and atomic saving."""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, Evil, assert_close_rel, write_ldm_checkpoint
from safetensors import safe_open

import featinv.checkpoint.load as ckpt
from featinv.checkpoint.convert import convert_to_safetensors
from featinv.checkpoint.layout import METADATA_KEY, CheckpointError, to_reference
from featinv.checkpoint.load import (
    config_from_metadata,
    infer_model_config,
    load_featinv,
    load_into,
    read_checkpoint,
    read_state_dict,
    save_featinv,
)
from featinv.config import PRESETS, DiffusionConfig
from featinv.nets.model import FeatInv

TINY = PRESETS["tiny"].model
FULL = PRESETS["featinv_convnext"].model


class Opaque:
    """A custom class: unpickling it would need this module's code."""


@pytest.fixture(scope="module")
def full_meta() -> FeatInv:
    """The full FeatInv model without storage (shapes only)."""
    with torch.device("meta"):
        return FeatInv(FULL)


@pytest.fixture(scope="module")
def full_ref_sd(full_meta) -> dict[str, torch.Tensor]:
    """The full model's state dict in the reference layout (meta tensors, real schedule buffers)."""
    return to_reference(full_meta.state_dict(), FULL.diffusion)


@pytest.fixture()
def tiny_model() -> FeatInv:
    return FeatInv(TINY).eval()


@pytest.fixture(scope="module")
def ref_model(tiny_sd) -> FeatInv:
    model = FeatInv(TINY).eval()
    load_into(model, tiny_sd)
    return model


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _eps(model: FeatInv, io: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(io["in_x_noisy"], io["in_t"], io["in_context"], io["in_hint"])


# ----- the full model's key layout ---------------------------------------------------------------------

def test_full_model_has_reference_keys_in_order(full_ref_sd):
    with open(FIXTURES / "featinv_convnext_keys.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert list(full_ref_sd) == [r["key"] for r in rows]
    for r in rows:
        shape = tuple(int(d) for d in r["shape"].split("x"))
        assert tuple(full_ref_sd[r["key"]].shape) == shape, r["key"]


def test_full_model_parameter_counts(full_meta):
    # reference README section 1 (params only)
    assert _params(full_meta.unet) == 859_520_964
    assert _params(full_meta.control) == 368_746_432
    assert _params(full_meta.control.input_hint_block) == 8_553_792
    assert _params(full_meta.vae) == 83_653_863
    assert _params(full_meta.text_encoder) == 123_060_480


def test_infer_model_config(tiny_sd, full_ref_sd):
    assert infer_model_config(tiny_sd) == TINY
    assert infer_model_config(full_ref_sd) == FULL


# ----- strict loading ---------------------------------------------------------------------------------

def test_tiny_state_dict_loads_exactly(tiny_sd, tiny_model):
    assert load_into(tiny_model, tiny_sd) == []
    ours = tiny_model.state_dict()
    assert torch.equal(ours["control.zero_convs.0.0.weight"], tiny_sd["control_model.zero_convs.0.0.weight"])
    assert torch.equal(ours["text_encoder.final_layer_norm.weight"],
                       tiny_sd["cond_stage_model.transformer.text_model.final_layer_norm.weight"])


@pytest.mark.parametrize("edit, group, key, kind", [
    (lambda sd: sd.pop("control_model.zero_convs.0.0.weight"), "control branch",
     "control_model.zero_convs.0.0.weight", "missing"),
    (lambda sd: sd.update({"model.diffusion_model.extra.weight": torch.zeros(3)}), "UNet",
     "model.diffusion_model.extra.weight", "unexpected"),
    (lambda sd: sd.update({"first_stage_model.encoder.conv_in.weight": torch.zeros(32, 3, 5, 5)}), "VAE",
     "first_stage_model.encoder.conv_in.weight", "mis-shaped"),
    (lambda sd: sd.update({"surprise": torch.zeros(1)}), "unrecognised", "surprise", "unexpected"),
], ids=["missing", "unexpected", "mis-shaped", "unknown prefix"])
def test_strict_load_names_group_and_key(tiny_sd, tiny_model, edit, group, key, kind):
    sd = dict(tiny_sd)
    edit(sd)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_into(tiny_model, sd, source="bad.ckpt")
    msg = str(err.value)
    assert "bad.ckpt" in msg and f"{group}: 1 {kind}" in msg and key in msg  # named as in the file
    assert all(torch.equal(v, before[k]) for k, v in tiny_model.state_dict().items()), "failed load changed weights"


def test_mis_shape_names_both_shapes(tiny_sd, tiny_model):
    sd = {**tiny_sd, "first_stage_model.encoder.conv_in.weight": torch.zeros(32, 3, 5, 5)}
    with pytest.raises(CheckpointError, match=r"file \(32, 3, 5, 5\), model \(32, 3, 3, 3\)"):
        load_into(tiny_model, sd)


def test_other_model_fails_with_grouped_mis_shapes(full_ref_sd, tiny_model):
    with pytest.raises(CheckpointError) as err:
        load_into(tiny_model, full_ref_sd)
    lines = str(err.value).splitlines()[1:]
    for group in ("UNet", "control branch", "VAE", "text encoder"):
        line = next((ln for ln in lines if ln.strip().startswith(group + ":")), None)
        assert line is not None and "mis-shaped" in line, f"{group} not reported: {err.value}"
    assert "text encoder" in str(err.value) and "unexpected" in str(err.value)  # layers 1..11


def test_harmless_extras_are_dropped_with_a_note(tiny_sd, tiny_model):
    sd = {**tiny_sd, "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
          "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(0)}
    notes = load_into(tiny_model, sd)
    assert len(notes) == 1 and "3 known harmless" in notes[0] and "position_ids" in notes[0]


def test_transformers5_text_keys_load(tiny_sd, tiny_model):
    old = "cond_stage_model.transformer.text_model."
    sd = {k.replace(old, "cond_stage_model.transformer."): v for k, v in tiny_sd.items()}
    assert not any(k.startswith(old) for k in sd)
    load_into(tiny_model, sd)
    assert torch.equal(tiny_model.text_encoder.embeddings.token_embedding.weight,
                       tiny_sd[old + "embeddings.token_embedding.weight"])


def test_schedule_buffer_must_match_config(tiny_sd, tiny_model):
    sd = {**tiny_sd, "alphas_cumprod": tiny_sd["alphas_cumprod"] * (1 + 1e-3)}
    with pytest.raises(CheckpointError, match="alphas_cumprod"):
        load_into(tiny_model, sd)
    other = FeatInv(dataclasses.replace(TINY, diffusion=DiffusionConfig(linear_end=0.02)))
    with pytest.raises(CheckpointError, match="schedule buffer .* linear_end=0.02"):
        load_into(other, tiny_sd)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoint_loads(tiny_sd, tiny_model, dtype):
    # fp16 / bf16 releases round the schedule buffers too; weights are cast into the fp32 model
    load_into(tiny_model, {k: v.to(dtype) for k, v in tiny_sd.items()})
    w = "model.diffusion_model.out.2.weight"
    assert torch.equal(tiny_model.unet.out[2].weight, tiny_sd[w].to(dtype).float())
    with pytest.raises(CheckpointError, match="schedule buffer"):
        load_into(tiny_model, {**tiny_sd, "betas": (tiny_sd["betas"] * 1.05).to(dtype)})


# ----- file formats -----------------------------------------------------------------------------------

def test_lightning_ckpt_loads(tiny_sd, ref_model, tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": tiny_sd, "epoch": 1, "global_step": 7}, path)
    model = load_featinv(path)
    assert model.cfg == TINY  # inferred from shapes
    for k, v in ref_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_plain_pt_and_legacy_pickle_load(tiny_sd, tmp_path):
    for name, zip_format in (("plain.pt", True), ("legacy.pth", False)):
        torch.save(tiny_sd, tmp_path / name, _use_new_zipfile_serialization=zip_format)
        sd, metadata = read_state_dict(tmp_path / name)
        assert metadata == {} and sd.keys() == tiny_sd.keys()
        assert torch.equal(sd["control_model.middle_block_out.0.weight"],
                           tiny_sd["control_model.middle_block_out.0.weight"])
    load_featinv(tmp_path / "plain.pt", TINY)


def test_safetensors_round_trip(tiny_sd, tiny_io, ref_model, tmp_path):
    path = save_featinv(ref_model, tmp_path / "out" / "featinv.safetensors", {"note": "test"})
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(tiny_sd)  # the reference layout, schedule buffers included
        metadata = f.metadata()
        for k in ("control_model.input_hint_block.block.5.weight", "model.diffusion_model.out.2.weight", "betas"):
            assert torch.equal(f.get_tensor(k), tiny_sd[k]), k
    assert metadata["note"] == "test"
    assert config_from_metadata(metadata) == TINY
    assert json.loads(metadata[METADATA_KEY])["unet"]["model_channels"] == 32
    model = load_featinv(path)
    assert model.cfg == TINY
    assert_close_rel(_eps(model.eval(), tiny_io), tiny_io["eps_ctrl"], name="eps_ctrl after reload")


def test_metadata_config_wins_over_shapes(ref_model, tmp_path):
    # Heads are invisible in shapes: a file saved with 1 head must come back with 1 head.
    cfg = dataclasses.replace(TINY, unet=dataclasses.replace(TINY.unet, num_heads=1))
    model = FeatInv(cfg)
    model.load_state_dict(ref_model.state_dict())
    assert load_featinv(save_featinv(model, tmp_path / "h1.safetensors")).cfg.unet.num_heads == 1


@pytest.mark.parametrize("payload", [Opaque(), argparse.Namespace(lr=1e-5)], ids=["custom class", "Namespace"])
def test_pickle_needing_code_is_refused(tiny_sd, tmp_path, payload):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": tiny_sd, "hyper_parameters": payload}, path)
    with pytest.raises(CheckpointError, match="arbitrary code") as err:
        read_state_dict(path)
    assert "weights_only" in str(err.value) and str(path) in str(err.value)


def test_ldm_era_checkpoint_loads_without_running_its_globals(tiny_sd, ref_model, tmp_path):
    path = write_ldm_checkpoint(tmp_path / "ldm.ckpt", tiny_sd)
    model = load_featinv(path)
    for k, v in ref_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    _, _, container = read_checkpoint(path)
    assert container["global_step"] == 88000
    (key, state), = container["callbacks"].items()
    assert isinstance(key, type) and key.__name__.startswith("Inert[")  # a stand-in, not Lightning's class
    assert type(state["best_model_score"]).__name__.startswith("Inert[numpy")


@pytest.mark.parametrize("where", ["top level", "callback state"])
def test_code_in_an_ldm_era_pickle_is_still_refused(tiny_sd, tmp_path, where):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.ckpt"
    if where == "top level":
        write_ldm_checkpoint(path, tiny_sd, hyper_parameters=Evil(marker))
    else:
        from pytorch_lightning.callbacks.model_checkpoint import ModelCheckpoint
        torch.save({"state_dict": tiny_sd, "callbacks": {ModelCheckpoint: {"x": Evil(marker)}}}, path)
    for read in (read_state_dict, load_featinv, lambda p: convert_to_safetensors(p, tmp_path / "out.safetensors")):
        with pytest.raises(CheckpointError, match=r"arbitrary code[\s\S]*featinv convert .* --trust-pickle"):
            read(path)
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def test_convert_trusted_pickle_to_safetensors(tiny_sd, ref_model, tmp_path):
    path = tmp_path / "needs_code.ckpt"
    torch.save({"state_dict": tiny_sd, "hyper_parameters": argparse.Namespace(lr=1e-5)}, path)
    report = convert_to_safetensors(path, tmp_path / "out.safetensors", trust_pickle=True)
    assert report["tensors"] == len(tiny_sd)
    model = load_featinv(tmp_path / "out.safetensors")
    for k, v in ref_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


@pytest.mark.parametrize("name, content, message", [
    ("garbage.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json", "not a readable safetensors"),
    ("empty.safetensors", b"", "not a readable safetensors"),
    ("garbage.ckpt", b"this is not a checkpoint", "not a checkpoint"),
])
def test_corrupt_files_give_clear_errors(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as err:
        read_state_dict(tmp_path / name)
    assert name in str(err.value)


def test_truncated_torch_file(tiny_sd, tmp_path):
    torch.save(tiny_sd, tmp_path / "full.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match="cut.pt.*(damaged|truncated|corrupt)"):
        read_state_dict(tmp_path / "cut.pt")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        load_featinv(tmp_path / "nothing.safetensors")


def test_non_state_dict_is_refused(tmp_path):
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="expected a state dict"):
        read_state_dict(tmp_path / "list.pt")


def test_save_is_atomic(ref_model, tmp_path, monkeypatch):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"previous good file")

    def failing_writer(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", failing_writer)
    with pytest.raises(OSError, match="disk full"):
        save_featinv(ref_model, target)
    assert target.read_bytes() == b"previous good file"
    assert [p.name for p in tmp_path.iterdir()] == [target.name], "temporary file left behind"
    with pytest.raises(OSError):
        save_featinv(ref_model, tmp_path / "new.safetensors")
    assert not (tmp_path / "new.safetensors").exists()


def test_non_finite_weights_are_refused_with_the_first_key(tiny_sd, tmp_path):
    sd = dict(tiny_sd)
    key = "model.diffusion_model.out.2.weight"
    sd[key] = sd[key].clone()
    sd[key][0, 0, 0, 0] = float("nan")
    path = tmp_path / "diverged.safetensors"
    ckpt.save_file(sd, str(path))
    with pytest.raises(ValueError, match=rf"diverged.safetensors: 1 non-finite .* first '{key}'") as err:
        load_featinv(path)
    assert "\n" not in str(err.value)


def test_safetensors_are_mapped_and_assigned_not_copied(tiny_sd, tmp_path):
    from featinv.checkpoint.tensor_files import read_safetensors

    odd = {"bf16": torch.randn(3, 5).bfloat16(), "mask": torch.rand(7) > 0.5, "ids": torch.arange(9),
           "empty": torch.zeros(0, 4), "half": torch.randn(3).half()}
    ckpt.save_file({**tiny_sd, **odd}, str(tmp_path / "all.safetensors"), metadata={"a": "b"})
    sd, metadata = read_safetensors(tmp_path / "all.safetensors")
    from safetensors.torch import load_file
    ref = load_file(tmp_path / "all.safetensors")
    assert metadata == {"a": "b"} and sd.keys() == ref.keys()
    assert all(sd[k].dtype == v.dtype and torch.equal(sd[k], v) for k, v in ref.items())
    with torch.device("meta"):
        model = FeatInv(TINY)
    load_into(model, {k: sd[k] for k in tiny_sd}, assign=True)
    key = "model.diffusion_model.out.2.weight"
    assert model.unet.out[2].weight.data_ptr() == sd[key].data_ptr()  # the file's map, no copy
    with torch.no_grad():
        model.unet.out[2].weight.add_(1)  # private map: the file is untouched
    assert torch.equal(load_file(tmp_path / "all.safetensors")[key], tiny_sd[key])
