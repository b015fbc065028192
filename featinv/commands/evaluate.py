"""``featinv evaluate``: feature similarity, accuracy and FID of the reconstructions in a folder."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from featinv.checkpoint.config_file import from_dict, to_dict
from featinv.commands._common import Parser, cleanup_on_failure, command
from featinv.config import EVAL_DIR, MANIFEST, BackboneConfig
from featinv.io import check_writable
from featinv.jobs.evaluate import evaluate_folder, markdown
from featinv.nets.backbone import resolve_backbone


@command("evaluate")
def main(argv: list[str]) -> int:
    """``featinv evaluate``: metrics of a reconstruct folder, written to ``<out>/eval``."""
    p = Parser(prog="featinv evaluate", description="Evaluate the reconstructions written by `featinv reconstruct`.")
    p.add_argument("--out", required=True, help="the reconstruct output folder")
    p.add_argument("--backbone", help="backbone preset or timm name (default: the one in manifest.json)")
    p.add_argument("--backbone-checkpoint", help="local backbone weights file (offline use)")
    p.add_argument("--backbone-size", type=int, help="backbone input size")
    p.add_argument("--batch-size", type=int, default=16, help="original images per batch")
    p.add_argument("--fid", action=argparse.BooleanOptionalAction, default=True, help="compute FID")
    p.add_argument("--fid-weights", help="local Inception weights for torchmetrics' FID")
    p.add_argument("--device", help="torch device (default: cuda if available)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if not out.is_dir():
        raise FileNotFoundError(f"--out: reconstruct folder {str(out)!r} not found")
    check_writable(out / EVAL_DIR)
    manifest = out / MANIFEST
    saved = json.loads(manifest.read_text()).get("backbone") if manifest.is_file() else None
    if not saved and not args.backbone:
        raise ValueError(f"no backbone known for {out} ({manifest} names none): pass --backbone "
                         "(the one the reconstructions were made with)")
    base = from_dict(BackboneConfig, saved) if saved else BackboneConfig()
    backbone = resolve_backbone(args.backbone, args.backbone_checkpoint, args.backbone_size, base)
    print("featinv evaluate\n" + json.dumps({**vars(args), "backbone": to_dict(backbone)}, indent=2))
    with cleanup_on_failure(out / EVAL_DIR):
        summary = evaluate_folder(out, backbone, args.batch_size, args.fid, args.device, args.fid_weights)
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
