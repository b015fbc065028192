"""``featinv concepts``: find what the feature map encodes (a concept basis), and see each concept: where it
sits, what steering along it does, what an image looks like without it, which classes need it."""
from __future__ import annotations

import sys

from featinv.analysis.common import demo_digits, features_of, load_images
from featinv.analysis.concepts import METHODS, ConceptBasis, fit_concepts
from featinv.analysis.concepts_report import AtlasConfig, AtlasImages, concepts_report
from featinv.commands._analysis import add_common_args, inputs_from_args, pair_from_args, parse_floats, write_report
from featinv.commands._common import Parser, blame, command

DESCRIPTION = ("Fit a concept basis on the per-location channel vectors of the feature maps (or load one with "
               "--basis) and draw its atlas: per concept its most activating images with the heat map, held-out "
               "images steered along it, reconstructions with it removed, and the classes it matters most for. "
               "Writes concepts.png, concepts.safetensors (reuse with --basis, or steer with --direction "
               "concept:<file>:<i> in featinv steer), table.md and table.json.")


def fit_set(args, pair):
    """-> (images (N, 3, S, S), names, labels or None): the demo's training digits, else --images."""
    if args.images:
        with blame("--images"):
            images, names = load_images(args.images, pair.extractor.image_size)
        return images, names, None
    if pair.data is None:
        raise ValueError("--images: give the images to find concepts in (files or folders) with --checkpoint")
    x, y = pair.data["x_train"], pair.data["y_train"]
    return x.expand(-1, 3, -1, -1).clone(), [f"d{int(c)}_train{i}" for i, c in enumerate(y.tolist())], y


def held_set(args, pair, fit_images, fit_labels):
    """-> (images, labels or None): the demo's held-out digits, else the --images themselves."""
    if pair.data is None:
        return fit_images, fit_labels
    x, _, y = demo_digits(pair.data, None, len(pair.data["y_test"]))
    return x, y


@command("concepts")
def main(argv: list[str]) -> int:
    p = Parser(prog="featinv concepts", description=DESCRIPTION)
    g = p.add_argument_group("concepts")
    g.add_argument("-k", type=int, help="number of concepts (default 10; not with --basis)")
    g.add_argument("--method", help=f"{', '.join(METHODS)} (default: nmf for non-negative maps, else dict; "
                                    "not with --basis)")
    g.add_argument("--basis", help="a concepts.safetensors written before: draw its atlas instead of fitting")
    g.add_argument("--fit-seed", type=int, default=0, help="seed of the basis fit (the same seed, the same basis)")
    g.add_argument("--alphas", default="1,2", help="strengths of the steering strip (alpha = 0 is shown on top)")
    g.add_argument("--exemplars", type=int, default=3, help="most activating images shown per concept")
    g.add_argument("--removals", type=int, default=2, help="held-out images reconstructed without each concept")
    add_common_args(p)
    args = p.parse_args(argv)
    alphas = parse_floats(args.alphas, "--alphas")
    if args.basis and (args.k is not None or args.method is not None):
        raise ValueError("--basis: give either a basis file or -k/--method to fit one, not both")
    if args.method is not None and args.method not in METHODS:
        raise ValueError(f"--method: unknown concept method {args.method!r}: choose one of {', '.join(METHODS)}")
    if args.exemplars < 1 or args.removals < 1:
        raise ValueError("--exemplars and --removals must be >= 1")
    basis = None
    if args.basis:
        with blame("--basis"):
            basis = ConceptBasis.load(args.basis)
    pair = pair_from_args(args)
    ext = pair.extractor
    fit_images, fit_names, fit_labels = fit_set(args, pair)
    held_images, held_labels = held_set(args, pair, fit_images, fit_labels)
    steer_images, steer_names, _ = inputs_from_args(args, pair, example_digits="1,7")
    if args.images and not (args.count or args.digits):
        steer_images, steer_names = steer_images[:2], steer_names[:2]
    feats = features_of(ext, fit_images)
    if basis is None:
        k, locations = 10 if args.k is None else args.k, feats.shape[0] * feats.shape[2] * feats.shape[3]
        if not 0 < k <= locations:
            raise ValueError(f"-k: {k} concepts: must be between 1 and the {locations} feature-map locations "
                             "of the images fitted on")
        print(f"fitting {k} concepts on {feats.shape[0]} maps x {feats.shape[2]}x{feats.shape[3]} locations, "
              f"{feats.shape[1]} channels", file=sys.stderr)
        last = [-1]

        def progress(done, total):
            pct = int(100 * done / total) if total else 0
            if pct // 10 != last[0]:
                last[0] = pct // 10
                print(f"  fit {pct} %", file=sys.stderr)
        with blame("--method"):
            basis = fit_concepts(feats, k, args.method, seed=args.fit_seed, progress=progress, source=pair.name)
    else:
        with blame("--basis"):
            basis.check(feats)

    def report():
        images = AtlasImages(fit_images, fit_names, held_images, held_labels, steer_images, steer_names)
        picture, table, md = concepts_report(pair, basis, images, AtlasConfig(alphas, args.exemplars, args.removals))
        basis.save(f"{args.out}/concepts.safetensors")
        return picture, table, md
    code = write_report(args.out, "concepts.png", report, args.command_name)
    print(f"basis:   {args.out}/concepts.safetensors", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
