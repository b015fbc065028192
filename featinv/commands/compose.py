"""``featinv compose``: composite feature maps (interpolation, pasting, channel selection, arithmetic)."""
from __future__ import annotations

from featinv.analysis.reports import compose_report
from featinv.analysis.steering import box_mask
from featinv.commands._analysis import (
    add_common_args,
    inputs_from_args,
    pair_from_args,
    parse_box,
    parse_floats,
    write_report,
)
from featinv.commands._common import Parser, command
from featinv.nets.backbone import check_index

OPS = ("interpolate", "paste", "channels", "arithmetic")


@command("compose")
def main(argv: list[str]) -> int:
    p = Parser(prog="featinv compose", description="Compose the feature maps of inputs A, B (and C) and reconstruct "
               "each composite with one seed: labelled grids and, per composite, the cosine between the "
               "reconstruction's features and the composed target.")
    p.add_argument("--ops", default=",".join(OPS), help=f"composites to make, comma-separated from {', '.join(OPS)} "
                   "(arithmetic A - B + C needs three inputs)")
    p.add_argument("--ts", default="0,0.25,0.5,0.75,1", help="interpolation points t of (1 - t) A + t B")
    p.add_argument("--mask", help="paste: the box x0,y0,x1,y1 (pixels of the backbone input) of B pasted into A "
                                  "(default: the left half)")
    p.add_argument("--channels", type=int, default=8, help="keep / remove the k channels contributing most to --class")
    p.add_argument("--class", dest="cls", type=int, help="class for the channel selection (default: A's top-1)")
    add_common_args(p)
    args = p.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in OPS]
    if unknown or not ops:
        raise ValueError(f"--ops: unknown composite(s) {unknown or args.ops!r}; choose from {', '.join(OPS)}")
    ts = parse_floats(args.ts, "--ts")
    box = parse_box(args.mask) if args.mask else None
    pair = pair_from_args(args)
    images, names, _ = inputs_from_args(args, pair, minimum=3 if "arithmetic" in ops else 2,
                                        example_digits="3,8,0")  # demo: A = 3, B = 8, C = 0
    ext = pair.extractor
    size = ext.image_size
    mask = box_mask(box or (0, 0, size / 2, size), size, ext.feature_shape[1:])
    if args.cls is not None:
        check_index(args.cls, ext.head_weight().shape[0], "--class", "the classifier's classes:")
    return write_report(args.out, "compose.png",
                        lambda: compose_report(pair, images, names, ts, mask, args.channels, args.cls, ops),
                        args.command_name)


if __name__ == "__main__":
    raise SystemExit(main())
