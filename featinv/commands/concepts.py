"""``featinv concepts``: find what the feature map encodes (a concept basis), and see each concept: where it
sits, what steering along it does, what an image looks like without it, which classes need it."""
from __future__ import annotations

import argparse
import dataclasses
import sys

from featinv.commands._analysis import add_common_args, check_common, parse_floats, parse_ints
from featinv.commands._args import existing_dir, existing_file, finite_float, positive_int
from featinv.commands._common import Parser, blame, command
from featinv.registry import CONCEPT_METHODS, IMPORTED_METHODS, SAE_METHODS, describe

SAES = ("topk", "batchtopk")  # the methods that take --top-k
FITTED = tuple(m for m in CONCEPT_METHODS if m not in IMPORTED_METHODS)

DESCRIPTION = ("Fit a concept basis on the per-location channel vectors of the feature maps (or load one with "
               "--basis) and draw its atlas: per concept its most activating images with the heat map, held-out "
               "images steered along it, reconstructions with it removed, and the classes it matters most for. "
               "Writes concepts.png, concepts.safetensors (reuse with --basis, or steer with --direction "
               "concept:<file>:<i> in featinv steer), table.md, table.json, atlas.html (every concept in one page "
               "that opens from disk: sortable, filterable, thumbnails with heat maps) and index.json (the concept "
               "index: frequency, mean code, top images, the classes each matters for).")


def fit_set(args, pair):
    """-> (images (N, 3, S, S), names, labels or None): the demo's training digits, else --images."""
    from featinv.analysis.common import load_images

    if args.images:
        with blame("--images"):
            images, names = load_images(args.images, pair.extractor.image_size)
        return images, names, None
    x, y = pair.data["x_train"], pair.data["y_train"]
    return x.expand(-1, 3, -1, -1).clone(), [f"d{int(c)}_train{i}" for i, c in enumerate(y.tolist())], y


def held_set(args, pair, fit_images, fit_labels):
    """-> (images, labels or None): the demo's held-out digits, else the --images themselves."""
    from featinv.analysis.common import demo_digits

    if pair.data is None:
        return fit_images, fit_labels
    x, _, y = demo_digits(pair.data, None, len(pair.data["y_test"]))
    return x, y


def parse(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog="featinv concepts", description=DESCRIPTION, epilog="methods:\n" + describe(CONCEPT_METHODS))
    g = p.add_argument_group("concepts")
    g.add_argument("-k", type=positive_int, help="number of concepts (default 10; not with --basis; at most the "
                   "feature channels for nmf and pca, the fitted vectors for dict and kmeans; any number for the "
                   "sparse autoencoders)")
    g.add_argument("--top-k", type=positive_int, help="a sparse autoencoder's active latents per location (default: "
                   "channels / 8, at most 32, below -k)")
    g.add_argument("--method", choices=FITTED, help="how to fit the basis, one of those listed "
                   "below (default: nmf for non-negative maps, else dict; not with --basis)")
    g.add_argument("--basis", type=existing_file,
                   help="a concepts.safetensors written before: draw its atlas instead of fitting")
    g.add_argument("--import-sae", type=existing_file, metavar="FILE",
                   help="an Overcomplete TopKSAE/BatchTopKSAE/JumpSAE state dict (.pt, .pth or .safetensors, read "
                   "without running code) as the basis: its atlas, and its concepts.safetensors for --basis and "
                   "steer; with --sae-type (and --top-k for topk and batchtopk)")
    g.add_argument("--sae-type", choices=SAE_METHODS, default="topk", help="the imported SAE's kind")
    g.add_argument("--sae-threshold", type=finite_float,
                   help="a BatchTopK SAE's inference threshold (Overcomplete's running_threshold; not in its state "
                        "dict)")
    g.add_argument("--fit-shards", type=existing_dir, metavar="DIR",
                   help="fit on the channel vectors in this folder of .npy shards (featinv.analysis.shards."
                   "write_shards; read memory-mapped, so a set larger than memory fits) instead of the fit images' "
                   "maps; the atlas is still drawn over the images")
    g.add_argument("--passes", type=positive_int, help="epochs over the fit vectors (default: the method's)")
    g.add_argument("--fit-seed", type=int, default=0, help="seed of the basis fit (the same seed, the same basis)")
    g.add_argument("--alphas", default="1,2", help="strengths of the steering strip (alpha = 0 is shown on top)")
    g.add_argument("--exemplars", type=positive_int, default=3, help="most activating images shown per concept")
    g.add_argument("--removals", type=positive_int, default=2,
                   help="held-out images reconstructed without each concept")
    g.add_argument("--draw", help="the concepts whose pictures are drawn: comma-separated indices, or N for the top N "
                   "by importance (default: all up to 20 concepts, else the top 10); every concept is in the tables")
    add_common_args(p, outputs="concepts.png, concepts.safetensors (the basis), table.md, table.json, "
                    "atlas.html and index.json")
    args = p.parse_args(argv)
    args.alpha_list = parse_floats(args.alphas, "--alphas")
    if args.basis and (args.k is not None or args.method is not None or args.top_k is not None):
        raise ValueError("--basis: give either a basis file or -k/--method/--top-k to fit one, not both")
    if args.fit_shards and (args.basis or args.import_sae):
        raise ValueError("--fit-shards: shards to fit a basis on, or a basis to draw (--basis, --import-sae), not both")
    if args.import_sae:
        if args.basis or args.k is not None or args.method is not None:
            raise ValueError("--import-sae: give either an SAE to import or --basis / -k / --method, not both")
        if args.sae_type == "jumprelu" and args.top_k is not None:
            raise ValueError("--top-k: a JumpReLU SAE has a threshold per latent (in its state dict), no top-k")
        if args.sae_type != "jumprelu" and args.top_k is None:
            raise ValueError("--import-sae: give the SAE's --top-k (its active latents; not in its state dict)")
        if args.sae_threshold is not None and args.sae_type != "batchtopk":
            raise ValueError("--sae-threshold: only a BatchTopK SAE's inference threshold (--sae-type batchtopk)")
    elif args.top_k is not None:
        if args.method not in SAES:
            raise ValueError(f"--top-k: the active latents of a sparse autoencoder: give --method {' or '.join(SAES)}")
        if args.k is not None and args.top_k >= args.k:
            raise ValueError(f"--top-k: {args.top_k} active latents need more than -k {args.k} latents")
    args.draw_list = None
    if args.draw is not None:
        args.draw_list = parse_ints(args.draw, "--draw")
        if not args.draw_list or any(i < 0 for i in args.draw_list):
            raise ValueError(f"--draw: {args.draw!r}: concept indices >= 0, or one number N (the top N)")
        if "," not in args.draw:
            args.draw_list = args.draw_list[0]
    check_common(args)
    return args


