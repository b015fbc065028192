"""Arguments the analysis faces (steer, compose, perturb, concepts) share: the model pair, the inputs, sampling,
and list/box parsing. The analyses themselves are in :mod:`featinv.analysis`.

Parsing and :func:`check_common` import no torch; :func:`pair_from_args`, :func:`inputs_from_args` and
:func:`write_report` do the work (the faces call them from ``run``)."""
from __future__ import annotations

import dataclasses
import math
import sys

from featinv.commands._args import add_source_args, image_source, positive_int, sample_count, source_from_args
from featinv.commands._common import blame, cleanup_on_failure
from featinv.config import MAX_SAMPLES
from featinv.io import check_output_folder, check_writable, mark_output_folder

DIGITS = range(10)  # the demo pair's classes: scikit-learn's digits 0-9


def add_common_args(p, outputs: str = "the picture, table.md and table.json", images: str | None = None,
                    digits: bool = True) -> None:
    """--checkpoint/--backbone (a real model) or the demo pair; --images or held-out digits (``images``: what
    --images are for, when the default does not say it; ``digits``: whether --digits/--count pick them);
    sampling; --out (which holds ``outputs``)."""
    g = add_source_args(p, demo=True)
    g.add_argument("--device", default="auto", help="torch device: cpu, cuda[:N] or auto (cuda when available)")
    g = p.add_argument_group("inputs")
    g.add_argument("--images", nargs="+", type=image_source, help=images or "image files and/or folders (any size; "
                   "resized to the backbone's input); default on the demo: held-out digits")
    if digits:
        g.add_argument("--digits", help="demo: comma-separated digit classes, --count of each (e.g. 0,1,2; "
                                        "default: the command's example digits, or the first --count held-out digits)")
        g.add_argument("--count", type=positive_int, help="demo: digits per class (or in all; default 1 with --digits, "
                                                          "else 3)")
    else:
        p.set_defaults(digits=None, count=None)
    g = p.add_argument_group("sampling")
    g.add_argument("--samples", type=sample_count, default=1,
                   help=f"K reconstructions per input (K > 1 adds a spread map; at most {MAX_SAMPLES})")
    g.add_argument("--seed", type=int, help="base seed of the noise (default: the model's sampling seed)")
    g.add_argument("--steps", type=positive_int, help="sampler steps (default: the model's: demo 20, else 50)")
    p.add_argument("--out", required=True, help=f"output folder: {outputs}")
    p.add_argument("--overwrite", action="store_true", help="write into --out although it holds other files "
                   "(without it only a new or empty folder, or this command's earlier output, is written into)")
    p.set_defaults(command_name=p.prog.split()[-1])


def check_common(args) -> None:
    """The checks of :func:`add_common_args`' flags that need no model: --out may be written, --digits are digits
    of the demo (and only with it), a --checkpoint comes with --images. Sets ``args.digit_list``."""
    check_writable(args.out)
    check_output_folder(args.out, args.command_name, args.overwrite)
    source_from_args(args)  # the model-source flags' own checks (--minisd goes with --checkpoint)
    if args.checkpoint is not None and not args.images:
        raise ValueError("--images: give input images (files or folders) when running on --checkpoint")
    args.digit_list = None
    if args.digits is not None:
        if args.checkpoint is not None:
            raise ValueError("--digits: picks the demo pair's held-out digits; with --checkpoint, use --images")
        args.digit_list = parse_ints(args.digits, "--digits")
        bad = [d for d in args.digit_list if d not in DIGITS]
        if bad or not args.digit_list:
            raise ValueError(f"--digits: {args.digits!r}: the demo's classes are the digits "
                             f"{DIGITS[0]}-{DIGITS[-1]}")


def parse_floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag}: {text!r} is not a comma-separated list of numbers") from None
    if not values:
        raise ValueError(f"{flag}: {text!r} is empty")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{flag}: {text!r} holds {bad[0]}; every value must be a finite number")
    return values


def parse_ints(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag}: {text!r} is not a comma-separated list of integers") from None


def parse_box(text: str, flag: str = "--mask") -> list[float]:
    box = parse_floats(text, flag)
    if len(box) != 4:
        raise ValueError(f"{flag}: {text!r} must be four numbers x0,y0,x1,y1")
    return box


def pair_from_args(args):
    """The model pair the flags name (loaded, or trained on first use for the demo) -> featinv.pair.Pair."""
    import torch

    from featinv.pair import load_pair

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device available")
    pair = load_pair(source_from_args(args), device, log=lambda msg: print(msg, file=sys.stderr))
    changes = {"num_samples": args.samples, "seed": args.seed, "steps": args.steps}
    pair.sample_config = dataclasses.replace(pair.sample_config, **{k: v for k, v in changes.items() if v is not None})
    return pair


def inputs_from_args(args, pair, minimum: int = 1, example_digits: str | None = None, role: str = ""):
    """-> (images (N, 3, S, S) in [0, 1] on the pair's device, names, labels (N,) or None).

    example_digits: the demo digits (one each) when neither --digits nor --count is given. role: what the
    inputs are, for the message when fewer than ``minimum`` are given (e.g. "A and B")."""
    from featinv.analysis.common import demo_digits, load_images

    if args.images:
        with blame("--images"):
            images, names = load_images(args.images, pair.extractor.image_size)
        labels = None
    else:
        digits = args.digit_list
        if digits is None and not args.count and example_digits:
            digits = parse_ints(example_digits, "--digits")
        count = args.count if args.count is not None else (1 if digits else 3)
        images, names, labels = demo_digits(pair.data, digits, count)
    if len(images) < minimum:
        flag = "--images" if args.images else "--digits/--count"
        raise ValueError(f"{flag}: {args.command_name} needs at least {minimum} input images"
                         f"{f' ({role})' if role else ''}, got {len(images)}")
    return images.to(pair.extractor.mean.device), names, labels


def write_report(out: str, filename: str, make_report, command: str) -> int:
    """Run ``make_report() -> (picture, table, markdown)`` and write its files into ``out`` (removed again
    if the report fails and ``out`` was new), marked as ``command``'s; print the table and where the files are."""
    from featinv.analysis.common import write_outputs

    with cleanup_on_failure(out):
        picture, table, md = make_report()
        paths = write_outputs(out, picture, filename, md, table)
        mark_output_folder(out, command)
    print(md)
    print(f"picture: {paths['picture']}\ntables:  {paths['markdown']}, {paths['json']}", file=sys.stderr)
    return 0
