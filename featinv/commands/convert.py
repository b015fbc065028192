"""``featinv convert SRC DST.safetensors``: a checkpoint's state dict as a safetensors file.

SRC may also be a diffusers pipeline folder or a Hub id: it becomes a miniSD file in the reference layout.
With ``--minisd``, SRC is a control branch shipped alone: DST is the full model, written once.
The output is written tensor by tensor: peak memory is about one copy of the weights plus the largest tensor.

For a pickle the safe reader refuses (it names globals that need code execution), ``--trust-pickle``
unpickles it fully, once, so that every later read is of a plain safetensors file.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from featinv.commands._args import add_minisd_arg, checkpoint_source
from featinv.commands._common import Parser, command
from featinv.io import check_writable


def parse(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog="featinv convert", description=__doc__.splitlines()[0])
    p.add_argument("src", type=checkpoint_source, help="checkpoint: .ckpt (Lightning, LDM), .pt/.pth or .safetensors; or a diffusers pipeline "
                        "folder, an exported FeatInv folder, or the Hub id of one")
    p.add_argument("dst", help="output .safetensors file; must not exist")
    p.add_argument("--trust-pickle", action="store_true",
                   help="unpickle SRC fully (weights_only=False): RUNS ANY CODE THE FILE HOLDS; "
                        "only for a file from a source you trust")
    add_minisd_arg(p)
    args = p.parse_args(argv)
    if args.trust_pickle and args.minisd:
        raise ValueError("--trust-pickle: not with --minisd; convert the trusted pickle alone first, then pair the result")
    if not args.dst.endswith(".safetensors"):
        raise ValueError(f"dst: the output must be a .safetensors file, got {args.dst}")
    if Path(args.dst).exists():
        raise FileExistsError(f"dst: {args.dst} exists; refusing to overwrite it")
    check_writable(args.dst, "dst", is_file=True)
    return args


@command("convert", parse)
def main(args: argparse.Namespace) -> int:
    from featinv.checkpoint.convert import convert_to_safetensors

    report = convert_to_safetensors(args.src, args.dst, trust_pickle=args.trust_pickle, minisd=args.minisd)
    skipped = f"; left out {len(report['skipped'])} non-tensor entries" if report["skipped"] else ""
    print(f"wrote {report['tensors']} tensors to {report['out']}{skipped}")
    return 0
