"""What every command face shares: the parser, the error convention, the parse-then-run wrapper, the
output-folder cleanup (argument types and the model-source flags: :mod:`featinv.commands._args`).

Convention: ``main(argv=None) -> int``; 0 on success, 2 on an error the user caused (missing file,
bad flag, bad config or override, no CUDA), printed as ONE line ``featinv <command>: error: ...`` on
stderr; ``--debug`` prints the traceback as well. Any other exception is a bug and propagates.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import sys
import threading
import traceback
import warnings
from pathlib import Path
from typing import Callable

from featinv.config import LOCK_NAME, SettingError

# Errors a user causes; the library raises these with a message naming the file, key or shape at fault
# (CheckpointError is a ValueError). OmegaConf's errors and Lightning's MisconfigurationException (e.g.
# --accelerator gpu without a GPU) are matched by class name, so that parsing imports neither library.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, KeyError)
USER_ERROR_NAMES = ("OmegaConfBaseException", "MisconfigurationException")


def is_user_error(e: BaseException) -> bool:
    return isinstance(e, USER_ERRORS) or any(c.__name__ in USER_ERROR_NAMES for c in type(e).__mro__)


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
def _threads(threads: int):
    """torch's CPU threads by the one rule (:func:`featinv.runtime.configure_threads`) for the command's
    run, restored after it (for callers in one process, such as tests). torch is imported here, after the
    command line has been parsed and checked."""
    import torch

    from featinv.runtime import configure_threads

    before = torch.get_num_threads()
    configure_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def command(name: str, parse: Callable[[list[str]], argparse.Namespace], resumes: bool = False):
    """Decorate ``run(args) -> int | None`` into the face's ``main(argv=None) -> int``.

    ``parse(argv)`` parses and checks the command line without importing torch, timm or Lightning (they are
    imported by ``run``, which does the work), so ``--help`` and every mistake that needs no model are
    answered at once. torch's threads are set between the two (``args.threads`` where the face has it).

    An error the user caused prints as one line and exits 2 (``--debug``: with its traceback); Ctrl-C ends
    the command with one line (``interrupted; rerun to resume`` for a command that resumes) and exit
    status 130, as a shell reports SIGINT."""
    def wrap(run):
        @functools.wraps(run)
        def main(argv: list[str] | None = None) -> int:
            argv = sys.argv[1:] if argv is None else list(argv)
            interrupts = _Interrupts()
            try:
                with interrupts, mock_attr(warnings, "showwarning", _one_line_warning):
                    args = parse(argv)
                    with _threads(getattr(args, "threads", 0)):
                        return run(args) or 0
            except (KeyboardInterrupt, SystemExit) as e:
                if isinstance(e, SystemExit) and not interrupts.seen:
                    raise
                if "--debug" in argv:
                    traceback.print_exc()
                print(f"featinv {name}: interrupted{'; rerun to resume' if resumes else ''}", file=sys.stderr)
                return 130
            except Exception as e:  # user errors are reported, anything else re-raised
                if not is_user_error(e):
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
