"""``featinv maps``: learn how an edit moves the feature map (or one network's map into another's), and decode the
mapped maps (FeatMap, Krey, Neukirch & Strodthoff 2026)."""
from __future__ import annotations

import argparse
import sys

from featinv.commands._analysis import add_common_args, check_common
from featinv.commands._args import existing_dir, existing_file, positive_int
from featinv.commands._common import Parser, blame, command
from featinv.registry import MANIPULATIONS, MAP_TYPES, describe, names

DEFAULT_MANIPULATIONS = "hflip,rotate,blur,occlude"  # one geometric, one spatial, one photometric, one local edit
TEST_EVERY = 5  # with --images or --before/--after: every 5th image (by name) is held out

DESCRIPTION = ("Fit maps from an image's feature map to the feature map of the same image manipulated (or edited "
               "elsewhere: --before/--after), or from another network's map to the decoder's (--source-backbone), "
               "score them on held-out images (R², cosine, the classifier's label on mapped maps, FeatInv "
               "reconstructions of the mapped maps beside those of the target maps, SSIM; for linear maps the "
               "effective rank and the bias share) and draw per task: input | target | own map decoded | each "
               "mapped map decoded. Writes maps_<task>.png, spectrum.png (linear maps' singular values), table.md, "
               "table.json and maps/<task>_<map>.safetensors (apply one to new images with --map-file).")


def parse(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog="featinv maps", description=DESCRIPTION,
               epilog="manipulations (name or name:value):\n" + describe(MANIPULATIONS) +
               "\n\nmap types:\n" + describe(MAP_TYPES))
    g = p.add_argument_group("maps")
    g.add_argument("--manipulation", help=f"comma-separated manipulations, 'all' for every one (default "
                   f"{DEFAULT_MANIPULATIONS}); each name or name:value, listed below")
    g.add_argument("--before", type=existing_dir, help="a folder of images; with --after, pairs edited with any tool, "
                   f"matched by file name (every {TEST_EVERY}th pair held out)")
    g.add_argument("--after", type=existing_dir, help="the edited images of --before, same file names")
    g.add_argument("--source-backbone", metavar="NAME", help="map this network's feature map into the decoder's "
                   "backbone's (a preset, a timm name; on the demo: digits-b, its second classifier)")
    g.add_argument("--map", default=",".join(MAP_TYPES), help=f"comma-separated map types from {names(MAP_TYPES)}")
    g.add_argument("--map-file", type=existing_file, help="a map written before (maps/*.safetensors): apply it to "
                   "the held-out images (or --images) and decode, instead of fitting")
    g.add_argument("--decode", type=positive_int, default=16, help="held-out images decoded per task and map (the "
                   "decoded scores; the feature-space scores use every held-out image)")
    g.add_argument("--show", type=positive_int, default=4, help="decoded images drawn per task")
    g.add_argument("--map-seed", type=int, default=0, help="seed of the manipulations' random parameters and the "
                   "transformer's fit")
    add_common_args(p, outputs="maps_<task>.png, spectrum.png, table.md, table.json, maps/", digits=False,
                    images="image files and/or folders, every 5th (by name) held out (with --checkpoint; default "
                    "on the demo: its training digits to fit, its held-out digits to score)")
    args = p.parse_args(argv)
    _check(args)
    check_common(args)
    return args


def _check(args) -> None:
    """The flags' own checks, torch-free (before any model loads)."""
    from featinv.analysis.specs import parse_manipulation

    if (args.before is None) != (args.after is None):
        raise ValueError("--before/--after: give both folders (the originals and their edited versions)")
    sources = [f for f, v in (("--manipulation", args.manipulation), ("--before", args.before),
                              ("--source-backbone", args.source_backbone), ("--map-file", args.map_file)) if v]
    if len(sources) > 1:
        raise ValueError(f"{sources[1]}: not with {sources[0]}; a run maps manipulations, folder pairs or another "
                         "network, or applies one map file")
    if args.before and args.images:
        raise ValueError("--images: the images are the --before/--after pairs; give one or the other")
    args.map_list = [m.strip() for m in args.map.split(",") if m.strip()]
    bad = [m for m in args.map_list if m not in MAP_TYPES]
    if bad or not args.map_list:
        raise ValueError(f"--map: {args.map!r}: choose from {names(MAP_TYPES)}")
    if args.map_file and args.map != ",".join(MAP_TYPES):
        raise ValueError("--map: the map file holds its own map; give --map-file or --map, not both")
    text = DEFAULT_MANIPULATIONS if args.manipulation is None else args.manipulation
    specs = list(MANIPULATIONS) if text.strip() == "all" else [s.strip() for s in text.split(",") if s.strip()]
    if not specs:
        raise ValueError(f"--manipulation: {text!r} names no manipulation")
    with blame("--manipulation"):
        args.manipulation_list = [f"{name}:{value:g}" for name, value in map(parse_manipulation, specs)]


def _split(n: int):
    import torch

    test = torch.zeros(n, dtype=torch.bool)
    test[TEST_EVERY - 1::TEST_EVERY] = True
    if n < 2 * TEST_EVERY:
        raise ValueError(f"featinv maps needs at least {2 * TEST_EVERY} images (or pairs) to fit and hold out, got {n}")
    return test


def _images(args, pair):
    """-> (fit images, held-out images, held-out names): the demo's digit splits, else --images split by name."""
    from featinv.analysis.common import load_images

    if args.images:
        with blame("--images"):
            images, names_ = load_images(args.images, pair.extractor.image_size)
        order = sorted(range(len(names_)), key=lambda i: names_[i])
        images, names_ = images[order], [names_[i] for i in order]
        test = _split(len(images))
        return images[~test], images[test], [n for n, t in zip(names_, test.tolist()) if t]
    x, xt, yt = pair.data["x_train"], pair.data["x_test"], pair.data["y_test"]
    return (x.expand(-1, 3, -1, -1).clone(), xt.expand(-1, 3, -1, -1).clone(),
            [f"d{int(c)}_test{i}" for i, c in enumerate(yt.tolist())])


