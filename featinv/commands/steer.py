"""``featinv steer``: concept steering in the feature map, seen through reconstructions (FeatInv-Viz)."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from featinv.commands._analysis import add_common_args, check_common, parse_box, parse_floats
from featinv.commands._args import count, image_file
from featinv.commands._common import Parser, blame, command
from featinv.config import STEER_CLAMP
from featinv.registry import DIRECTIONS, describe

EPILOG = ("directions (unit vectors in the feature map's channel space):\n"
          + describe({f"{kind}:{entry.syntax}": entry for kind, entry in DIRECTIONS.items()}) + """
<concept>/<other> are image folders; on the demo pair also digit classes of the training split:
digit3, digits3+5, or rest (every digit not in the concept), e.g. mean-diff:digit3:rest.

alpha is in units of the input's mean per-location feature norm: alpha = 1 moves every location by
one typical feature vector's length along the direction.""")

DIGIT_SET = re.compile(r"digits?\d(\+\d)*|rest")


def check_direction(spec: str, demo: bool) -> None:
    """The parts of a direction spec that need no model: its kind, its indices, its files and folders."""
    kind, _, rest = spec.partition(":")
    if kind not in DIRECTIONS:
        raise ValueError(f"--direction: {spec!r}: unknown kind {kind!r} (choose from {', '.join(DIRECTIONS)})")
    use = f"--direction: {spec!r}: use {kind}:{DIRECTIONS[kind].syntax}"
    if kind in ("class", "channel"):
        if not rest.isdigit():
            raise ValueError(use)
    elif kind == "concept":
        path, sep, index = rest.rpartition(":")
        if not sep or not path or not index.isdigit():
            raise ValueError(use)
        if not Path(path).is_file():
            raise ValueError(f"--direction: concept basis {path!r} " + ("is a folder; a concepts.safetensors file "
                             "is expected" if Path(path).is_dir() else "not found"))
    else:
        concept, sep, other = rest.rpartition(":")
        if not sep or not concept or not other:
            raise ValueError(use)
        for part in (concept, other):
            if not Path(part).is_dir() and not (demo and DIGIT_SET.fullmatch(part)):
                raise ValueError(f"--direction: {part!r} is not an image folder"
                                 + (" nor digit classes (digit3, digits3+5, rest)" if demo else ""))


def parse(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog="featinv steer", epilog=EPILOG, description="Move feature maps along a direction and "
               "reconstruct every strength with the same seeds: a strip per input, a table per alpha.")
    p.add_argument("--direction", default="class:0", help="the direction: one of the specs listed below")
    p.add_argument("--alphas", default="0,0.5,1,1.5,2", help="comma-separated strengths (0 is always shown first)")
    p.add_argument("--target", type=count, help="class whose probability the table reports (default: from the "
                                                "direction)")
    p.add_argument("--mask", help="steer only inside this box x0,y0,x1,y1 (pixels of the backbone input)")
    p.add_argument("--mask-image", type=image_file, help="steer only where this image is bright (grey levels "
                   "weigh the edit; the backbone input's size)")
    p.add_argument("--clamp", choices=("channel", "location", "none"), default=STEER_CLAMP,
                   help="keep edited features in the backbone's range: the min/max of reference features (the demo's "
                   "training digits, else the inputs and the direction's image sets) per channel, or per channel "
                   "and location (tighter; needs many references); past that range reconstructions stop following "
                   "the edit (docs/analyses.md); the app's Steer panel starts from the same")
    add_common_args(p)
    args = p.parse_args(argv)
    args.alpha_list = parse_floats(args.alphas, "--alphas")
    args.box = parse_box(args.mask) if args.mask else None
    if args.mask and args.mask_image:
        raise ValueError("--mask-image: give either a box (--mask) or a mask image, not both")
    check_direction(args.direction, demo=args.checkpoint is None)
    check_common(args)
    return args


def load_mask(path: str, size: int):
    """A mask image of the backbone input's size -> (size, size) in [0, 1] (channel mean)."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as im:
        if im.size != (size, size):
            raise ValueError(f"--mask-image: {path!r} is {im.size[0]}x{im.size[1]}; it must be {size}x{size} "
                             "(the backbone input)")
        try:
            grey = np.asarray(im.convert("L"), dtype=np.float32)
        except OSError as e:  # a header that parses, pixels that do not (a truncated file)
            raise ValueError(f"--mask-image: {path!r} cannot be read: {e}") from None
    return torch.from_numpy(grey / 255.0)


@command("steer", parse)
def main(args: argparse.Namespace) -> int:
    import torch

    from featinv.analysis.common import features_of
    from featinv.analysis.concepts import ConceptBasis
    from featinv.analysis.directions import parse_direction
    from featinv.analysis.reports import steer_report
    from featinv.analysis.steering import box_mask, feature_range, mask_from_image
    from featinv.commands._analysis import inputs_from_args, pair_from_args, write_report

    if args.direction.startswith("concept:"):
        with blame("--direction"):  # the basis file is read (and checked finite) before the model loads
            ConceptBasis.load(args.direction.partition(":")[2].rpartition(":")[0])
    pair = pair_from_args(args)
    images, names, _ = inputs_from_args(args, pair)
    ext = pair.extractor
    with blame("--direction"):
        parsed = parse_direction(args.direction, pair)
    target = parsed.target if args.target is None else args.target
    size, grid_hw = ext.image_size, ext.feature_shape[1:]
    mask = None
    if args.box:
        with blame("--mask"):
            mask = box_mask(args.box, size, grid_hw)
    if args.mask_image:
        mask = mask_from_image(load_mask(args.mask_image, size), grid_hw)
    clamp = None
    if args.clamp != "none":
        ref = features_of(ext, pair.data["x_train"].expand(-1, 3, -1, -1) if pair.data is not None else images)
        clamp = feature_range(torch.cat([ref, *parsed.reference_feats]), per_location=args.clamp == "location")
    return write_report(args.out, "steer.png",
                        lambda: steer_report(pair, images, names, parsed.vector, args.alpha_list, target, mask,
                                             clamp, parsed.description),
                        args.command_name)


if __name__ == "__main__":
    raise SystemExit(main())
