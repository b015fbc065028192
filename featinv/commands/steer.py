"""``featinv steer``: concept steering in the feature map, seen through reconstructions (FeatInv-Viz)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from featinv.analysis.common import features_of
from featinv.analysis.directions import DIRECTION_SPECS, parse_direction
from featinv.analysis.reports import steer_report
from featinv.analysis.steering import box_mask, feature_range, mask_from_image
from featinv.commands._analysis import (
    add_common_args,
    inputs_from_args,
    pair_from_args,
    parse_box,
    parse_floats,
    write_report,
)
from featinv.commands._common import Parser, blame, command

DIRECTIONS = DIRECTION_SPECS + """
alpha is in units of the input's mean per-location feature norm: alpha = 1 moves every location by
one typical feature vector's length along the direction."""


def load_mask(path: str, size: int) -> torch.Tensor:
    """A mask image of the backbone input's size -> (size, size) in [0, 1] (channel mean)."""
    with Image.open(path) as im:
        if im.size != (size, size):
            raise ValueError(f"mask image {path!r} is {im.size[0]}x{im.size[1]}; it must be {size}x{size} "
                             "(the backbone input)")
        return torch.from_numpy(np.asarray(im.convert("L"), dtype=np.float32) / 255.0)


@command("steer")
def main(argv: list[str]) -> int:
    p = Parser(prog="featinv steer", epilog=DIRECTIONS, description="Move feature maps along a direction and "
               "reconstruct every strength with the same seeds: a strip per input, a table per alpha.")
    p.add_argument("--direction", default="class:0", help="the direction: one of the specs listed below")
    p.add_argument("--alphas", default="0,0.5,1,1.5,2", help="comma-separated strengths (0 is always shown first)")
    p.add_argument("--target", type=int, help="class whose probability the table reports (default: from the direction)")
    p.add_argument("--mask", help="steer only inside this box x0,y0,x1,y1 (pixels of the backbone input)")
    p.add_argument("--mask-image", help="steer only where this image is bright (grey levels weigh the edit; "
                   "the backbone input's size)")
    p.add_argument("--clamp", choices=("channel", "location"), help="keep edited features in the backbone's "
                   "range: the min/max of reference features (the demo's training digits, else the inputs and the "
                   "direction's image sets) per channel, or per channel and location (tighter; needs many references)")
    add_common_args(p)
    args = p.parse_args(argv)
    alphas = parse_floats(args.alphas, "--alphas")
    box = parse_box(args.mask) if args.mask else None
    pair = pair_from_args(args)
    images, names, _ = inputs_from_args(args, pair)
    ext = pair.extractor
    with blame("--direction"):
        parsed = parse_direction(args.direction, pair)
    target = parsed.target if args.target is None else args.target
    size, grid_hw = ext.image_size, ext.feature_shape[1:]
    with blame("--mask"):
        mask = box_mask(box, size, grid_hw) if box else None
    if args.mask_image:
        with blame("--mask-image"):
            mask = mask_from_image(load_mask(args.mask_image, size), grid_hw)
    clamp = None
    if args.clamp:
        ref = features_of(ext, pair.data["x_train"].expand(-1, 3, -1, -1) if pair.data is not None else images)
        clamp = feature_range(torch.cat([ref, *parsed.reference_feats]), per_location=args.clamp == "location")
    return write_report(args.out, "steer.png",
                        lambda: steer_report(pair, images, names, parsed.vector, alphas, target, mask, clamp,
                                                     parsed.description),
                        args.command_name)


if __name__ == "__main__":
    raise SystemExit(main())