def _source_network(args, pair):
    """--source-backbone -> (its FeatureExtractor on the pair's device, its name)."""
    from featinv.config import BackboneConfig
    from featinv.demo.pair import SECOND, second_classifier
    from featinv.nets.backbone import build_backbone, resolve_backbone

    name = args.source_backbone
    if name == SECOND:
        if pair.data is None:
            raise ValueError(f"--source-backbone: {SECOND} is the demo's second classifier; with --checkpoint name a "
                             "preset or a timm model")
        return second_classifier(pair), SECOND
    with blame("--source-backbone"):
        return build_backbone(resolve_backbone(name, None, None, BackboneConfig())).to(pair.device).eval(), name


def _tasks(args, pair, fit, test, held_names):
    from featinv.analysis import maps_report as mr

    ext = pair.extractor
    if args.before:
        from featinv.analysis.manipulations import read_folder_pairs

        with blame("--before/--after"):
            before, after, stems = read_folder_pairs(args.pairs, ext.image_size)
        return [mr.pairs_task(ext, before, after, stems, _split(len(stems)), args.decode)]
    if args.source_backbone:
        source, name = _source_network(args, pair)
        return [mr.network_task(source, ext, fit, test, held_names, args.decode, name, pair.name.split(":")[0])]
    return [mr.manipulation_task(ext, spec, fit, test, held_names, args.decode, args.map_seed)
            for spec in args.manipulation_list]


@command("maps", parse)
def main(args: argparse.Namespace) -> int:
    from featinv.analysis.map_files import load_map
    from featinv.commands._analysis import pair_from_args, write_report

    fmap = None
    if args.map_file:
        with blame("--map-file"):  # read before the model loads
            fmap = load_map(args.map_file)
    if args.before:
        from featinv.analysis.manipulations import match_folder_pairs

        with blame("--before/--after"):  # paired by name before the model loads
            args.pairs = match_folder_pairs(args.before, args.after)
            _split(len(args.pairs))
    pair = pair_from_args(args)
    fit, test, held_names = _images(args, pair)
    if fmap is not None:
        tasks, fitted = _applied(args, pair, fmap, fit, test, held_names)
    else:
        tasks = _tasks(args, pair, fit, test, held_names)
        fitted = None
    return write_report(args.out, "spectrum.png", lambda: _report(args, pair, tasks, fitted), args.command_name)


def _applied(args, pair, fmap, fit, test, held_names):
    """--map-file: the task its map was made for, on the held-out images (nothing fitted)."""
    from featinv.analysis import maps_report as mr
    from featinv.analysis.map_files import check_map_fits

    about = fmap.about
    empty = fit[:0]
    if "source" in about:
        args.source_backbone = about["source"]
        source, name = _source_network(args, pair)
        task = mr.network_task(source, pair.extractor, empty, test, held_names, args.decode, name, about["target"])
        src = name
    elif "manipulation" in about and about["manipulation"] != "folder pairs":
        task = mr.manipulation_task(pair.extractor, about["manipulation"], empty, test, held_names, args.decode,
                                    args.map_seed)
        src = f"the {pair.name.split(':')[0]}'s backbone"
    else:
        raise ValueError(f"--map-file: {args.map_file} was fitted on folder pairs; fit again with --before/--after "
                         "to score it on other pairs")
    c, h, w = task.test_x.shape[1:]
    check_map_fits(fmap, c, (h, w), pair.extractor.feature_shape[0], src, f"the {pair.name.split(':')[0]}",
                   args.map_file)
    return [task], {task.name: {fmap.kind: fmap.to(pair.device)}}


def _report(args, pair, tasks, fitted):
    """Fit (unless given) and score every task's maps; write the maps and the per-task pictures -> (spectrum
    picture, table, markdown) for write_report."""
    from featinv.analysis import maps_report as mr
    from featinv.analysis.map_files import save_map
    from featinv.analysis.map_scores import spectrum_plot
    from featinv.analysis.reports import reconstructor
    from featinv.visualize import save_png

    rec, rows, spectra, files = reconstructor(pair), [], {}, {}
    for task in tasks:
        if fitted is None:
            print(f"{task.name}: fitting {', '.join(args.map_list)} on {len(task.fit_x)} maps", file=sys.stderr)
            maps = mr.fit_task_maps(task, args.map_list, pair.device, **{"global": {"seed": args.map_seed}})
            for kind, fmap in maps.items():
                if kind != "identity":
                    files[f"{task.slug}_{kind}"] = save_map(fmap, f"{args.out}/maps/{task.slug}_{kind}.safetensors")
        else:
            maps = fitted[task.name]
        task_rows, picture, task_spectra = mr.task_report(pair, task, maps, rec, args.show)
        rows += task_rows
        spectra.update(task_spectra)
        save_png(picture, f"{args.out}/maps_{task.slug}.png")
    n_test, n_dec = len(tasks[0].test_x), len(tasks[0].keys)
    table = {"rows": rows, "held_out_images": n_test, "decoded_images": n_dec, "pair": pair.name,
             "map_files": {k: str(v) for k, v in files.items()}}
    title = "linear maps' singular values, normalised (s_i / s_1)"
    return spectrum_plot(spectra, title), table, mr.maps_markdown(rows, n_test, n_dec)


if __name__ == "__main__":
    raise SystemExit(main())
