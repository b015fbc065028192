"""``featinv steer``: concept steering in the feature map, seen through reconstructions (FeatInv-Viz)."""
from __future__ import annotations

import argparse
import contextlib

import numpy as np
import torch
from PIL import Image

from featinv.analysis.common import image_set
from featinv.analysis.concepts import ConceptBasis, concept_direction
from featinv.analysis.reports import steer_report
from featinv.analysis.steering import (box_mask, channel_direction, class_direction, feature_range,
                                       mask_from_image, mean_difference_direction, probe_direction)
from featinv.commands._analysis import (add_common_args, inputs_from_args, pair_from_args, parse_box, parse_floats,
                                        set_threads, write_report)
from featinv.commands._common import HelpFormatter, Parser, command

DIRECTIONS = """directions (unit vectors in the feature map's channel space):
  class:<i>                    the classifier head's weight vector of class i
  channel:<i>                  channel i alone
  mean-diff:<concept>:<other>  mean feature of the concept images minus that of the others
  probe:<concept>:<other>      a logistic-regression probe's weight (concept activation vector)
  concept:<basis>:<i>          atom i of a concept basis written by featinv concepts (concepts.safetensors)
<concept>/<other> are image folders; on the demo pair also digit classes of the training split:
digit3, digits3+5, or rest (every digit not in the concept), e.g. mean-diff:digit3:rest.
alpha is in units of the input's mean per-location feature norm: alpha = 1 moves every location by
one typical feature vector's length along the direction."""


def direction_from_spec(spec: str, pair, reconstructor_features):
    """--direction -> (unit vector (C,), target class or None, description, the image sets' feature maps)."""
    kind, _, rest = spec.partition(":")
    c = pair.extractor.feature_shape[0]
    if kind in ("class", "channel"):
        try:
            index = int(rest)
        except ValueError:
            raise ValueError(f"--direction {spec!r}: {kind}:<index> needs an integer index") from None
        if kind == "class":
            return class_direction(pair.extractor, index), index, f"direction class:{index} (head weight)", []
        return channel_direction(c, index), None, f"direction channel:{index}", []
    if kind in ("mean-diff", "probe"):
        concept, sep, other = rest.rpartition(":")
        if not sep or not concept or not other:
            raise ValueError(f"--direction {spec!r}: use {kind}:<concept folder>:<other folder>")
        x_c, desc_c = image_set(concept, pair)
        x_o, desc_o = image_set(other, pair, exclude=concept)
        f_c, f_o = reconstructor_features(x_c), reconstructor_features(x_o)
        fn = mean_difference_direction if kind == "mean-diff" else probe_direction
        target = None
        if pair.data is not None and concept.startswith("digit") and concept[5:].isdigit():
            target = int(concept[5:])
        return fn(f_c, f_o), target, f"direction {kind}: {desc_c} vs. {desc_o}", [f_c, f_o]
    if kind == "concept":
        path, sep, index = rest.rpartition(":")
        if not sep or not path or not index.isdigit():
            raise ValueError(f"--direction {spec!r}: use concept:<basis file>:<concept index>")
        basis = ConceptBasis.load(path)
        if basis.channels != c:
            raise ValueError(f"concept basis {path!r} was fitted on {basis.channels} channels, the feature map has {c}")
        return concept_direction(basis, int(index)), None, f"direction concept:{index} ({basis.method}, {path})", []
    raise ValueError(f"--direction {spec!r}: unknown kind {kind!r} (class, channel, mean-diff, probe, concept)")


class _Help(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """The project's help format, with the epilog's lines kept as written."""


@contextlib.contextmanager
def flag(name: str):
    """Prefix a user error raised in the block with the flag it came from."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        if str(e).startswith(name):
            raise
        raise type(e)(f"{name}: {e}") from None


def load_mask(path: str, size: int) -> torch.Tensor:
    """A mask image of the backbone input's size -> (size, size) in [0, 1] (channel mean)."""
    with Image.open(path) as im:
        if im.size != (size, size):
            raise ValueError(f"mask image {path!r} is {im.size[0]}x{im.size[1]}; it must be {size}x{size} "
                             "(the backbone input)")
        return torch.from_numpy(np.asarray(im.convert("L"), dtype=np.float32) / 255.0)


@command("steer")
def main(argv: list[str]) -> int:
    p = Parser(prog="featinv steer", epilog=DIRECTIONS, formatter_class=_Help, description="Move feature maps along a direction and "
               "reconstruct every strength with the same seeds: a strip per input, a table per alpha.")
    p.add_argument("--direction", default="class:0", help="class:<i>, channel:<i>, mean-diff:<a>:<b>, probe:<a>:<b>, "
                   "concept:<basis>:<i>")
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
    set_threads()
    pair = pair_from_args(args)
    images, names, _ = inputs_from_args(args, pair)
    ext = pair.extractor
    feats_of = lambda x: torch.cat([ext(c.to(ext.mean.device)).float() for c in x.split(256)])  # noqa: E731
    with torch.no_grad(), flag("--direction"):
        direction, target, description, sets = direction_from_spec(args.direction, pair, feats_of)
    if args.target is not None:
        target = args.target
    size, grid_hw = ext.image_size, ext.feature_shape[1:]
    with flag("--mask"):
        mask = box_mask(box, size, grid_hw) if box else None
    if args.mask_image:
        with flag("--mask-image"):
            mask = mask_from_image(load_mask(args.mask_image, size), grid_hw)
    clamp = None
    if args.clamp:
        with torch.no_grad():
            ref = feats_of(pair.data["x_train"].expand(-1, 3, -1, -1)) if pair.data is not None else feats_of(images)
        clamp = feature_range(torch.cat([ref, *sets]), per_location=args.clamp == "location")
    return write_report(args.out, "steer.png",
                        lambda: steer_report(pair, images, names, direction, alphas, target, mask, clamp, description))


if __name__ == "__main__":
    raise SystemExit(main())
