"""What every command face shares: the parser, the error convention, the model-source flags, the
output-folder cleanup.

Convention: ``main(argv=None) -> int``; 0 on success, 2 on an error the user caused (missing file,
bad flag, bad config or override, no CUDA), printed as ONE line ``featinv <command>: error: ...`` on
stderr; ``--debug`` prints the traceback as well. Any other exception is a bug and propagates.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import signal
import sys
import threading
import traceback
import warnings
from pathlib import Path

from omegaconf.errors import OmegaConfBaseException

from featinv.config import BACKBONE_PRESETS, DEMO_OUT, MAX_SAMPLES, RUN_CONFIG, WEIGHTS_FILE, PairSource, SettingError
from featinv.jobs.lock import LOCK_NAME

# Errors a user causes; the library raises these with a message naming the file, key or shape at fault
# (CheckpointError is a ValueError). Lightning's MisconfigurationException (e.g. --accelerator gpu
# without a GPU) is matched by name so that `--help` does not import Lightning.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, KeyError,
               OmegaConfBaseException)
USER_ERROR_NAMES = ("MisconfigurationException",)



def finite_float(text: str) -> float:
    """argparse ``type`` of every float flag: a finite number (nan, inf are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    """argparse ``type`` of counts that must be >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def sample_count(text: str) -> int:
    """argparse ``type`` of --samples: 1 <= K <= MAX_SAMPLES."""
    value = positive_int(text)
    if value > MAX_SAMPLES:
        raise argparse.ArgumentTypeError(f"{value} is above the limit of {MAX_SAMPLES} samples per input")
    return value


class UsageError(ValueError):
    """A bad command line (unknown flag, missing or malformed argument)."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" once: not for None/False defaults, nor where the help already says it. A
    description or epilog of several lines (a table from :mod:`featinv.registry`) is printed as written;
    one line is wrapped."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if any(action.default is v for v in (None, False, argparse.SUPPRESS)) or "default" in text:
            return text
        return super()._get_help_string(action)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text.strip():
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class Parser(argparse.ArgumentParser):
    """argparse with the project's help format, a ``--debug`` flag and errors raised as UsageError
    (so that they print as one line, without the usage block)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="show the traceback of an error")

    def error(self, message: str):
        raise UsageError(message)


def add_source_args(p: argparse.ArgumentParser, demo: bool) -> argparse._ArgumentGroup:
    """The model-source flags as a group ("model"), read back by :func:`source_from_args`: --checkpoint and
    where its backbone comes from; with ``demo`` the checkpoint is optional and the demo pair's flags come too.
    -> the group (a face adds its --device to it)."""
    title = "model (default: the demo's digits pair, trained and cached on first use)" if demo else "model"
    g = p.add_argument_group(title)
    g.add_argument("--checkpoint", required=not demo,
                   help=f"FeatInv weights: a .safetensors file or a reference .ckpt, a folder holding "
                        f"{WEIGHTS_FILE} (a training run, an export) or an exported folder's Hub id"
                        + ("; without it the demo pair under --demo-out" if demo else ""))
    g.add_argument("--config", help="preset name or YAML for the model and backbone (default: the model from the "
                                    f"checkpoint's metadata, the backbone from the training run's {RUN_CONFIG})")
    g.add_argument("--run-dir", help=f"the training run whose {RUN_CONFIG} names the backbone (default: the "
                                     f"checkpoint's folder, when it holds a {RUN_CONFIG})")
    g.add_argument("--backbone", help=f"backbone preset ({', '.join(BACKBONE_PRESETS)}) or timm name "
                                      "(default: the run's or --config's backbone)")
    g.add_argument("--backbone-checkpoint", help="local backbone weights file (offline use)")
    g.add_argument("--backbone-size", type=int, help="backbone input size (default: the backbone preset's)")
    if demo:
        g.add_argument("--demo-out", default=DEMO_OUT, help="the demo's folder (its cache/ holds the demo pair)")
        g.add_argument("--demo-seed", type=int, default=0, help="seed of the demo pair")
        g.add_argument("--demo-full", action="store_true",
                       help="the demo pair with `featinv demo`'s full settings (default: its --quick settings)")
    return g


def source_from_args(args: argparse.Namespace) -> PairSource:
    """The parsed flags of :func:`add_source_args` -> the PairSource they name (the demo's fields, when the
    face has no demo flags, keep their defaults)."""
    demo = {"demo_out": args.demo_out, "demo_seed": args.demo_seed, "demo_quick": not args.demo_full} \
        if hasattr(args, "demo_out") else {}
    return PairSource(checkpoint=args.checkpoint, config=args.config, run_dir=args.run_dir, backbone=args.backbone,
                      backbone_checkpoint=args.backbone_checkpoint, backbone_size=args.backbone_size, **demo)


def flag(setting: str) -> str:
    """A setting's command-line flag: ``run_dir`` -> ``--run-dir``."""
    return "--" + setting.replace("_", "-")


def one_line(e: BaseException) -> str:
    """An exception's message on one line (KeyError without its quotes, multi-line messages joined;
    the settings a SettingError names shown as flags)."""
    if isinstance(e, SettingError):
        text = e.render(flag)
    else:
        text = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 else str(e)
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip()) or type(e).__name__


