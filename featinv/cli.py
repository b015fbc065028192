"""The ``featinv`` command: ``featinv [--debug] <command> [options]``; each command is the ``main`` of a
module in :mod:`featinv.commands` (0 on success, 2 on a user error printed as one line).

Also ``featinv --version``, ``featinv help [<command>]`` and ``python -m featinv`` (:mod:`featinv.__main__`).
This module and the table below import no torch: the command list, ``--version`` and ``help`` print at once.
"""
from __future__ import annotations

import importlib
import sys

from featinv import __version__
from featinv.registry import PANELS, names

COMMANDS = {  # name -> (module, one-line help); modules are imported only when their command runs
    "demo": ("featinv.commands.demo", "run the whole recipe on scikit-learn's digits, on a CPU, in minutes"),
    "inspect": ("featinv.commands.inspect", "say what a checkpoint holds and which config it matches"),
    "convert": ("featinv.commands.convert", "a checkpoint as safetensors (--trust-pickle for a trusted old pickle)"),
    "build-control": ("featinv.commands.build_control", "miniSD checkpoint -> initial FeatInv checkpoint"),
    "export": ("featinv.commands.export", "a trained model as a shareable folder: weights, config, model card"),
    "train": ("featinv.commands.train", "train the control branch (one CPU to many GPUs)"),
    "reconstruct": ("featinv.commands.reconstruct", "reconstruct ImageNet-val images from their feature maps"),
    "evaluate": ("featinv.commands.evaluate", "feature similarity, accuracy and FID of reconstructions"),
    "steer": ("featinv.commands.steer", "steer feature maps along a concept direction and reconstruct each strength"),
    "compose": ("featinv.commands.compose", "reconstruct composite feature maps: interpolation, pasting, channels"),
    "concepts": ("featinv.commands.concepts", "find concepts in the feature map (factorisations, sparse autoencoders); "
                 "see, remove and steer by each"),
    "maps": ("featinv.commands.maps", "learn how an edit (or another network) moves the feature map; decode the "
             "mapped maps"),
    "perturb": ("featinv.commands.perturb", "reconstruct corrupted and adversarial inputs beside the clean ones"),
    "app": ("featinv.commands.app", f"interactive explorer in the browser: {names(PANELS).lower()}"),
}


def usage() -> str:
    """The command list (``featinv``, ``featinv --help``, ``featinv help``)."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return ("usage: featinv [--debug] <command> [options]\n       featinv --version | help [<command>]\n\n"
            "commands:\n" + "\n".join(lines) + "\n\n'featinv help <command>' (or 'featinv <command> --help') "
            "describes a command; --debug shows tracebacks of errors.")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = bool(argv) and argv[0] == "--debug"  # global form; `featinv <command> --debug` works too
    if debug:
        argv = argv[1:]
    if argv[:1] == ["--version"]:
        print(f"featinv {__version__}")
        return 0
    if argv[:1] == ["help"]:  # `featinv help <command>` is `featinv <command> --help`
        if len(argv) > 2:
            print(f"featinv: error: help takes one command name, got {' '.join(argv[1:])!r}", file=sys.stderr)
            return 2
        argv = argv[1:] + ["--help"] if len(argv) == 2 else ["--help"]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(usage())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"featinv: error: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main((["--debug"] if debug else []) + argv[1:])


if __name__ == "__main__":
    sys.exit(main())
