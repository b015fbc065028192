"""``featinv reconstruct``: reconstruct ImageNet-style images from their classifier features."""
from __future__ import annotations

import argparse

from featinv.commands._args import (
    add_source_args,
    count,
    existing_dir,
    finite_float,
    positive_int,
    sample_count,
    source_from_args,
)
from featinv.commands._common import Parser, cleanup_on_failure, command
from featinv.config import MANIFEST, SPACINGS, UNCOND_MODES, ReconstructJob, SampleConfig
from featinv.io import check_output_folder, check_writable
from featinv.registry import SAMPLERS, STOCHASTIC_SAMPLERS, describe


def build_parser() -> Parser:
    p = Parser(prog="featinv reconstruct", description="Reconstruct ImageNet-style images from their classifier "
               "features.", epilog="samplers:\n" + describe(SAMPLERS))
    add_source_args(p, demo=False)
    p.add_argument("--data", type=existing_dir, required=True, help="ImageNet-style folder <root>/<class>/<image>")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="start --out over: delete the earlier job's PNGs (class folders), eval/ and manifest.json; "
                        "without it a folder made with other settings is refused")
    p.add_argument("--per-class", type=count, default=10, help="first N images per class (0: all)")
    d = SampleConfig()
    p.add_argument("--sampler", choices=tuple(SAMPLERS), default=d.sampler,
                   help="the sampler, one of those listed below (which to choose, and how many steps each needs: "
                        "docs/sampling.md)")
    p.add_argument("--steps", type=positive_int, default=d.steps,
                   help="sampler steps S (model calls per sample, each a forward of both guidance branches)")
    p.add_argument("--spacing", choices=SPACINGS, default=d.spacing,
                   help="timesteps: reference = arange(0, 1000, 1000 // S) + 1 (S+1 steps when S does not divide "
                        "1000, as the reference); trailing = exactly S steps from t=999")
    p.add_argument("--eta", type=finite_float, default=d.eta,
                   help=f"noise per step, DDIM's eta (> 0: {', '.join(STOCHASTIC_SAMPLERS)} only)")
    p.add_argument("--scale", type=finite_float, default=d.guidance_scale, help="classifier-free guidance scale")
    p.add_argument("--prompt", default=d.prompt, help="conditional prompt")
    p.add_argument("--samples", type=sample_count, default=d.num_samples, help="reconstructions per image (K)")
    p.add_argument("--seed", type=int, default=d.seed, help="base seed; each image/sample gets its own")
    p.add_argument("--uncond", choices=UNCOND_MODES, default=d.uncond,
                   help="unconditional branch: empty prompt with the features (reference) or without them")
    p.add_argument("--guess-mode", action="store_true", help="reference guess mode (control ramp, uncond w/o control)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per batch per device (x K samples x 2 branches)")
    p.add_argument("--num-workers", type=count, default=2, help="data loader workers per device")
    p.add_argument("--accelerator", default="auto", help="Lightning accelerator (auto, cpu, gpu)")
    p.add_argument("--devices", default="auto", help="Lightning devices (auto, N, or a list like 0,1)")
    p.add_argument("--num-nodes", type=positive_int, default=1, help="nodes")
    p.add_argument("--strategy", default="auto", help="Lightning strategy (auto, ddp, ...)")
    p.add_argument("--precision", default="auto", help="auto (bf16-mixed on GPU, else 32-true) or a Lightning value")
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line -> args, with ``args.job`` the ReconstructJob it describes (checked)."""
    args = build_parser().parse_args(argv)
    check_writable(args.out)
    check_output_folder(args.out, "reconstruct", args.overwrite, own=(MANIFEST,))
    sample = SampleConfig(steps=args.steps, eta=args.eta, sampler=args.sampler, spacing=args.spacing,
                          guidance_scale=args.scale, prompt=args.prompt,
                          uncond=args.uncond, guess_mode=args.guess_mode, num_samples=args.samples, seed=args.seed)
    devices = args.devices if args.devices == "auto" or "," in args.devices else int(args.devices)
    args.job = ReconstructJob(source=source_from_args(args), data=args.data, out=args.out,
                              per_class=args.per_class or None, sample=sample,
                              batch_size=args.batch_size, num_workers=args.num_workers, accelerator=args.accelerator,
                              devices=devices, num_nodes=args.num_nodes, strategy=args.strategy,
                              precision=args.precision, overwrite=args.overwrite)
    return args


@command("reconstruct", parse, resumes=True)
def main(args: argparse.Namespace) -> int:
    """``featinv reconstruct``: run the job (progress on stderr, the summary line on stdout)."""
    from pytorch_lightning.utilities import rank_zero_only

    from featinv.jobs.lock import folder_lock
    from featinv.jobs.reconstruct import reconstruct_folder

    with cleanup_on_failure(args.out), folder_lock(args.out):  # one job per folder, before the model loads
        manifest = reconstruct_folder(args.job)
    if "items" in manifest:
        rank_zero_only(print)(f"{manifest['complete']}/{manifest['items']} items complete "
                              f"({manifest['reconstructed']} new, {len(manifest['unreadable'])} unreadable): "
                              f"{args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