class _Interrupts:
    """Ctrl-C during a command: remembered, then raised as KeyboardInterrupt as usual. Lightning catches
    that inside fit/predict and ends with ``sys.exit(1)``; the remembered interrupt makes that exit an
    interruption too."""

    def __init__(self):
        self.seen, self.previous = False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.seen = True
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)  # Lightning leaves SIGINT ignored after an interrupt


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings as one line each (``warning: ...``), not with the source line that raised them."""
    print(f"warning: {' '.join(str(message).split())}", file=file or sys.stderr)


@contextlib.contextmanager
def _threads(argv: list[str]):
    """torch's CPU threads by the one rule (:func:`featinv.runtime.configure_threads`) for the command,
    restored after it (for callers in one process, such as tests); not for --help (no torch import)."""
    if any(a in ("-h", "--help") for a in argv):
        yield
        return
    import torch

    from featinv.runtime import configure_threads

    before = torch.get_num_threads()
    configure_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)


def command(name: str, resumes: bool = False):
    """Decorate ``fn(argv: list[str]) -> int | None`` into the face's ``main(argv=None) -> int``.

    Ctrl-C ends the command with one line (``interrupted; rerun to resume`` for a command that resumes)
    and exit status 130, as a shell reports SIGINT."""
    def wrap(fn):
        @functools.wraps(fn)
        def main(argv: list[str] | None = None) -> int:
            argv = sys.argv[1:] if argv is None else list(argv)
            interrupts = _Interrupts()
            try:
                with interrupts, mock_attr(warnings, "showwarning", _one_line_warning), _threads(argv):
                    return fn(argv) or 0
            except (KeyboardInterrupt, SystemExit) as e:
                if isinstance(e, SystemExit) and not interrupts.seen:
                    raise
                if "--debug" in argv:
                    traceback.print_exc()
                print(f"featinv {name}: interrupted{'; rerun to resume' if resumes else ''}", file=sys.stderr)
                return 130
            except Exception as e:  # user errors are reported, anything else re-raised
                if not isinstance(e, USER_ERRORS) and type(e).__name__ not in USER_ERROR_NAMES:
                    raise
                if "--debug" in argv:
                    traceback.print_exc()
                print(f"featinv {name}: error: {one_line(e)}", file=sys.stderr)
                return 2
        return main
    return wrap


@contextlib.contextmanager
def blame(flag_name: str):
    """Prefix a user error raised in the block with the flag whose value caused it (unless it names it)."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        if str(e).startswith(flag_name):
            raise
        raise type(e)(f"{flag_name}: {e}") from None


@contextlib.contextmanager
def mock_attr(obj, name: str, value):
    """Set ``obj.name`` for the body, restore it after."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def cleanup_on_failure(path: str | os.PathLike):
    """If the body fails, remove ``path`` when it did not exist before and holds only empty folders
    (and the job's own lock file)."""
    path = Path(path)
    existed = path.exists()
    try:
        yield
    except BaseException:
        if not existed and path.is_dir():
            with contextlib.suppress(OSError):
                (path / LOCK_NAME).unlink()  # released by now (the lock's `with` is inside this one)
            for folder, _, _ in sorted(os.walk(path), key=lambda w: -len(w[0])):  # deepest first
                with contextlib.suppress(OSError):
                    os.rmdir(folder)  # only succeeds when empty
        raise
