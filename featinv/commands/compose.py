"""``featinv compose``: composite feature maps (interpolation, pasting, channel selection, arithmetic)."""
from __future__ import annotations

import argparse
from pathlib import Path

from featinv.commands._analysis import add_common_args, check_common, parse_box, parse_floats
from featinv.commands._args import count, positive_int
from featinv.commands._common import Parser, blame, command

OPS = ("interpolate", "paste", "channels", "arithmetic")


def parse(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog="featinv compose", description="Compose the feature maps of inputs A, B (and C) and reconstruct "
               "each composite with one seed: labelled grids and, per composite, the cosine between the "
               "reconstruction's features and the composed target.")
    p.add_argument("--ops", default=",".join(OPS), help=f"composites to make, comma-separated from {', '.join(OPS)} "
                   "(arithmetic A - B + C needs three inputs)")
    p.add_argument("--ts", default="0,0.25,0.5,0.75,1", help="interpolation points t of (1 - t) A + t B")
    p.add_argument("--mask", help="paste: the box x0,y0,x1,y1 (pixels of the backbone input) of B pasted into A "
                                  "(default: the left half)")
    p.add_argument("--channels", type=positive_int, default=8,
                   help="keep / remove the k channels contributing most to --class")
    p.add_argument("--class", dest="cls", type=count, help="class for the channel selection (default: A's top-1)")
    add_common_args(p)
    args = p.parse_args(argv)
    args.op_list = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in args.op_list if o not in OPS]
    if unknown or not args.op_list:
        raise ValueError(f"--ops: unknown composite(s) {unknown or args.ops!r}; choose from {', '.join(OPS)}")
    args.t_list = parse_floats(args.ts, "--ts")
    args.box = parse_box(args.mask) if args.mask else None
    args.minimum, args.role = (3, "A, B and C for arithmetic") if "arithmetic" in args.op_list else (2, "A and B")
    if args.images and all(Path(i).is_file() for i in args.images) and len(args.images) < args.minimum:
        raise ValueError(f"--images: compose needs at least {args.minimum} input images ({args.role}), "
                         f"got {len(args.images)}")
    check_common(args)
    return args


@command("compose", parse)
def main(args: argparse.Namespace) -> int:
    from featinv.analysis.reports import compose_report
    from featinv.analysis.steering import box_mask
    from featinv.commands._analysis import inputs_from_args, pair_from_args, write_report
    from featinv.nets.backbone import check_index

    pair = pair_from_args(args)
    ext = pair.extractor
    channels = ext.feature_shape[0]
    if args.channels > channels:
        raise ValueError(f"--channels: {args.channels} is more than the feature map's {channels} channels")
    if args.cls is not None:
        check_index(args.cls, ext.head_weight().shape[0], "--class", "the classifier's classes:")
    images, names, _ = inputs_from_args(args, pair, minimum=args.minimum, role=args.role,
                                        example_digits="3,8,0")  # demo: A = 3, B = 8, C = 0
    size = ext.image_size
    with blame("--mask"):
        mask = box_mask(args.box or (0, 0, size / 2, size), size, ext.feature_shape[1:])
    return write_report(args.out, "compose.png",
                        lambda: compose_report(pair, images, names, args.t_list, mask, args.channels, args.cls,
                                               args.op_list),
                        args.command_name)


if __name__ == "__main__":
    raise SystemExit(main())