@command("concepts", parse)
def main(args: argparse.Namespace) -> int:
    from featinv.analysis.common import features_of
    from featinv.analysis.concepts import ConceptBasis, check_k, fit_concepts, resolve_method
    from featinv.analysis.concepts_report import AtlasConfig, AtlasImages, build_atlas, write_atlas_files
    from featinv.commands._analysis import inputs_from_args, pair_from_args, write_report

    basis = None
    if args.basis:
        with blame("--basis"):  # read (and checked finite) before the model loads
            basis = ConceptBasis.load(args.basis)
    if args.import_sae:
        from featinv.analysis.concepts import method_of
        from featinv.checkpoint.overcomplete import overcomplete_to_sae, read_state

        with blame("--import-sae"):  # read and converted before the model loads
            tensors = overcomplete_to_sae(read_state(args.import_sae), args.sae_type, args.sae_threshold,
                                          args.import_sae)
            basis = method_of(args.sae_type).basis_from_sae(tensors, args.top_k, f"imported {args.import_sae}")
    if args.fit_shards:
        from featinv.analysis.shards import shard_batches

        with blame("--fit-shards"):  # every shard checked from its header before the model loads
            shard_facts = shard_batches(args.fit_shards, 1024)[1]
    pair = pair_from_args(args)
    ext = pair.extractor
    fit_images, fit_names, fit_labels = fit_set(args, pair)
    held_images, held_labels = held_set(args, pair, fit_images, fit_labels)
    steer_images, steer_names, _ = inputs_from_args(args, pair, example_digits="1,7")
    if args.images and not (args.count or args.digits):
        steer_images, steer_names = steer_images[:2], steer_names[:2]
    feats = features_of(ext, fit_images)
    if basis is None:
        k = 10 if args.k is None else args.k
        n, c, h, w = feats.shape
        vectors, fit_on, what = n * h * w, feats, f"{n} maps x {h}x{w} locations, {c} channels"
        if args.fit_shards:
            if shard_facts["d"] != c:
                raise ValueError(f"--fit-shards: {args.fit_shards} holds vectors of {shard_facts['d']} channels; the "
                                 f"feature map has {c} ({pair.name})")
            vectors, fit_on = shard_facts["vectors"], args.fit_shards
            what = f"{vectors} vectors of {c} channels in {shard_facts['shards']} shards ({args.fit_shards})"
        check_k(k, resolve_method(args.method, bool(feats.min() >= 0)), vectors, c)  # before scikit-learn
        print(f"fitting {k} concepts on {what}", file=sys.stderr)
        last = [-1]

        def progress(done, total):
            pct = int(100 * done / total) if total else 0
            if pct // 10 != last[0]:
                last[0] = pct // 10
                print(f"  fit {pct} %", file=sys.stderr)
        with blame("--method"):
            basis = fit_concepts(fit_on, k, args.method, seed=args.fit_seed, progress=progress, source=pair.name,
                                 top_k=args.top_k, passes=args.passes)
    else:
        with blame("--basis"):
            basis.check(feats)

    def report():
        images = AtlasImages(fit_images, fit_names, held_images, held_labels, steer_images, steer_names, fit_labels)
        atlas = build_atlas(pair, basis, images, AtlasConfig(args.alpha_list, args.exemplars, args.removals,
                                                             draw=args.draw_list))
        table = atlas.table
        held_out = {"held_out": {**table["completeness"], "images": table["held_out"]}}  # quality, in the file too
        stats = {**basis.stats, **held_out, "index": atlas.index.summary()}  # the fit images' index, compact
        dataclasses.replace(basis, stats=stats).save(f"{args.out}/concepts.safetensors")
        write_atlas_files(args.out, atlas, fit_images, fit_names)
        return atlas.picture, table, atlas.markdown
    code = write_report(args.out, "concepts.png", report, args.command_name)
    print(f"basis:   {args.out}/concepts.safetensors\natlas:   {args.out}/atlas.html (every concept), "
          f"{args.out}/index.json", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
