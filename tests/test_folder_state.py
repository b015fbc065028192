"""One reconstruct folder holds one job: other settings are refused, --overwrite starts over, files
that do not decode are made again, and evaluate reports them instead of crashing."""
from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

import featinv.jobs.state as state
from featinv.checkpoint.load import save_featinv
from featinv.config import PairSource, ReconstructJob, SampleConfig
from featinv.jobs.evaluate import evaluate_folder
from featinv.jobs.reconstruct import reconstruct_folder

FAST = SampleConfig(steps=1)


def folder_job(checkpoint, root, out, per_class=1, cfg=FAST, **kw) -> ReconstructJob:
    return ReconstructJob(PairSource(checkpoint=str(checkpoint)), str(root), str(out), per_class=per_class,
                          sample=cfg, batch_size=2, accelerator="cpu", devices=1, **kw)


def run(job, out, checkpoint=None, cfg=FAST, **kw) -> dict:
    return reconstruct_folder(folder_job(checkpoint or job["ckpt"], job["root"], out, cfg=cfg, **kw),
                              extractor=job["backbone"])


def test_other_settings_are_refused_by_name_and_overwrite_starts_over(tiny_job, tmp_path):
    out = tmp_path / "out"
    run(tiny_job, out)
    png = out / "person" / "reconstructed_astronaut_0.png"
    before = png.stat().st_mtime_ns
    with pytest.raises(ValueError, match=r"sample\.steps was 1, now 2.*--overwrite"):
        run(tiny_job, out, cfg=SampleConfig(steps=2))
    with pytest.raises(ValueError, match=r"per_class was 1, now 2"):
        reconstruct_folder(folder_job(tiny_job["ckpt"], tiny_job["root"], out, per_class=2),
                           extractor=tiny_job["backbone"])
    other = save_featinv(tiny_job["model"], tmp_path / "other.safetensors", {"featinv_train_steps": "7"})
    with pytest.raises(ValueError, match=r"checkpoint: .*sha256"):
        run(tiny_job, out, checkpoint=other)
    copy = shutil.copy(tiny_job["ckpt"], tmp_path / "copy.safetensors")  # same contents: same job
    assert run(tiny_job, out, checkpoint=copy)["reconstructed"] == 0 and png.stat().st_mtime_ns == before

    (out / "notes.txt").write_text("mine")
    manifest = run(tiny_job, out, cfg=SampleConfig(steps=2), overwrite=True)
    assert manifest["sample"]["steps"] == 2 and manifest["reconstructed"] == 2  # animal/broken.JPEG first
    assert png.stat().st_mtime_ns != before and (out / "notes.txt").read_text() == "mine"


def test_outputs_without_a_manifest_are_refused(tiny_job, tmp_path):
    out = tmp_path / "out"
    run(tiny_job, out)
    (out / "manifest.json").unlink()
    with pytest.raises(ValueError, match="no manifest.json"):
        run(tiny_job, out)


def test_a_file_that_does_not_decode_is_made_again_and_evaluate_reports_it(tiny_job, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run(tiny_job, out)
    checked = []
    decodes = state.decodes
    monkeypatch.setattr(state, "decodes", lambda p: checked.append(p) or decodes(p))
    assert run(tiny_job, out)["reconstructed"] == 0 and checked == []  # recorded files are not read again

    junk = out / "thing" / "reconstructed_coffee_0.png"
    junk.write_bytes(b"not a png")  # changed after the manifest: checked
    assert run(tiny_job, out)["reconstructed"] == 1 and checked == [junk]
    with Image.open(junk) as image:
        assert image.size == (64, 64)

    junk.write_bytes(b"not a png")
    summary = evaluate_folder(out, tiny_job["backbone"], fid=False, device="cpu")
    assert summary["images"] == 1 and len(summary["unreadable"]) == 1 and str(junk) in summary["unreadable"][0]
    assert "Skipped 1 image(s)" in (out / "eval" / "summary.md").read_text()
    assert json.loads((out / "eval" / "summary.json").read_text())["unreadable"] == summary["unreadable"]
