"""``featinv train``: train the control branch (one CPU to many GPUs); see :mod:`featinv.training.module`."""
from __future__ import annotations

import argparse
import sys

from featinv.commands._args import config_source, existing_dir, existing_file, positive_int
from featinv.commands._common import Parser, cleanup_on_failure, command
from featinv.config import RUN_CONFIG
from featinv.io import check_output_folder, check_writable


def resume_source(text: str) -> str:
    """--resume: 'auto', 'none' or a Lightning checkpoint file."""
    return text if text in ("auto", "none") else existing_file(text)


def parse(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog="featinv train",
               description="Train FeatInv's control branch on a frozen classifier's feature maps.")
    p.add_argument("--config", type=config_source, default="featinv_convnext",
                   help="preset name or YAML (project or reference style)")
    p.add_argument("--init", type=existing_file, required=True,
                   help="initial FeatInv checkpoint (from `featinv build-control`)")
    p.add_argument("--data", type=existing_dir, help="ImageNet-layout training folder (sets data.root)")
    p.add_argument("--run-dir", default="runs/featinv", help="checkpoints, image logs, config and export go here")
    p.add_argument("--resume", type=resume_source, default="auto",
                   help="Lightning checkpoint to resume, 'auto' (the newest in run-dir/checkpoints that loads) or 'none'")
    p.add_argument("--accept-change", action="append", default=[], metavar="FIELD",
                   help="resume although FIELD differs from the run's config.yaml (a resumed run must keep "
                        "backbone, model, train.lr, data.batch_size and data.root; repeat for several fields; "
                        "the run's config.yaml then records the new value)")
    p.add_argument("--accelerator", default="auto", help="Lightning accelerator (auto, cpu, gpu)")
    p.add_argument("--devices", default="auto", help="Lightning devices, e.g. 1, 8, or auto")
    p.add_argument("--num-nodes", type=positive_int, default=1, help="nodes")
    p.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp")
    p.add_argument("overrides", nargs="*", help="dotlist config overrides, e.g. train.lr=2e-5 data.batch_size=16")
    args = p.parse_args(argv)
    check_writable(args.run_dir, "--run-dir")
    # a run folder is recognised by its config.yaml / checkpoints; a run is continued, never overwritten
    check_output_folder(args.run_dir, "train", None, "--run-dir", own=(RUN_CONFIG, "checkpoints"))
    from featinv.checkpoint.config_file import load_config  # OmegaConf: after --help and flag errors

    overrides = list(args.overrides) + ([f"data.root={args.data}"] if args.data else [])
    args.cfg = load_config(args.config, overrides)  # a bad key or value is answered before torch loads
    return args


@command("train", parse, resumes=True)
def main(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from featinv.checkpoint.build_control import backbone_channels
    from featinv.jobs.lock import folder_lock
    from featinv.training.loop import TrainRun, effective_config, train

    cfg = effective_config(args.cfg, backbone_channels(args.cfg.backbone))  # as run-dir/config.yaml records it
    print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), file=sys.stderr)
    devices = int(args.devices) if str(args.devices).isdigit() else args.devices
    with cleanup_on_failure(args.run_dir), folder_lock(args.run_dir, "--run-dir"):  # one job per run
        train(cfg, args.init, args.run_dir, TrainRun(
            accelerator=args.accelerator, devices=devices, num_nodes=args.num_nodes, strategy=args.strategy,
            resume=None if args.resume == "none" else args.resume, accept_changes=tuple(args.accept_change)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
