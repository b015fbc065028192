"""``featinv build-control MINISD OUT``: miniSD checkpoint -> the initial FeatInv checkpoint."""
from __future__ import annotations

import argparse
from pathlib import Path

from featinv.commands._args import checkpoint_source, config_source, positive_int
from featinv.commands._common import Parser, command
from featinv.config import BACKBONE_PRESETS, BackboneConfig
from featinv.io import check_writable


def parse(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog="featinv build-control", description=__doc__.splitlines()[0])
    p.add_argument("minisd", type=checkpoint_source, help="miniSD checkpoint (.ckpt, .pt or .safetensors), diffusers pipeline folder "
                                  "(model_index.json) or Hub id (owner/name; the cache is tried first)")
    p.add_argument("out", help="output FeatInv checkpoint (.safetensors); must not exist")
    p.add_argument("--config", type=config_source, help="model config (preset or YAML); default: the checkpoint's metadata, a "
                                    "pipeline's config.json files, else inferred from the checkpoint's shapes")
    p.add_argument("--backbone", default="convnext_base",
                   help="backbone preset or timm name whose feature channels the adapter takes")
    p.add_argument("--hint-channels", type=positive_int, help="adapter input channels (overrides --backbone)")
    p.add_argument("--seed", type=int, default=0, help="seed of the new adapter layers' initialisation")
    args = p.parse_args(argv)
    if not str(args.out).endswith(".safetensors"):
        p.error(f"out: the output must be a .safetensors file, got {args.out}")
    if Path(args.out).exists():
        raise FileExistsError(f"out: {args.out} exists; refusing to overwrite it")
    check_writable(args.out, "out", is_file=True)
    return args


@command("build-control", parse)
def main(args: argparse.Namespace) -> int:
    from featinv.checkpoint.build_control import backbone_channels, build_control
    from featinv.checkpoint.config_file import load_config

    channels = args.hint_channels
    if channels is None:
        bb = BACKBONE_PRESETS.get(args.backbone, BackboneConfig(name=args.backbone))
        channels = backbone_channels(bb)
    cfg = load_config(args.config).model if args.config else None
    report = build_control(args.minisd, args.out, cfg, channels, args.seed)
    for note in report["notes"]:
        print(f"note: {note}")
    print(f"kept from {args.minisd}: " + ", ".join(f"{c} {n} tensors" for c, n in report["kept"].items()))
    print(f"copied into the control branch (and checked equal): {report['copied']} tensors "
          "(time_embed, input_blocks, middle_block)")
    print(f"new: {len(report['new'])} tensors (feature adapter for {channels} channels, zero convs); "
          f"zero-initialised: {len(report['zero_initialised'])}")
    print(f"wrote {report['out']}")
    return 0
