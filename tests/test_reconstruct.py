"""Reconstruction: batching, seeding, the resumable folder job and two-process prediction (tiny, CPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from featinv.commands.reconstruct import build_parser, main
from featinv.config import PairSource, ReconstructJob, SampleConfig
from featinv.diffusion.reconstruct import Reconstructor, sample_seed, uncertainty
from featinv.jobs.reconstruct import RankStridedSampler, plan_items, reconstruct_folder
from featinv.nets.model import FeatInv
from featinv.visualize import to_uint8

REPO = Path(__file__).resolve().parents[1]
FAST = SampleConfig(steps=2, num_samples=2)  # 1000 // 2 divides 1000: timesteps [1, 501]


def expected_files(k: int) -> set[str]:
    stems = {"animal": ["chelsea"], "person": ["astronaut", "camera"], "thing": ["coffee", "rocket"]}
    return {f"{c}/{name}" for c, ss in stems.items() for s in ss
            for name in [f"{s}.png"] + [f"reconstructed_{s}_{i}.png" for i in range(k)]}


def png_state(out: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(out)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*.png")}


class Counts:
    """Counts FeatInv forwards (with their batch sizes) and adapter calls via forward hooks."""

    def __init__(self, model: FeatInv):
        self.forwards, self.adapter = [], []
        self.handles = [model.register_forward_hook(lambda m, a, kw, o: self.forwards.append(a[0].shape[0]),
                                                    with_kwargs=True),
                        model.control.input_hint_block.register_forward_hook(
                            lambda m, a, o: self.adapter.append(a[0].shape[0]))]

    def close(self):
        for h in self.handles:
            h.remove()


def test_folder_job_writes_once_resumes_and_restores(tiny_job, tmp_path):
    out, model = tmp_path / "out", tiny_job["model"]
    plan, classes = plan_items(tiny_job["root"], per_class=2)
    assert classes == ["animal", "person", "thing"] and len(plan) == 6
    job = ReconstructJob(PairSource(), str(tiny_job["root"]), str(out), per_class=2, sample=FAST, batch_size=4,
                         accelerator="cpu", devices=1)
    run = lambda: reconstruct_folder(job, model=model, extractor=tiny_job["backbone"])  # noqa: E731
    manifest = run()
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert files == expected_files(2) | {"manifest.json"}  # no extras, no leftover temporary files
    assert manifest["unreadable"] == [str(tiny_job["root"] / "animal" / "broken.JPEG")]
    assert json.loads((out / "manifest.json").read_text())["reconstructed"] == 5

    before, counts = png_state(out), Counts(model)
    try:
        run()  # only the unreadable item is left: nothing is written and the model never runs
    finally:
        counts.close()
    assert png_state(out) == before and counts.forwards == [] and counts.adapter == []

    victim = out / "person" / "reconstructed_camera_1.png"
    original_bytes = victim.read_bytes()
    victim.unlink()
    manifest = run()
    after = png_state(out)
    assert victim.read_bytes() == original_bytes  # generated alone this time, in a batch of 4 before
    assert {k: v for k, v in after.items() if k != "person/reconstructed_camera_1.png"} == \
        {k: v for k, v in before.items() if k != "person/reconstructed_camera_1.png"}
    assert manifest["reconstructed"] == 1 and manifest["already_complete"] == 4


def test_sample_independent_of_batch_size_and_order(tiny_job):
    """Per-sample generators make the noise batch-independent; a fixed kernel batch makes the bits so."""
    rec = Reconstructor(tiny_job["model"], None, SampleConfig(steps=2, num_samples=1, eta=0.5), fixed_batch=8)
    torch.manual_seed(2)
    feats = torch.randn(8, 512, 2, 2)
    keys = [f"class/img{i}" for i in range(8)]
    batch8 = rec.from_features(feats, keys)
    assert batch8.shape == (8, 1, 3, 64, 64) and 0 <= batch8.min() and batch8.max() <= 1
    assert np.array_equal(to_uint8(rec.from_features(feats[5:6], keys[5:6])), to_uint8(batch8[5:6]))
    assert np.array_equal(to_uint8(rec.from_features(feats.flip(0), keys[::-1]).flip(0)), to_uint8(batch8))
    assert not np.array_equal(to_uint8(batch8[0]), to_uint8(batch8[1]))
    # Without the fixed batch only float rounding differs (batch-size-dependent CPU kernels).
    rec.fixed_batch = None
    torch.testing.assert_close(rec.from_features(feats[5:6], keys[5:6]), batch8[5:6], rtol=0, atol=1e-4)


def test_seeds_are_stable_and_distinct():
    assert sample_seed(100, "n01440764/ILSVRC2012_val_00000293", 0) == \
        sample_seed(100, "n01440764/ILSVRC2012_val_00000293", 0) < 2 ** 63
    seeds = {sample_seed(s, key, k) for s in (0, 100) for key in ("a/x", "a/y", "b/x") for k in range(3)}
    assert len(seeds) == 18


@pytest.mark.parametrize("cfg, adapter_batches", [
    (SampleConfig(steps=2, num_samples=2), [3]),
    (SampleConfig(steps=2, num_samples=2, uncond="features"), [3, 1]),  # + one zero map, once
    (SampleConfig(steps=2, num_samples=2, guess_mode=True), [3]),
])
def test_one_batched_forward_per_step_and_hint_once(tiny_job, cfg, adapter_batches):
    rec, counts = Reconstructor(tiny_job["model"], None, cfg), Counts(tiny_job["model"])
    try:
        rec.from_features(torch.randn(3, 512, 2, 2), ["a", "b", "c"])
    finally:
        counts.close()
    assert counts.forwards == [2 * 3 * 2] * 2  # both guidance branches of all B*K samples, once per step
    assert counts.adapter == adapter_batches


def test_sampler_and_spacing_settings_reach_the_sampler(tiny_job, monkeypatch):
    import featinv.diffusion.reconstruct as reconstruct
    seen = []

    def spy(sampler, eps_fn, x_T, alphas_cumprod, timesteps, eta, generator):
        seen.append((sampler, timesteps.tolist(), eta, len(generator)))
        return torch.zeros_like(x_T)

    monkeypatch.setattr(reconstruct, "run_sampler", spy)
    for cfg in [SampleConfig(steps=3, num_samples=2), SampleConfig(steps=3, sampler="dpmpp_2m", spacing="trailing")]:
        out = Reconstructor(tiny_job["model"], None, cfg).from_features(torch.randn(1, 512, 2, 2), ["a"])
        assert out.shape == (1, cfg.num_samples, 3, 64, 64)
    assert seen == [("ddim", [1, 334, 667, 999], 0.0, 2), ("dpmpp_2m", [332, 666, 999], 0.0, 1)]


def test_sampler_settings_validated_and_on_the_command_line(tmp_path):
    for bad, field in [(dict(sampler="euler"), "sampler"), (dict(spacing="leading"), "spacing"),
                       (dict(sampler="dpmpp_2m", eta=0.5), "eta")]:
        with pytest.raises(ValueError, match=f"SampleConfig.{field}"):
            SampleConfig(**bad)
    given = ["--checkpoint", str(tmp_path), "--data", str(tmp_path), "--out", "o"]
    args = build_parser().parse_args(given + ["--sampler", "dpmpp_2m", "--spacing", "trailing"])
    assert (args.sampler, args.spacing) == ("dpmpp_2m", "trailing")
    defaults = build_parser().parse_args(given)
    assert (defaults.sampler, defaults.spacing) == ("ddim", "reference")


@torch.no_grad()
def test_guess_mode_branches(tiny_job):
    model = tiny_job["model"]
    rec = Reconstructor(model, None, SampleConfig(guess_mode=True, num_samples=2))
    cond, uncond = rec._branches(torch.randn(2, 512, 2, 2))
    ramp = torch.tensor([0.825 ** (12 - i) for i in range(model.num_control)])
    assert torch.allclose(cond["control_scales"], ramp.expand(4, -1)) and not uncond["control_scales"].any()
    # zero per-sample scales switch control off: the uncond half is the plain UNet, as in the reference
    x, t = torch.randn(4, 4, 32, 32), torch.full((4,), 501)
    torch.testing.assert_close(model(x, t, **uncond), model(x, t, uncond["context"]))


def test_bf16_autocast(tiny_job):
    rec = Reconstructor(tiny_job["model"], tiny_job["backbone"], SampleConfig(steps=2), bf16=True)
    out = rec(torch.rand(2, 3, 64, 64), ["a", "b"])
    assert out.dtype == torch.float32 and out.shape == (2, 1, 3, 64, 64) and out.isfinite().all()


def test_uncertainty_hand_computed():
    samples = torch.zeros(2, 2, 3, 4, 4)
    samples[0, 1] = 1.0                # image 0: pixels {0, 1} -> std 0.5
    samples[1, :, 0] = 0.3             # image 1: identical samples -> 0
    u = uncertainty(samples)
    assert u.shape == (2, 4, 4)
    assert torch.allclose(u[0], torch.full((4, 4), 0.5)) and not u[1].any()
    assert not uncertainty(torch.rand(1, 1, 3, 4, 4)).any()  # K = 1: nothing to measure
    with pytest.raises(ValueError, match=r"\(B, K, 3, H, W\)"):
        uncertainty(torch.rand(3, 4, 4))


def test_rank_strided_sampler_partitions_without_padding():
    shards = [list(RankStridedSampler(7, r, 3)) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert list(RankStridedSampler(7, 1, 3, keep=lambda i: i != 4)) == [1]
    assert len(RankStridedSampler(2, 2, 3)) == 0


def test_missing_checkpoint_and_unwritable_folder_fail_at_once(tiny_job, tmp_path, capsys):
    out = tmp_path / "never"
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        reconstruct_folder(ReconstructJob(PairSource(checkpoint=str(tmp_path / "missing.safetensors"), backbone="resnet18"),
                                          str(tiny_job["root"]), str(out)))
    assert main(["--checkpoint", str(tmp_path / "missing.ckpt"), "--data", str(tiny_job["root"]),
                 "--out", str(out)]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert not out.exists()
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way")  # as root, chmod cannot make a folder unwritable; a file can
    with pytest.raises(ValueError, match="not writable"):
        reconstruct_folder(ReconstructJob(PairSource(checkpoint=str(tiny_job["ckpt"])), str(tiny_job["root"]),
                                          str(blocker / "out")), extractor=tiny_job["backbone"])
    with pytest.raises(ValueError, match="SampleConfig.uncond"):
        SampleConfig(uncond="nothing")


WRITE_LOGGER = """
import os, sys
import featinv.jobs.reconstruct as job
from featinv.commands.reconstruct import build_parser, main
save = job.save_png
def logged(image, path):
    with open(os.environ["WRITE_LOG"], "a") as f:
        f.write(os.environ.get("LOCAL_RANK", "0") + " " + str(path) + "\\n")
    return save(image, path)
