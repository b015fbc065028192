"""The ``featinv`` command: ``featinv <subcommand> [options]``; each subcommand is a module's ``main``."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {  # name -> (module, one-line help); modules are imported only when their command runs
    "demo": ("featinv.demo", "run the whole recipe on scikit-learn's digits, on a CPU, in minutes"),
    "inspect": ("featinv.inspect_checkpoint", "say what a checkpoint holds and which config it matches"),
    "build-control": ("featinv.build_control", "miniSD checkpoint -> initial FeatInv checkpoint"),
    "train": ("featinv.training", "train the control branch (one CPU to many GPUs)"),
    "reconstruct": ("featinv.reconstruct", "reconstruct ImageNet-val images from their feature maps"),
    "evaluate": ("featinv.evaluate", "feature similarity, accuracy and FID of reconstructions"),
    "convert": ("featinv.commands.convert", "a checkpoint as safetensors (--trust-pickle for a trusted old pickle)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
        print("usage: featinv <command> [options]\n\ncommands:\n" + "\n".join(lines)
              + "\n\n'featinv <command> --help' describes each command.")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nfeatinv: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
