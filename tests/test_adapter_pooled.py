"""Pooled conditioning (``model.adapter.pooled``): what the adapter sees, saving, loading, training."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_tiny_model
from safetensors import safe_open

from featinv.checkpoint.build_control import build_control
from featinv.checkpoint.config_file import merge, to_dict
from featinv.checkpoint.layout import METADATA_KEY, CheckpointError
from featinv.checkpoint.load import config_from_metadata, load_featinv, save_featinv
from featinv.config import PRESETS, AdapterConfig
from featinv.nets.adapter import FeatureAdapter
from featinv.nets.model import FeatInv


def pooled_cfg(model_cfg, pooled: bool = True):
    return dataclasses.replace(model_cfg, adapter=dataclasses.replace(model_cfg.adapter, pooled=pooled))


def first_conv_input(adapter: FeatureAdapter, feats: torch.Tensor) -> torch.Tensor:
    """What the adapter's first conv receives (after the pooling and the upsampling)."""
    seen = []
    handle = adapter.block[1].register_forward_hook(lambda m, args, out: seen.append(args[0]))
    try:
        adapter(feats)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "tokens"])
def test_pooled_adapter_input_is_constant_over_the_grid(layout):
    torch.manual_seed(0)
    feats = torch.randn(2, 8, 3, 3) + torch.linspace(-3, 3, 9).view(1, 1, 3, 3)  # varies over space
    arg = {"nchw": feats, "nhwc": feats.permute(0, 2, 3, 1),
           "tokens": torch.cat([torch.randn(2, 1, 8), feats.flatten(2).transpose(1, 2)], dim=1)}[layout]
    spatial = FeatureAdapter(AdapterConfig(in_channels=8, width=16, grid=6), out_channels=4)
    pooled = FeatureAdapter(AdapterConfig(in_channels=8, width=16, grid=6, pooled=True), out_channels=4)
    x_spatial, x_pooled = first_conv_input(spatial, arg), first_conv_input(pooled, arg)
    assert x_pooled.shape == x_spatial.shape == (2, 8, 6, 6)
    assert x_spatial.std(dim=(2, 3)).min() > 0.5  # the planted variation reaches the spatial adapter
    expected = feats.mean(dim=(2, 3))[:, :, None, None].expand(-1, -1, 6, 6)
    torch.testing.assert_close(x_pooled, expected)  # the spatial mean, at every position
    # Same weights, so a map with the same mean gives the pooled adapter the same hint whatever its layout.
    pooled.load_state_dict(spatial.state_dict())
    shuffled = feats.flatten(2)[:, :, torch.randperm(9)].view_as(feats)
    torch.testing.assert_close(pooled(feats), pooled(shuffled))


def test_pooled_checkpoint_round_trips_and_a_mismatch_is_refused_by_name(tmp_path):
    model = make_tiny_model(16)
    model = FeatInv(pooled_cfg(model.cfg)).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)  # a "trained" adapter: its output conv is not zero
    path = save_featinv(model, tmp_path / "pooled.safetensors")
    with safe_open(str(path), framework="pt") as f:
        saved = config_from_metadata(dict(f.metadata()))
    assert saved.adapter.pooled is True
    loaded = load_featinv(path)
    assert loaded.cfg.adapter.pooled is True
    feats = torch.randn(2, 16, 2, 2)
    torch.testing.assert_close(loaded.hint(feats), model.hint(feats), rtol=0, atol=0)
    assert load_featinv(path, model.cfg).cfg == model.cfg  # the matching config loads
    with pytest.raises(CheckpointError, match=r"model\.adapter\.pooled=false.*load it with model\.adapter\.pooled=true"):
        load_featinv(path, pooled_cfg(model.cfg, False))
    # And the other way round: a spatial checkpoint is not loaded as a pooled model.
    spatial = FeatInv(pooled_cfg(model.cfg, False))
    spatial.load_state_dict(model.state_dict())
    spatial_path = save_featinv(spatial, tmp_path / "spatial.safetensors")
    with pytest.raises(CheckpointError, match=r"trained on spatial feature maps.*model\.adapter\.pooled=true"):
        load_featinv(spatial_path, model.cfg)


def test_old_metadata_without_the_field_reads_as_spatial():
    data = to_dict(PRESETS["tiny"].model)
    del data["adapter"]["pooled"]
    assert config_from_metadata({METADATA_KEY: __import__("json").dumps(data)}).adapter.pooled is False


def test_an_untrained_initial_checkpoint_loads_either_way(tiny_minisd, tmp_path):
    init = tmp_path / "init.safetensors"
    build_control(tiny_minisd, init, cfg=merge(PRESETS["tiny"].model, {"adapter": {"width": 32}}))
    model = load_featinv(init, pooled_cfg(load_featinv(init).cfg))  # build-control's zero adapter output
    assert model.cfg.adapter.pooled is True


def test_pooled_training_with_the_config_field(tiny_minisd, tmp_path):
    """`featinv train ... model.adapter.pooled=true` from a build-control init: the export is pooled, and a
    resume with the other setting is refused by name."""
    from helpers import sample_photos_folder

    from featinv.nets.backbone import build_backbone
    from featinv.training.loop import TrainRun, train

    photos = sample_photos_folder(tmp_path / "photos", size=72)
    init = tmp_path / "init.safetensors"
    build_control(tiny_minisd, init, cfg=merge(PRESETS["tiny"].model, {"adapter": {"width": 32}}), hint_channels=512)
    torch.manual_seed(0)
    backbone = build_backbone(PRESETS["tiny"].backbone)
    base = {"data": {"root": str(photos), "batch_size": 2, "num_workers": 0}, "model": {"adapter": {"width": 32}},
            "train": {"lr": 1e-3, "log_images_every": 0, "max_steps": 2, "checkpoint_every": 2}}
    cfg = merge(PRESETS["tiny"], base, ["model.adapter.pooled=true"])
    cpu = TrainRun(accelerator="cpu", devices=1, progress=False)
    resumed = dataclasses.replace(cpu, resume="auto")
    out = train(cfg, init, tmp_path / "run", cpu, backbone=backbone)
    model = load_featinv(out)
    assert model.cfg.adapter.pooled is True
    assert model.control.input_hint_block.block[-1].weight.any()  # it trained
    assert "pooled: true" in (tmp_path / "run" / "config.yaml").read_text()
    spatial = merge(cfg, ["model.adapter.pooled=false", "train.max_steps=4"])
    with pytest.raises(ValueError, match=r"model\.adapter\.pooled: the run trained True, now False"):
        train(spatial, init, tmp_path / "run", resumed, backbone=backbone)  # the run's config.yaml refuses it first
    with pytest.raises(ValueError, match=r"model\.adapter\.pooled=true.*model\.adapter\.pooled=false"):
        train(spatial, init, tmp_path / "run", dataclasses.replace(resumed, accept_changes=("model.adapter.pooled",)),
              backbone=backbone)  # accepted there: the checkpoint refuses it