job.save_png = logged
sys.exit(main())
"""


def test_two_process_ddp_writes_every_output_once(tiny_job, tmp_path):
    """`featinv reconstruct` under Lightning DDP (gloo, 2 CPU processes) through the CLI.

    The launcher re-runs this helper script in the second process, so both ranks log their writes."""
    script, log, out = tmp_path / "run.py", tmp_path / "writes.log", tmp_path / "out"
    script.write_text(WRITE_LOGGER)
    env = {**os.environ, "WRITE_LOG": str(log), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(script), "--checkpoint", str(tiny_job["ckpt"]), "--backbone", "resnet18",
           "--backbone-size", "64", "--backbone-checkpoint", str(tiny_job["bb_file"]), "--data", str(tiny_job["root"]),
           "--out", str(out), "--per-class", "2", "--steps", "2", "--samples", "1", "--batch-size", "2",
           "--num-workers", "0", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.count("guidance 1.75") == 1  # the settings, once (rank 0); stdout: the result line only
    assert len(proc.stdout.splitlines()) == 1 and proc.stdout.startswith("5/6 items complete")
    writes = [line.split(" ", 1) for line in log.read_text().splitlines()]
    per_path = Counter(str(Path(p).relative_to(out)) for _, p in writes)
    assert set(per_path) == expected_files(1) and set(per_path.values()) == {1}
    assert {rank for rank, _ in writes} == {"0", "1"}  # both processes did work
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["complete"] == 5 and len(manifest["unreadable"]) == 1


@pytest.mark.parametrize("scale, shift", [(255.0, 0.0), (2.0, -1.0)], ids=["0-255", "-1-1"])
def test_images_outside_0_1_are_refused(tiny_job, scale, shift):
    rec = Reconstructor(tiny_job["model"], tiny_job["backbone"], FAST)
    images = torch.rand(1, 3, 64, 64)
    images[0, 0, 0, :2] = torch.tensor([0.0, 1.0])  # the full range occurs
    rec.features(images)
    rec.features((images * 1.005 - 0.0025))  # resampling overshoot is tolerated
    lo, hi = shift, scale + shift
    with pytest.raises(ValueError, match=rf"\[0, 1\].*got values in \[{lo:.3g}, {hi:.3g}\]"):
        rec.features(images * scale + shift)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        rec(images * scale + shift, ["a"])
