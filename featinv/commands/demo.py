"""``featinv demo``: the whole FeatInv recipe on scikit-learn's digits, on a CPU, in minutes.

The stages and the cache are described in :mod:`featinv.demo.run`.
"""
from __future__ import annotations

import warnings

import torch

from featinv.commands._common import Parser, cleanup_on_failure, command
from featinv.config import DEMO_OUT
from featinv.demo.run import run
from featinv.io import check_output_folder, check_writable
from featinv.runtime import configure_threads


@command("demo", resumes=True)
def main(argv: list[str]) -> int:
    p = Parser(prog="featinv demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=DEMO_OUT, help="output folder (picture, table; cache/ for artefacts)")
    p.add_argument("--quick", action="store_true", help="smaller settings: the demo pair the tests, the analyses "
                   "and the app use (timings: benchmarks/RESULTS.md)")
    p.add_argument("--seed", type=int, default=0, help="seed of every training stage and of the sampling")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--overwrite", action="store_true", help="write into --out although it holds other files")
    p.add_argument("--retrain", action="store_true", help="ignore cached artefacts and train everything again")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0: OMP_NUM_THREADS, else one less than the usable cores)")
    args = p.parse_args(argv)
    check_writable(args.out)
    check_output_folder(args.out, "demo", args.overwrite, own=("cache",))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    configure_threads(args.threads)  # 0: the commands' rule (featinv.runtime.default_threads)
    # Lightning's advice for large runs (workers, loggers, accelerators) is noise on this tiny one.
    warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|LeafSpec|TPU available"
                                              "|GPU available|logger).*")
    with cleanup_on_failure(args.out):
        run(args.out, args.quick, args.seed, args.device, args.retrain)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
