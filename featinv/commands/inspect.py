"""``featinv inspect CHECKPOINT``: say what a checkpoint holds and whether it loads strictly.

Exit status: 0 when the strict load passes (for a partial file such as miniSD: of the components it
holds), 1 when it fails or cannot be checked (no config), 2 on a user error (missing or unreadable file).
"""
from __future__ import annotations

import argparse
import json

from featinv.commands._args import config_source, existing_path
from featinv.commands._common import Parser, command


def parse(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog="featinv inspect", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=existing_path, help=".safetensors, .ckpt (Lightning) or .pt/.pth file")
    p.add_argument("--config", type=config_source, default=None,
                   help="preset name or YAML (project or reference style) to check against; "
                        "default: the file's metadata, else inferred from its shapes")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p.parse_args(argv)


@command("inspect", parse)
def main(args: argparse.Namespace) -> int:
    """``featinv inspect CHECKPOINT [--config PRESET_OR_YAML] [--json]``; exit 1 when the strict load fails."""
    from featinv.checkpoint.inspect import describe, format_report

    info = describe(args.checkpoint, args.config)
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0 if loads(info) else 1


def loads(info: dict) -> bool:
    """Whether the file passed the strict load of what it holds: the full model, or for a partial file
    (e.g. miniSD) the components present. False when no config could be found to check against."""
    load = info["strict_load"]
    if load is None:
        return False
    return (load.get("present_components") or load["full"])["ok"]
