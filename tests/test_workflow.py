"""The command chain as a user runs it, in subprocesses, on the tiny config and real photos:
build-control -> train -> continue with a larger max_steps -> reconstruct -> evaluate -> inspect.

One module-scoped chain (~1 min on 2 cores); each test checks one part of what it left behind."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import sample_photos_folder
from safetensors.torch import load_file

from featinv.io import current_umask
from featinv.testing import write_random_minisd

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
pytestmark = pytest.mark.slow


def featinv(*args: str, cwd: Path, wait: bool = True):
    """``python -m featinv ARGS`` as a user runs it (CPU only, one thread); the finished process,
    or the running one with ``wait=False``."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "featinv", *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return finish(proc) if wait else proc


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    command = " ".join(proc.args[3:])
    assert proc.returncode == 0, f"{command}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def error_line(proc: subprocess.CompletedProcess, name: str) -> str:
    """The one line a user error prints (Lightning / Python warnings aside), with exit status 2."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("featinv ")]
    assert len(lines) == 1 and lines[0].startswith(f"featinv {name}: error: ") and "Traceback" not in proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("workflow")
    write_random_minisd(tmp / "minisd.safetensors")
    sample_photos_folder(tmp / "photos", size=72)
    ok(featinv("build-control", "minisd.safetensors", "init.safetensors", "--backbone", "resnet18", cwd=tmp))
    train = ["train", "--config", TINY, "--init", "init.safetensors", "--data", "photos"]
    one_go = featinv(*train, "--run-dir", "runs/one_go", "train.max_steps=4", cwd=tmp, wait=False)  # alongside
    small_batch = featinv(*train, "--run-dir", "runs/small", "data.batch_size=8", cwd=tmp, wait=False)  # 5 photos
    first = ok(featinv(*train, "--run-dir", "runs/run", "train.max_steps=2", cwd=tmp))
    continued = ok(featinv(*train, "--run-dir", "runs/run", "train.max_steps=4", cwd=tmp))
    config_before = (tmp / "runs/run/config.yaml").read_bytes()
    changed = featinv(*train, "--run-dir", "runs/run", "train.max_steps=6", "backbone.name=resnet34", cwd=tmp,
                      wait=False)  # alongside reconstruct
    one_go = ok(finish(one_go))
    recon = ["reconstruct", "--checkpoint", "runs/run/featinv.safetensors", "--data", "photos",
             "--per-class", "1", "--batch-size", "2", "--num-workers", "0"]
    bad_data = featinv(*recon[:3], "--data", "no_such_folder", "--out", "recon_bad", cwd=tmp, wait=False)
    results = {"tmp": tmp, "first": first, "continued": continued, "one_go": one_go,
               "recon": ok(featinv(*recon, "--steps", "2", "--out", "recon", cwd=tmp))}
    results["recon_again"] = ok(featinv(*recon, "--steps", "2", "--out", "recon", cwd=tmp))
    results["recon_other"] = featinv(*recon, "--steps", "3", "--out", "recon", cwd=tmp)
    results["bad_data"] = finish(bad_data)
    results["changed"], results["config_before"] = finish(changed), config_before
    results["small_batch"] = finish(small_batch)
    results.update(race(recon, tmp))
    again = featinv(*recon, "--steps", "2", "--out", "recon_again", cwd=tmp, wait=False)  # alongside evaluate
    results["evaluate"] = ok(featinv("evaluate", "--out", "recon", "--no-fid", "--device", "cpu", cwd=tmp))
    ok(finish(again))
    results["inspect"] = featinv("inspect", "runs/run/featinv.safetensors", cwd=tmp)
    return results


def wait_for_lock(proc: subprocess.Popen, folder: Path) -> None:
    """Until ``proc`` holds the folder's lock: it writes its PID right after taking it, before the model loads."""
    lock = folder / ".featinv.lock"
    for _ in range(1200):
        if lock.is_file() and lock.read_text().strip() == str(proc.pid) or proc.poll() is not None:
            return
        time.sleep(0.1)


def race(recon: list[str], tmp: Path) -> dict:
    """Two jobs on one folder: the first holds the lock (stopped while it holds it), the second is refused;
    the first is killed with SIGKILL, and a rerun proceeds."""
    interrupted = featinv(*recon, "--steps", "2", "--out", "recon_int", cwd=tmp, wait=False)
    first = featinv(*recon, "--steps", "2", "--out", "recon_race", cwd=tmp, wait=False)
    wait_for_lock(interrupted, tmp / "recon_int")
    interrupted.send_signal(signal.SIGINT)  # Ctrl-C while the job loads its model
    wait_for_lock(first, tmp / "recon_race")
    os.kill(first.pid, signal.SIGSTOP)  # the first job is running (stopped): it holds the lock
    try:
        second = featinv(*recon, "--steps", "3", "--out", "recon_race", cwd=tmp)
        first_state = first.poll()
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.communicate()
    return {"interrupted": finish(interrupted), "race_first_pid": first.pid, "race_first_state": first_state,
            "race_second": second,
            "race_rerun": featinv(*recon, "--steps", "2", "--out", "recon_race", cwd=tmp)}


def test_the_run_records_its_effective_config(chain):
    run = chain["tmp"] / "runs" / "run"
    assert "in_channels: 512" in (run / "config.yaml").read_text()  # resnet18's channels, not tiny.yaml's 16
    assert "in_channels: 512" in chain["first"].stderr  # printed as it is recorded (with the progress)
    assert "(step 4)" in chain["continued"].stderr  # continued from step 2, not started over


