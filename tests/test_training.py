"""Training on real photos with the tiny config: loss, frozen parts, resume, DDP."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from featinv.build_control import build_control
from featinv.config import PRESETS, merge
from featinv.data import sample_photos_folder
from featinv.training import train


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = sample_photos_folder(tmp_path_factory.mktemp("photos") / "train", size=72)
    (root / "thing" / "broken.JPEG").write_bytes(b"\xff\xd8 not a jpeg")
    return root


@pytest.fixture(scope="module")
def init_ckpt(tiny_minisd, tmp_path_factory):
    # tiny preset backbone: resnet18 at 64 px -> 512 x 2 x 2
    out = tmp_path_factory.mktemp("init") / "init.safetensors"
    build_control(tiny_minisd, out, hint_channels=512)
    return out


def tiny_cfg(photos, **train):
    return merge(PRESETS["tiny"], {"data": {"root": str(photos), "batch_size": 2, "num_workers": 0},
                                   "train": {"lr": 1e-3, "log_images_every": 0, **train}})


def control_weights(path):
    return {k: v for k, v in load_file(path).items() if k.startswith("control_model.")}


def test_overfitting_photos_the_loss_falls(photos, init_ckpt, tmp_path):
    cfg = tiny_cfg(photos, max_steps=60, checkpoint_every=0, drop_prob=0.0, log_images_every=30,
                   log_images_count=2, log_images_steps=2)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=4))
    out = train(cfg, init_ckpt, tmp_path / "run", progress=False)
    with open(tmp_path / "run" / "logs" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    losses = [float(r["train/loss"]) for r in rows]
    assert len(losses) == 60
    first, last = sum(losses[:15]) / 15, sum(losses[-15:]) / 15
    assert last < 0.6 * first, (first, last)
    assert float(rows[-1]["train/skipped_images"]) >= 1  # the corrupt file was skipped and counted
    assert sorted(p.name for p in (tmp_path / "run" / "images").iterdir()) == ["step00000030.png", "step00000060.png"]
    # frozen parts are untouched; the export is a full reference-layout checkpoint
    init, final = load_file(init_ckpt), load_file(out)
    assert set(init) == set(final)
    changed = {k.split(".")[0] for k in init if not torch.equal(init[k], final[k])}
    assert changed == {"control_model"}
    assert (tmp_path / "run" / "config.yaml").read_text().count("batch_size: 4") == 1


def test_resume_reproduces_the_uninterrupted_run(photos, init_ckpt, tmp_path):
    full = train(tiny_cfg(photos, max_steps=6, checkpoint_every=3), init_ckpt, tmp_path / "full", progress=False)
    train(tiny_cfg(photos, max_steps=3, checkpoint_every=3), init_ckpt, tmp_path / "part", progress=False)
    ckpt = torch.load(tmp_path / "part" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 3
    assert all(k.startswith("model.control.") for k in ckpt["state_dict"])  # only what trains
    resumed = train(tiny_cfg(photos, max_steps=6, checkpoint_every=3), init_ckpt, tmp_path / "part", progress=False,
                    resume="auto")
    a, b = control_weights(full), control_weights(resumed)
    assert any(not torch.equal(a[k], load_file(init_ckpt)[k]) for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


def test_unlock_decoder_trains_unet_output_blocks_only(photos, init_ckpt, tmp_path):
    out = train(tiny_cfg(photos, max_steps=2, checkpoint_every=0, unlock_decoder=True), init_ckpt, tmp_path / "r",
                progress=False)
    init, final = load_file(init_ckpt), load_file(out)
    changed = {".".join(k.split(".")[:3]) for k in init if not torch.equal(init[k], final[k])}
    assert {c for c in changed if not c.startswith("control_model.")} <= {
        "model.diffusion_model.output_blocks", "model.diffusion_model.out"}
    assert "model.diffusion_model.output_blocks" in changed
    assert not any(c.startswith(("model.diffusion_model.input_blocks", "first_stage", "cond_stage")) for c in changed)


def test_two_process_ddp_on_cpu_ends_with_identical_weights(photos, init_ckpt, tmp_path):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "featinv.cli", "train", "--config", "tiny", "--init", str(init_ckpt),
           "--data", str(photos), "--run-dir", str(run), "--accelerator", "cpu", "--devices", "2",
           "--strategy", "ddp", "train.max_steps=3", "train.checkpoint_every=0", "train.log_images_every=0",
           "data.batch_size=2", "data.num_workers=0"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check = json.loads((run / "ddp_check.json").read_text())
    assert check["world_size"] == 2 and len(check["fingerprints"]) == 2
    assert check["fingerprints"][0] == check["fingerprints"][1]
    assert (run / "featinv.safetensors").exists()
