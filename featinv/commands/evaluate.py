"""``featinv evaluate``: feature similarity, accuracy and FID of the reconstructions in a folder."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from featinv.commands._args import existing_file, positive_int
from featinv.commands._common import Parser, cleanup_on_failure, command
from featinv.config import EVAL_DIR, MANIFEST
from featinv.io import check_writable


def parse(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog="featinv evaluate", description="Evaluate the reconstructions written by `featinv reconstruct`; "
               f"the metrics go to <out>/{EVAL_DIR}/ and their table to stdout.")
    p.add_argument("--out", required=True, help="the reconstruct output folder")
    p.add_argument("--backbone", help=f"backbone preset or timm name (default: the one in {MANIFEST})")
    p.add_argument("--backbone-checkpoint", type=existing_file, help="local backbone weights file (offline use)")
    p.add_argument("--backbone-size", type=positive_int, help="backbone input size")
    p.add_argument("--batch-size", type=positive_int, default=16, help="original images per batch")
    p.add_argument("--fid", action=argparse.BooleanOptionalAction, default=True, help="compute FID")
    p.add_argument("--fid-weights", type=existing_file, help="local Inception weights for torchmetrics' FID")
    p.add_argument("--device", help="torch device (default: cuda if available)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if not out.is_dir():
        raise FileNotFoundError(f"--out: reconstruct folder {str(out)!r} not found")
    manifest = out / MANIFEST
    if not manifest.is_file():
        raise ValueError(f"--out: {str(out)!r} is not a reconstruction folder (it has no {MANIFEST}; "
                         "`featinv reconstruct --out` writes one)")
    try:
        args.saved_backbone = json.loads(manifest.read_text()).get("backbone")
    except (ValueError, AttributeError):
        raise ValueError(f"{manifest}: not a reconstruction manifest (unreadable JSON object)") from None
    if not args.saved_backbone and not args.backbone:
        raise ValueError(f"{manifest} names no backbone: pass --backbone (the one the reconstructions were made with)")
    check_writable(out / EVAL_DIR)
    return args


@command("evaluate", parse)
def main(args: argparse.Namespace) -> int:
    """``featinv evaluate``: metrics of a reconstruct folder, written to ``<out>/eval``; the table on stdout."""
    from featinv.checkpoint.config_file import from_dict
    from featinv.config import BackboneConfig
    from featinv.jobs.evaluate import evaluate_folder, markdown
    from featinv.nets.backbone import resolve_backbone

    out = Path(args.out)
    base = from_dict(BackboneConfig, args.saved_backbone) if args.saved_backbone else BackboneConfig()
    backbone = resolve_backbone(args.backbone, args.backbone_checkpoint, args.backbone_size, base)
    print(f"featinv evaluate: {out} with backbone {backbone.name} at {backbone.image_size} px"
          + (f" ({backbone.checkpoint})" if backbone.checkpoint else ""), file=sys.stderr)
    with cleanup_on_failure(out / EVAL_DIR):
        summary = evaluate_folder(out, backbone, args.batch_size, args.fid, args.device, args.fid_weights)
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
