"""``featinv steer``: concept steering in the feature map, and code edits of a concept basis, seen through
reconstructions (FeatInv-Viz). The specs' syntax is :mod:`featinv.analysis.specs` (torch-free), their kinds the
tables DIRECTIONS and EDITS of :mod:`featinv.registry`."""
from __future__ import annotations

import argparse

from featinv.analysis.specs import parse_levels, split_spec
from featinv.commands._analysis import add_common_args, check_common, parse_box, parse_floats
from featinv.commands._args import count, image_file, positive_int
from featinv.commands._common import Parser, blame, command
from featinv.config import EDIT_DEFAULTS, STEER_CLAMP
from featinv.registry import DIRECTIONS, EDITS, Spec, describe

DIRECTION, ALPHAS = "class:0", "0,0.5,1,1.5,2"   # the defaults without --edit
LEVELS = ", ".join(f"{kind} q{q:g}" for kind, (q, _) in EDIT_DEFAULTS.items())   # featinv.config.EDIT_DEFAULTS
COUNTS = ", ".join(f"{kind} {n}" for kind, (_, n) in EDIT_DEFAULTS.items())


def listing(table: dict[str, Spec]) -> str:
    """A spec table as help lines: ``<kind>:<syntax>  help``."""
    return describe({f"{kind}:{entry.syntax}": entry for kind, entry in table.items()})


EPILOG = ("directions (unit vectors in the feature map's channel space):\n" + listing(DIRECTIONS) + """
<concept>/<other> are image folders; on the demo pair also digit classes of the training split:
digit3, digits3+5, or rest (every digit not in the concept), e.g. mean-diff:digit3:rest.

alpha is in units of the input's mean per-location feature norm: alpha = 1 moves every location by
one typical feature vector's length along the direction.

code edits of a concept basis (--edit instead of --direction; each location keeps its residual):
""" + listing(EDITS) + f"""
<basis> is a file written by featinv concepts. <a>, <b> and <concepts> other than indices are image sets:
folders, on the demo pair also digit classes of the training split (digit3, digits3+5). An image set's top
concepts are those with the largest mean code on it minus on the others (on the demo: every other training
digit; else the inputs), and its levels quantiles of its own codes; concept indices take their levels from
the reference maps (the demo's training digits, else the inputs). Defaults: --levels {LEVELS};
--concepts {COUNTS}: chosen for a TopK SAE on the training digits by benchmarks/bench_concepts.py --only-edits.""")


def check_edit(args: argparse.Namespace, demo: bool) -> None:
    """--edit and the flags that go with it (--levels, --concepts; --alphas does not); sets ``args.level_list``."""
    if args.direction is not None:
        raise ValueError("--edit: give a direction (--direction) or a code edit (--edit), not both")
    if args.alphas is not None:
        raise ValueError("--alphas: strengths along --direction; an --edit takes --levels")
    kind, fields = args.spec = split_spec(args.edit, EDITS, "--edit", demo)
    args.level_list = parse_levels(args.levels or f"q{EDIT_DEFAULTS[kind][0]:g}")
    if args.concepts is not None and kind == "set" and isinstance(fields[1], tuple):
        raise ValueError(f"--concepts: counts an image set's top concepts; {args.edit!r} names its concepts")


def parse(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog="featinv steer", epilog=EPILOG, description="Move feature maps along a direction, or edit their "
               "concept codes, and reconstruct every strength with the same seeds: a strip per input, a table per "
               "alpha or level.")
    p.add_argument("--direction", help=f"the direction: one of the specs listed below (default: {DIRECTION})")
    p.add_argument("--alphas", help=f"comma-separated strengths (0 is always shown first; default: {ALPHAS})")
    g = p.add_argument_group("code edits")
    g.add_argument("--edit", help="a code edit of a concept basis instead of a direction: one of the specs listed "
                                  "below")
    g.add_argument("--levels", help="comma-separated levels, each q<quantile> (a quantile in [0, 1] of the concept's "
                   "non-zero codes) or a number (a code in feature units); a column each, after the unedited "
                   f"reconstruction (default: {LEVELS})")
    g.add_argument("--concepts", type=positive_int, help="how many of an image set's top concepts an edit moves "
                   f"(default: {COUNTS}; at most the basis's k)")
    p.add_argument("--target", type=count, help="class whose probability the table reports (default: from the "
                                                "direction, or the digit class an edit moves to)")
    p.add_argument("--mask", help="steer or edit only inside this box x0,y0,x1,y1 (pixels of the backbone input)")
    p.add_argument("--mask-image", type=image_file, help="steer or edit only where this image is bright (grey levels "
                   "weigh the edit; the backbone input's size)")
    p.add_argument("--clamp", choices=("channel", "location", "none"), default=STEER_CLAMP,
                   help="keep edited features in the backbone's range: the min/max of reference features (the demo's "
                   "training digits, else the inputs; and the image sets of the direction or edit) per channel, or "
                   "per channel and location (tighter; needs many references); past that range reconstructions stop "
                   "following the edit (docs/analyses.md); the app's Steer panel starts from the same")
    add_common_args(p)
    args = p.parse_args(argv)
    demo = args.checkpoint is None
    if args.edit is not None:
        check_edit(args, demo)
    else:
        for flag, value in (("--levels", args.levels), ("--concepts", args.concepts)):
            if value is not None:
                raise ValueError(f"{flag}: goes with --edit (a code edit of a concept basis)")
        args.direction = args.direction or DIRECTION
        args.alpha_list = parse_floats(args.alphas or ALPHAS, "--alphas")
        args.spec = split_spec(args.direction, DIRECTIONS, "--direction", demo)
    args.box = parse_box(args.mask) if args.mask else None
    if args.mask and args.mask_image:
        raise ValueError("--mask-image: give either a box (--mask) or a mask image, not both")
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


