"""``featinv perturb``: what the classifier perceives in corrupted and adversarial inputs."""
from __future__ import annotations

import argparse

from featinv.commands._analysis import add_common_args, check_common, parse_ints
from featinv.commands._args import count, positive_float, positive_int
from featinv.commands._common import Parser, command
from featinv.registry import CORRUPTIONS


def parse(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog="featinv perturb", description="Reconstruct clean, corrupted and adversarial inputs side by "
               "side with the same seeds, with the classifier's label on each image and reconstruction.")
    p.add_argument("--corruptions", default=",".join(CORRUPTIONS),
                   help=f"comma-separated from {', '.join(CORRUPTIONS)}, or 'none'")
    p.add_argument("--severities", default="1,2,3", help="corruption severities (1-3)")
    p.add_argument("--attack", choices=("pgd", "none"), default="pgd", help="adversarial attack")
    p.add_argument("--eps", type=positive_float, default=0.15, help="PGD L-inf budget (images in [0, 1]; what it "
                   "does to the demo classifier: benchmarks/RESULTS.md; ImageNet models are usually attacked at "
                   "4/255)")
    p.add_argument("--pgd-steps", type=positive_int, default=20, help="PGD steps")
    p.add_argument("--step-size", type=positive_float,
                   help="PGD step size (default: 2.5 eps / steps, Madry et al.'s rule)")
    p.add_argument("--target", type=count, help="targeted PGD towards this class (default: untargeted)")
    add_common_args(p)
    args = p.parse_args(argv)
    args.corruption_list = [] if args.corruptions == "none" else \
        [c.strip() for c in args.corruptions.split(",") if c.strip()]
    unknown = [c for c in args.corruption_list if c not in CORRUPTIONS]
    if unknown:
        raise ValueError(f"--corruptions: unknown {', '.join(unknown)}; choose from {', '.join(CORRUPTIONS)}")
    args.severity_list = parse_ints(args.severities, "--severities")
    if not args.severity_list or any(s not in (1, 2, 3) for s in args.severity_list):
        raise ValueError(f"--severities: {args.severities!r} must list values from 1, 2, 3")
    check_common(args)
    return args


@command("perturb", parse)
def main(args: argparse.Namespace) -> int:
    from featinv.analysis.reports import Attack, perturb_report
    from featinv.commands._analysis import inputs_from_args, pair_from_args, write_report
    from featinv.nets.backbone import check_index

    attack = None if args.attack == "none" else Attack(args.eps, args.pgd_steps, args.step_size, args.target)
    pair = pair_from_args(args)
    if args.target is not None:
        check_index(args.target, pair.extractor.head_weight().shape[0], "--target", "the classifier's classes:")
    images, names, labels = inputs_from_args(args, pair, example_digits="2,4,7")
    return write_report(args.out, "perturb.png",
                        lambda: perturb_report(pair, images, names, labels, args.corruption_list, args.severity_list,
                                               attack),
                        args.command_name)


if __name__ == "__main__":
    raise SystemExit(main())
