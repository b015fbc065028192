"""Config dataclasses and config files: presets, project YAML, reference YAML, overrides."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES
from omegaconf import OmegaConf

from featinv.checkpoint.config_file import load_config
from featinv.config import PRESETS, AdapterConfig, SampleConfig
from featinv.diffusion.reconstruct import Reconstructor
from featinv.nets.model import FeatInv

REPO = Path(__file__).resolve().parents[1]

TINY = PRESETS["tiny"].model
FULL = PRESETS["featinv_convnext"].model
CONFIGS = Path(__file__).parent.parent / "configs"


def test_reference_yaml_tiny():
    assert load_config(str(FIXTURES / "tiny_config.yaml")).model == TINY


def test_reference_yaml_full():
    model = load_config(str(FIXTURES / "featinv_convnext_config.yaml")).model
    assert model.unet.gradient_checkpointing is True  # use_checkpoint: True
    assert dataclasses.replace(model, unet=dataclasses.replace(model.unet, gradient_checkpointing=False)) == FULL


@pytest.mark.parametrize("block, key", [
    ("unet_config", "use_fp16"), ("control_stage_config", "hint_width"), (None, "ckpt_bogus")])
def test_reference_yaml_unknown_key(tmp_path, block, key):
    data = OmegaConf.to_container(OmegaConf.load(FIXTURES / "tiny_config.yaml"))
    params = data["model"]["params"] if block is None else data["model"]["params"][block]["params"]
    params[key] = 1
    OmegaConf.save(OmegaConf.create(data), tmp_path / "ref.yaml")
    with pytest.raises(ValueError, match=key):
        load_config(str(tmp_path / "ref.yaml"))


@pytest.mark.parametrize("change, match", [
    ({"hidden_activation": "quick_gelu"}, r"clip_text_config: unknown key\(s\) \['hidden_activation'\]"),
    ({"hidden_act": "gelu"}, r"clip_text_config: hidden_act 'gelu' is not supported")])
def test_reference_yaml_clip_text_config_is_checked(tmp_path, change, match):
    data = OmegaConf.to_container(OmegaConf.load(FIXTURES / "tiny_config.yaml"))
    data["model"]["params"]["cond_stage_config"]["params"]["clip_text_config"].update(change)
    OmegaConf.save(OmegaConf.create(data), tmp_path / "ref.yaml")
    with pytest.raises(ValueError, match=match):
        load_config(str(tmp_path / "ref.yaml"))


def test_reference_yaml_with_overrides():
    cfg = load_config(str(FIXTURES / "tiny_config.yaml"), ["model.adapter.in_channels=2048", "train.lr=0.5"])
    assert cfg.model == dataclasses.replace(TINY, adapter=AdapterConfig(in_channels=2048)) and cfg.train.lr == 0.5


def test_project_yaml_merges_onto_preset(tmp_path):
    (tmp_path / "run.yaml").write_text("preset: tiny\nmodel:\n  unet:\n    num_heads: 4\ntrain:\n  lr: 0.003\n")
    cfg = load_config(str(tmp_path / "run.yaml"), ["data.batch_size=2"])
    assert cfg.model.unet.num_heads == 4 and cfg.train.lr == 0.003 and cfg.data.batch_size == 2
    assert cfg.model.unet.model_channels == 32 and cfg.backbone == PRESETS["tiny"].backbone


@pytest.mark.parametrize("text, key", [
    ("preset: tiny\nmodel:\n  unet:\n    num_hedas: 4\n", "num_hedas"),
    ("preset: tiny\ntrian:\n  lr: 0.1\n", "trian"),
    ("preset: tinyy\n", "tinyy"),
])
def test_project_yaml_unknown_key(tmp_path, text, key):
    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(ValueError, match=key):
        load_config(str(tmp_path / "run.yaml"))


def test_dotlist_overrides():
    cfg = load_config("tiny", ["train.lr=0.5", "model.unet.num_heads=4", "model.unet.channel_mult=[1,2]"])
    assert cfg.train.lr == 0.5 and cfg.model.unet.num_heads == 4 and cfg.model.unet.channel_mult == (1, 2)
    with pytest.raises(ValueError, match="no_such_field"):
        load_config("tiny", ["train.no_such_field=1"])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_shipped_configs_equal_presets(name):
    path = CONFIGS / f"{name}.yaml"
    assert load_config(str(path)) == PRESETS[name]
    # written out in full: every field of every section appears in the file
    written = OmegaConf.to_container(OmegaConf.load(path))
    expected = OmegaConf.to_container(OmegaConf.structured(PRESETS[name]))

    def keys(d, prefix=""):
        return {f"{prefix}{k}" for k, v in d.items()} | {x for k, v in d.items() if isinstance(v, dict)
                                                          for x in keys(v, f"{prefix}{k}.")}
    assert keys(expected) <= keys(written)


def test_latent_grid_is_one_fact():
    """adapter.grid and latent_size are checked together when the config is made."""
    with pytest.raises(ValueError, match=r"adapter\.grid \(32\) must equal latent_size \(16\)"):
        dataclasses.replace(TINY, latent_size=16)
    with pytest.raises(ValueError, match="latent_size"):
        load_config("tiny", ["model.latent_size=16"])
    # Both set: the model samples on the 16x16 grid (32 px images through the 2-level VAE).
    cfg = load_config("tiny", ["model.latent_size=16", "model.adapter.grid=16", "model.adapter.width=16"]).model
    torch.manual_seed(0)
    rec = Reconstructor(FeatInv(cfg), None, SampleConfig(steps=1))
    images = rec.from_features(torch.randn(1, cfg.adapter.in_channels, 2, 2), ["a"])
    assert images.shape == (1, 1, 3, 32, 32) and cfg.image_size == 32


@pytest.mark.parametrize("override, message", [
    ("train.drop_prob=1.5", "TrainConfig.drop_prob must be in [0, 1], got 1.5"),
    ("data.batch_size=0", "DataConfig.batch_size must be >= 1, got 0"),
    ("train.max_steps=0", "TrainConfig.max_steps must be >= 1, got 0")])
def test_ranges_are_checked_and_a_bad_override_is_named(override, message):
    for source in ("tiny", str(REPO / "configs" / "tiny.yaml")):
        with pytest.raises(ValueError) as e:
            load_config(source, [override])
        assert str(e.value) == f"command-line override(s) {override}: {message}"


def test_a_bad_value_in_the_yaml_names_the_file(tmp_path):
    (tmp_path / "run.yaml").write_text("preset: tiny\ntrain: {drop_prob: -0.1}\n")
    with pytest.raises(ValueError, match=r"run\.yaml: TrainConfig\.drop_prob must be in \[0, 1\], got -0\.1"):
        load_config(str(tmp_path / "run.yaml"), ["train.lr=0.1"])


def test_non_finite_numbers_are_refused_naming_the_field():
    import pytest as _pytest

    from featinv.checkpoint.config_file import merge
    from featinv.config import PRESETS, SampleConfig

    with _pytest.raises(ValueError, match=r"TrainConfig.lr must be a finite number, got nan"):
        merge(PRESETS["tiny"], ["train.lr=nan"])
    with _pytest.raises(ValueError, match=r"SampleConfig.guidance_scale must be a finite number"):
        SampleConfig(guidance_scale=float("inf"))