def direction_report(args: argparse.Namespace, pair, images, names, mask):
    """--direction: its report, to run (steered along the direction at each alpha)."""
    import torch

    from featinv.analysis.common import features_of
    from featinv.analysis.directions import parse_direction
    from featinv.analysis.reports import steer_report
    from featinv.analysis.steering import feature_range

    with blame("--direction"):
        parsed = parse_direction(args.direction, pair)
    target = parsed.target if args.target is None else args.target
    clamp = None
    if args.clamp != "none":
        ref = features_of(pair.extractor, pair.data["x_train"].expand(-1, 3, -1, -1) if pair.data is not None
                          else images)
        clamp = feature_range(torch.cat([ref, *parsed.reference_feats]), per_location=args.clamp == "location")
    return lambda: steer_report(pair, images, names, parsed.vector, args.alpha_list, target, mask, clamp,
                                parsed.description)


def edit_report(args: argparse.Namespace, pair, images, names, mask, basis):
    """--edit: its report, to run (the inputs' maps edited at each level, in steer_report's strip)."""
    import torch

    from featinv.analysis.directions import edit_maps, parse_edit
    from featinv.analysis.reports import reconstructor, steer_report
    from featinv.analysis.steering import feature_range

    feats = reconstructor(pair).features(images)
    with blame("--edit"):
        edit = parse_edit(args.edit, pair, feats, args.concepts, basis)
    clamp = None
    if args.clamp != "none":  # the references: the demo's training digits (else the inputs) and the edit's folders
        clamp = feature_range(torch.cat(edit.reference_feats), per_location=args.clamp == "location")
    edited = edit_maps(edit, feats, args.level_list, mask, clamp)
    target = edit.target if args.target is None else args.target
    extra = {"edit": args.edit, "zeroed": edit.zeroed, "raised": edit.raised}
    return lambda: steer_report(pair, images, names, None, (), target, mask, clamp, edit.description, edited=edited,
                                levels=[level.label for level in args.level_list], extra=extra)


@command("steer", parse)
def main(args: argparse.Namespace) -> int:
    from featinv.analysis.concepts import ConceptBasis
    from featinv.analysis.directions import edit_basis
    from featinv.analysis.steering import box_mask, mask_from_image
    from featinv.commands._analysis import inputs_from_args, pair_from_args, write_report

    basis = None  # a basis file is read (and checked finite, and against the spec) before the model loads
    if args.edit is not None:
        with blame("--edit"):
            basis = edit_basis(args.edit, demo=args.checkpoint is None)
        if args.concepts is not None and args.concepts > basis.k:
            raise ValueError(f"--concepts: {args.concepts} concepts asked for; the basis has {basis.k}")
    elif args.spec[0] == "concept":
        with blame("--direction"):
            ConceptBasis.load(args.spec[1][0])
    pair = pair_from_args(args)
    images, names, _ = inputs_from_args(args, pair)
    size, grid_hw = pair.extractor.image_size, pair.extractor.feature_shape[1:]
    mask = None
    if args.box:
        with blame("--mask"):
            mask = box_mask(args.box, size, grid_hw)
    if args.mask_image:
        mask = mask_from_image(load_mask(args.mask_image, size), grid_hw)
    if args.edit is not None:
        report = edit_report(args, pair, images, names, mask, basis)
    else:
        report = direction_report(args, pair, images, names, mask)
    return write_report(args.out, "steer.png", report, args.command_name)


if __name__ == "__main__":
    raise SystemExit(main())
