"""`featinv export`: a trained model as a shareable folder that load_featinv (and a Hub id of it) reads back."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from conftest import make_tiny_model
from omegaconf import OmegaConf

from featinv.checkpoint.load import load_featinv, resolve_featinv_source, save_featinv
from featinv.commands.export import main
from featinv.config import PRESETS, PairSource
from featinv.jobs.export import front_matter
from featinv.pair import resolve_source


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    return tmp_path / "hf_cache"


@pytest.fixture
def run(tmp_path):
    """A training run folder as `featinv train` leaves it: featinv.safetensors (with its step count) + config.yaml."""
    run = tmp_path / "run"
    model = make_tiny_model(16)
    save_featinv(model, run / "featinv.safetensors", {"featinv_train_steps": "42"})
    tiny = PRESETS["tiny"]
    cfg = dataclasses.replace(tiny, model=model.cfg, backbone=dataclasses.replace(tiny.backbone, layer=2))
    (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    return run


def _evaluation(folder):
    summary = {"images": 4, "reconstructions": 4, "backbone": "resnet18", "cos_pooled": 0.5, "cos_spatial": 0.25,
               "top1": 0.75, "top5": 1.0, "agreement": 0.5, "original_top1": 1.0, "original_top5": 1.0,
               "backbone_fd": None, "fid": None, "fid_note": "FID needs more images"}
    (folder / "eval").mkdir(parents=True)
    (folder / "eval" / "summary.json").write_text(json.dumps(summary))
    return folder


def test_export_round_trips_bit_for_bit_with_a_model_card(run, tmp_path, capsys):
    out = tmp_path / "share"
    evaluated = _evaluation(tmp_path / "recon")
    assert main([str(run), str(out), "--eval", str(evaluated), "--base-model", "lambdalabs/miniSD-diffusers"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.yaml", "featinv.safetensors"]
    assert (out / "featinv.safetensors").read_bytes() == (run / "featinv.safetensors").read_bytes()
    a, b = load_featinv(run).state_dict(), load_featinv(out).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = front_matter(out / "README.md")
    assert meta["library_name"] == "featinv" and meta["license"] == "apache-2.0"
    assert meta["base_model"] == "lambdalabs/miniSD-diffusers" and "featinv" in meta["tags"]
    assert meta["featinv"]["backbone"] == "resnet18" and meta["featinv"]["layer"] == 2
    assert meta["featinv"]["train_steps"] == 42 and meta["featinv"]["evaluation"]["top1"] == 0.75
    card = (out / "README.md").read_text()
    assert "| top-1 accuracy on reconstructions | 0.7500 |" in card
    weights, config = resolve_featinv_source(out)
    assert weights == out / "featinv.safetensors" and config == out / "config.yaml"
    resolved = resolve_source(PairSource(checkpoint=str(out)))  # reconstruct / analyses / app: the same loader
    assert resolved.model_config is None and resolved.backbone.layer == 2


def test_refuses_a_foreign_folder_and_replaces_an_earlier_export(run, tmp_path, capsys):
    out = tmp_path / "share"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main([str(run), str(out)]) == 2
    assert "not an earlier `featinv export` folder" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    (out / "notes.txt").unlink()
    assert main([str(run), str(out)]) == 0  # an empty folder is fine
    card = (out / "README.md").read_text()
    assert main([str(run), str(out), "--license", "mit"]) == 0  # an earlier export is replaced
    assert front_matter(out / "README.md")["license"] == "mit" and card != (out / "README.md").read_text()
    assert not list(tmp_path.glob(".share.*"))  # no temporary folders left beside it


def test_checkpoint_without_run_config_needs_config(run, tmp_path, capsys):
    lone = tmp_path / "lone" / "model.safetensors"
    lone.parent.mkdir()
    shutil.copy(run / "featinv.safetensors", lone)
    assert main([str(lone), str(tmp_path / "out")]) == 2
    assert "pass --config" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main([str(lone), str(tmp_path / "out"), "--config", str(run / "config.yaml")]) == 0


def test_hub_id_of_an_export_loads_offline_from_the_cache(run, tmp_path, offline_hub):
    out = tmp_path / "share"
    assert main([str(run), str(out)]) == 0
    repo = offline_hub / "models--someone--featinv-tiny"
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(out, repo / "snapshots" / commit)
    a, b = load_featinv("someone/featinv-tiny").state_dict(), load_featinv(out).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resolve_featinv_source("someone/featinv-tiny")[1].name == "config.yaml"
    with pytest.raises(FileNotFoundError, match="someone/not-cached: .*not in the Hugging Face cache"):
        load_featinv("someone/not-cached")


def test_the_pair_loader_reads_an_exported_folder(tmp_path):
    """reconstruct, the analyses and the app load through load_pair: an export serves them like the run it came
    from (the backbone from its config.yaml), the weights bit for bit."""
    from featinv.pair import load_pair

    run = tmp_path / "run"
    model = make_tiny_model(512)  # resnet18's final stage: 512 channels
    save_featinv(model, run / "featinv.safetensors")
    (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(
        dataclasses.replace(PRESETS["tiny"], model=model.cfg))))
    assert main([str(run), str(tmp_path / "share")]) == 0
    pair = load_pair(PairSource(checkpoint=str(tmp_path / "share")))
    assert pair.extractor.feature_shape == (512, 2, 2) and pair.folder == tmp_path / "share"
    assert all(torch.equal(a, b) for a, b in zip(pair.model.state_dict().values(), model.state_dict().values()))
