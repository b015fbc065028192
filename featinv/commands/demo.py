"""``featinv demo``: the whole FeatInv recipe on scikit-learn's digits, on a CPU, in minutes.

The stages and the cache are described in :mod:`featinv.demo.run`.
"""
from __future__ import annotations

import argparse
import warnings

from featinv.commands._args import add_threads_arg
from featinv.commands._common import Parser, cleanup_on_failure, command
from featinv.config import DEMO_OUT
from featinv.io import check_output_folder, check_writable


def parse(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog="featinv demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=DEMO_OUT, help="output folder (picture, table; cache/ for artefacts)")
    p.add_argument("--quick", action="store_true", help="smaller settings: the demo pair the tests, the analyses "
                   "and the app use (timings: benchmarks/RESULTS.md)")
    p.add_argument("--seed", type=int, default=0, help="seed of every training stage and of the sampling")
    p.add_argument("--device", default="cpu", help="torch device to train and sample on: cpu, cuda or cuda:N")
    p.add_argument("--overwrite", action="store_true", help="write into --out although it holds other files")
    p.add_argument("--retrain", action="store_true", help="ignore cached artefacts and train everything again")
    add_threads_arg(p)
    args = p.parse_args(argv)
    check_writable(args.out)
    check_output_folder(args.out, "demo", args.overwrite, own=("cache",))
    return args


@command("demo", parse, resumes=True)
def main(args: argparse.Namespace) -> int:
    import torch

    from featinv.demo.run import run

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device available")
    # Lightning's advice for large runs (workers, loggers) is noise on this tiny one.
    warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|logger).*")
    with cleanup_on_failure(args.out):
        run(args.out, args.quick, args.seed, args.device, args.retrain)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