def test_progress_is_whole_lines_on_stderr(chain):
    for name in ("first", "continued"):
        proc = chain[name]
        assert "\r" not in proc.stdout + proc.stderr and "Epoch" not in proc.stdout
    assert "step 3/4  train/loss " in chain["continued"].stderr and "step 4/4  train/loss " in chain["continued"].stderr


def test_continuing_a_run_equals_training_in_one_go(chain):
    """Needs the `fixes` branch (the data position is checkpointed where max_steps stopped)."""
    continued = load_file(chain["tmp"] / "runs" / "run" / "featinv.safetensors")
    one_go = load_file(chain["tmp"] / "runs" / "one_go" / "featinv.safetensors")
    assert continued.keys() == one_go.keys()
    different = [k for k in continued if not (continued[k] == one_go[k]).all()]
    assert different == [], f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_reconstruct_with_the_runs_config_then_rerun_writes_nothing(chain):
    out = chain["tmp"] / "recon"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] == manifest["items"] == 3 and manifest["backbone"]["name"] == "resnet18"
    assert manifest["sample"]["steps"] == 2 and len(list(out.glob("*/reconstructed_*_0.png"))) == 3
    assert "3/3 items complete (0 new" in chain["recon_again"].stdout


def test_outputs_honour_the_umask(chain):
    tmp, mode = chain["tmp"], 0o666 & ~current_umask()  # the subprocesses inherit this process's umask
    files = [tmp / "init.safetensors", tmp / "runs/run/config.yaml", tmp / "runs/run/featinv.safetensors",
             tmp / "runs/run/checkpoints/last.ckpt", tmp / "recon/manifest.json", tmp / "recon/eval/summary.json",
             *sorted((tmp / "recon").glob("*/*.png"))]
    assert {str(f.relative_to(tmp)): stat.S_IMODE(f.stat().st_mode) for f in files} == \
        {str(f.relative_to(tmp)): mode for f in files}


def test_the_same_job_twice_writes_the_same_bytes(chain):
    """Needs the `fixes` branch (random backbone weights from backbone.seed, the same in every process)."""
    first, again = chain["tmp"] / "recon", chain["tmp"] / "recon_again"
    names = sorted(str(p.relative_to(first)) for p in first.glob("*/*.png") if p.parent.name != "eval")
    assert len(names) == 6 and names == sorted(str(p.relative_to(again)) for p in again.glob("*/*.png"))
    assert [n for n in names if (first / n).read_bytes() != (again / n).read_bytes()] == []


def test_reconstruct_with_other_settings_is_refused_naming_them(chain):
    line = error_line(chain["recon_other"], "reconstruct")
    assert "steps was 2, now 3" in line and "--overwrite" in line
    assert json.loads((chain["tmp"] / "recon" / "manifest.json").read_text())["sample"]["steps"] == 2


def test_bad_data_folder_is_one_line_and_leaves_no_output(chain):
    assert "no_such_folder" in error_line(chain["bad_data"], "reconstruct")
    assert not (chain["tmp"] / "recon_bad").exists()


def test_evaluate_and_inspect(chain):
    summary = json.loads((chain["tmp"] / "recon" / "eval" / "summary.json").read_text())
    assert summary["images"] == 3 and summary["reconstructions"] == 3 and summary["unreadable"] == []
    assert (chain["tmp"] / "recon" / "eval" / "contact_sheet.png").is_file()
    ok(chain["inspect"])


def test_two_jobs_on_one_folder_one_runs_the_other_is_refused_and_kill_9_frees_it(chain):
    line = error_line(chain["race_second"], "reconstruct")
    assert chain["race_first_state"] is None  # refused while the first job still held the folder
    assert "recon_race is in use by another featinv job" in line and f"PID {chain['race_first_pid']}" in line
    assert ".featinv.lock" in line
    ok(chain["race_rerun"])  # the killed job's lock does not block
    manifest = json.loads((chain["tmp"] / "recon_race" / "manifest.json").read_text())
    assert manifest["sample"]["steps"] == 2 and manifest["complete"] == 3


def test_resuming_with_a_changed_backbone_is_refused_naming_both_values(chain):
    line = error_line(chain["changed"], "train")
    assert "backbone.name: the run trained 'resnet18', now 'resnet34'" in line and "--accept-change" in line
    assert (chain["tmp"] / "runs/run/config.yaml").read_bytes() == chain["config_before"]
    assert "(step 4)" not in chain["changed"].stderr  # nothing trained, nothing exported


def test_fewer_images_than_the_batch_size_is_refused_before_training(chain):
    line = error_line(chain["small_batch"], "train")
    assert "--data photos: 5 images < data.batch_size 8" in line
    assert "step 1/" not in chain["small_batch"].stderr and not (chain["tmp"] / "runs/small").exists()


def test_ctrl_c_is_one_line_and_exit_130(chain):
    proc = chain["interrupted"]
    assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == "featinv reconstruct: interrupted; rerun to resume"


def test_no_noise_a_user_cannot_act_on(chain):
    """No Lightning tips or deprecations of Lightning's own code; stdout keeps the results, progress and
    "exported ..." go to stderr."""
    for name in ("first", "continued", "recon", "recon_again"):
        text = chain[name].stdout + chain[name].stderr
        assert "Tip:" not in text and "LeafSpec" not in text and "Traceback" not in text, (name, text[-2000:])
    assert "exported" not in chain["continued"].stdout and "exported" in chain["continued"].stderr
