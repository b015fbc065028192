"""The `featinv` command line: help, exit codes, the one-line error convention, --debug."""
from __future__ import annotations

import json
import re

import pytest

from featinv.cli import COMMANDS, main


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_exits_0_and_states_defaults_once(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert text.startswith(f"usage: featinv {name}") and "--debug" in text
    assert "(default: None)" not in text and not re.search(r"default[^()]*\) \(default:", text)  # said once


def one_error_line(err: str, name: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"featinv {name}: error: "), err
    return lines[0]


@pytest.mark.parametrize("argv", [
    ["reconstruct", "--bogus"], ["evaluate", "--out"], ["train", "--config", "tiny"], ["demo", "--seed", "x"],
    ["inspect"], ["build-control", "a.ckpt", "b.ckpt", "--hint-channels", "2"]])
def test_bad_command_line_is_one_line_and_exit_2(argv, capsys):
    assert main(argv) == 2
    one_error_line(capsys.readouterr().err, argv[0])


def test_missing_file_and_bad_override(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.ckpt")]) == 2
    assert "missing.ckpt" in one_error_line(capsys.readouterr().err, "inspect")
    run_dir = tmp_path / "run"
    (tmp_path / "init.safetensors").write_bytes(b"")  # the override is checked before the file is read
    assert main(["train", "--config", "tiny", "--init", str(tmp_path / "init.safetensors"),
                 "--run-dir", str(run_dir), "train.no_such_field=1"]) == 2
    assert "no_such_field" in one_error_line(capsys.readouterr().err, "train")
    assert not run_dir.exists()


def test_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["--debug", "inspect", str(tmp_path / "missing.ckpt")]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "not found" in err
    assert err.strip().splitlines()[-1].startswith("featinv inspect: error: argument checkpoint: ")
    assert main(["inspect", str(tmp_path / "missing.ckpt"), "--debug"]) == 2  # per command as well
    assert "Traceback" in capsys.readouterr().err


def test_unknown_command(capsys):
    assert main(["nonsense"]) == 2
    assert capsys.readouterr().err.strip() == "featinv: error: unknown command 'nonsense'"


def test_reconstruct_then_evaluate_exit_0(tiny_job, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["reconstruct", "--checkpoint", str(tiny_job["ckpt"]), "--backbone", "resnet18",
                 "--backbone-size", "64", "--backbone-checkpoint", str(tiny_job["bb_file"]),
                 "--data", str(tiny_job["root"]), "--out", str(out), "--per-class", "1", "--steps", "1",
                 "--samples", "2", "--batch-size", "3", "--num-workers", "0", "--accelerator", "cpu",
                 "--devices", "1"]) == 0
    assert json.loads((out / "manifest.json").read_text())["complete"] == 2  # animal/broken.JPEG sorts first
    assert main(["evaluate", "--out", str(out), "--no-fid", "--device", "cpu"]) == 0
    assert json.loads((out / "eval" / "summary.json").read_text())["reconstructions"] == 4
    assert capsys.readouterr().err.count("error") == 0


def test_failed_reconstruct_leaves_no_output_folder(tiny_job, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 64)
    out = tmp_path / "out"
    assert main(["reconstruct", "--checkpoint", str(bad), "--data", str(tiny_job["root"]), "--out", str(out),
                 "--backbone", "resnet18", "--accelerator", "cpu"]) == 2
    assert "bad.safetensors" in one_error_line(capsys.readouterr().err, "reconstruct")
    assert not out.exists()


@pytest.mark.parametrize("argv, flag", [
    (["reconstruct", "--checkpoint", "INPUT", "--data", "FOLDER", "--out", "BAD"], "--out"),
    (["train", "--config", "tiny", "--init", "INPUT", "--run-dir", "BAD"], "--run-dir"),
    (["steer", "--demo-out", "DEMO", "--out", "BAD"], "--out"),
    (["compose", "--demo-out", "DEMO", "--out", "BAD"], "--out"),
    (["perturb", "--demo-out", "DEMO", "--out", "BAD"], "--out"),
    (["demo", "--out", "BAD"], "--out"),
    (["build-control", "INPUT", "BAD/x.safetensors"], "out"),
    (["convert", "INPUT", "BAD/x.safetensors"], "dst"),
])
def test_an_unwritable_output_is_refused_before_anything_loads(argv, flag, tmp_path, capsys):
    """--out under a regular file: the one-line error names the output flag (not the model files, which
    are read later), and the demo pair is not trained."""
    (tmp_path / "file").write_text("a file, not a folder")
    subs = {"BAD": str(tmp_path / "file" / "out"), "INPUT": str(tmp_path / "file"), "FOLDER": str(tmp_path),
            "DEMO": str(tmp_path / "demo")}
    argv = [subs.get(a, a.replace("BAD", subs["BAD"])) for a in argv]
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err, argv[0])
    assert line.startswith(f"featinv {argv[0]}: error: {flag}: ") and "cannot be written" in line
    assert not (tmp_path / "demo").exists()


def test_evaluate_refuses_an_unwritable_eval_folder_first(tmp_path, capsys):
    (tmp_path / "recon").mkdir()
    (tmp_path / "recon" / "eval").write_text("a file where eval/ goes")
    assert main(["evaluate", "--out", str(tmp_path / "recon"), "--backbone", "resnet18"]) == 2
    assert "--out: " in one_error_line(capsys.readouterr().err, "evaluate")


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    import os
    import signal
    import sys

    from featinv.commands._common import command

    @command("demo", parse=lambda argv: None, resumes=True)
    def interrupted(args):
        os.kill(os.getpid(), signal.SIGINT)

    @command("steer", parse=lambda argv: None)
    def like_lightning(args):  # Lightning catches KeyboardInterrupt in fit/predict and calls sys.exit(1)
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            sys.exit(1)

    before = signal.getsignal(signal.SIGINT)
    assert interrupted([]) == 130
    assert capsys.readouterr().err == "featinv demo: interrupted; rerun to resume\n"
    assert like_lightning([]) == 130
    assert capsys.readouterr().err == "featinv steer: interrupted\n"
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_version_is_the_package_metadata(capsys):
    """`featinv --version`, `python -m featinv --version` and featinv.__version__: one source, the metadata."""
    import subprocess
    import sys
    from importlib.metadata import version

    import featinv

    assert featinv.__version__ == version("featinv")
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"featinv {featinv.__version__}\n"
    proc = subprocess.run([sys.executable, "-m", "featinv", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == f"featinv {featinv.__version__}\n", proc.stderr


def test_help_command_is_the_command_help(capsys):
    """`featinv help <command>` = `featinv <command> --help`; `featinv help` alone = the command list."""
    with pytest.raises(SystemExit) as exit_:
        main(["steer", "--help"])
    assert exit_.value.code == 0
    direct = capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["help", "steer"])
    assert exit_.value.code == 0 and capsys.readouterr().out == direct
    assert main([]) == 0
    listing = capsys.readouterr().out
    assert main(["help"]) == 0 and capsys.readouterr().out == listing
    assert main(["--help"]) == 0 and capsys.readouterr().out == listing
    assert all(name in listing for name in COMMANDS) and "featinv help <command>" in listing
    assert main(["help", "nonsense"]) == 2
    assert capsys.readouterr().err.strip() == "featinv: error: unknown command 'nonsense'"
    assert main(["help", "steer", "demo"]) == 2
    assert capsys.readouterr().err.startswith("featinv: error: help takes one command name")


def test_the_command_list_version_and_help_load_no_torch():
    import subprocess
    import sys

    code = ("import io, sys, contextlib; from featinv.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()): main(['--version']); main(['help'])\n"
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_lists_in_help_texts_come_from_the_registry(capsys):
    """The panels (`featinv --help`'s line for app, `featinv app --help`) and the samplers (`featinv
    reconstruct --help`) are listed from featinv.registry, with each entry's help."""
    from featinv.registry import PANELS, SAMPLERS

    assert main([]) == 0
    app_line = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("app "))
    assert all(name.lower() in app_line for name in PANELS), app_line
    for command, table in (("app", PANELS), ("reconstruct", SAMPLERS)):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        for name, entry in table.items():
            assert re.search(rf"^  {re.escape(name)} +{re.escape(entry.help)}$", text, re.M), (name, text)
    with pytest.raises(SystemExit):
        main(["steer", "--help"])
    assert "DDIM" not in capsys.readouterr().out  # --steps are the model's sampler's steps, whichever it is


def test_model_source_flags_are_one_group_read_into_a_pair_source(tmp_path):
    """reconstruct (a checkpoint), the analyses and the app (a checkpoint or the demo pair) read the same flags
    into the same PairSource."""
    from featinv.commands import app, reconstruct
    from featinv.commands._args import add_source_args, source_from_args
    from featinv.commands._common import Parser
    from featinv.config import DEMO_OUT, PairSource

    for name in ("run", "runs/a", "d"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "bb.pth").write_bytes(b"")
    run, run_dir, bb = str(tmp_path / "run"), str(tmp_path / "runs/a"), str(tmp_path / "bb.pth")
    argv = ["--checkpoint", run, "--config", "tiny", "--run-dir", run_dir, "--backbone", "resnet18",
            "--backbone-checkpoint", bb, "--backbone-size", "64"]
    given = dict(checkpoint=run, config="tiny", run_dir=run_dir, backbone="resnet18",
                 backbone_checkpoint=bb, backbone_size=64)
    recon = reconstruct.build_parser().parse_args(argv + ["--data", str(tmp_path / "d"), "--out", "o"])
    assert source_from_args(recon) == PairSource(**given)
    served = app.build_parser().parse_args(argv + ["--demo-out", "demo", "--demo-seed", "3", "--demo-full"])
    assert source_from_args(served) == PairSource(**given, demo_out="demo", demo_seed=3, demo_quick=False)
    demo = Parser(prog="featinv test")
    add_source_args(demo, demo=True)
    assert source_from_args(demo.parse_args([])) == PairSource(demo_out=DEMO_OUT)
    assert reconstruct.main(["--data", str(tmp_path / "d"), "--out", "o"]) == 2  # --checkpoint is required
