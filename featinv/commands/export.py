"""``featinv export RUN_OR_CHECKPOINT OUT``: a trained FeatInv model as a shareable (Hub-ready) folder.

OUT gets featinv.safetensors, the run's config.yaml and a model card README.md (front matter the Hugging
Face Hub reads). ``load_featinv``, ``featinv reconstruct --checkpoint`` and the analyses accept the folder,
or its Hub id once uploaded (e.g. ``huggingface-cli upload OWNER/NAME OUT``).
"""
from __future__ import annotations

import argparse

from featinv.commands._args import existing_dir, existing_file, existing_path
from featinv.commands._common import Parser, command


def parse(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog="featinv export", description=__doc__.splitlines()[0])
    p.add_argument("source", type=existing_path, help="training run folder (featinv.safetensors + config.yaml), FeatInv checkpoint "
                                  "(config.yaml beside it, or --config) or an earlier export")
    p.add_argument("out", help="output folder; must be empty, new, or an earlier export (which is replaced)")
    p.add_argument("--config", type=existing_file, help="the run's config.yaml (default: the one beside the checkpoint)")
    p.add_argument("--eval", type=existing_dir, help="a reconstruct folder evaluated by `featinv evaluate`: its table goes into the card")
    p.add_argument("--license", default="apache-2.0", help="license id for the model card")
    p.add_argument("--base-model", help="Hub id of the miniSD the model was built from (model card base_model)")
    return p.parse_args(argv)


@command("export", parse)
def main(args: argparse.Namespace) -> int:
    from featinv.jobs.export import export_featinv

    report = export_featinv(args.source, args.out, args.eval, args.config, args.license, args.base_model)
    steps = report["train_steps"]
    print(f"weights: {report['weights']}; config: {report['config']}; "
          f"steps: {steps if steps is not None else 'not recorded'}; evaluation table: "
          f"{'yes' if report['evaluation'] else 'no (--eval)'}")
    print(f"wrote {report['out']} (featinv.safetensors, config.yaml, README.md)")
    return 0
