"""How fast the command line answers: ``--help``, an unknown flag and a bad value, per command, featinv
versions side by side, against a bare ``python -c pass``.

Each probe is a fresh process (``python -m featinv <command> ...``) run in an empty temporary folder, with
``featinv/`` of each version taken from git (``bench_versions.checkout``); a probe's time is the median of
``--rounds`` runs, versions alternating. The bad values are ones every version refuses without loading a model.

    python benchmarks/bench_cli.py                        # 0.4.0 and the working tree
    python benchmarks/bench_cli.py --revs WORKTREE --rounds 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_versions import VERSIONS, checkout

# command -> a bad value each version refuses before any model loads (or trains)
BAD_VALUES = {
    "demo": ["--seed", "x"],
    "inspect": ["missing.safetensors"],
    "convert": ["missing.ckpt", "out.txt"],
    "build-control": ["missing.ckpt", "out.txt"],
    "export": ["missing_run", "out"],
    "train": ["--config", "tiny", "--init", "missing.safetensors", "train.no_such_field=1"],
    "reconstruct": ["--checkpoint", "missing.safetensors", "--data", "missing", "--out", "out", "--steps", "0"],
    "evaluate": ["--out", "missing"],
    "steer": ["--alphas", "x", "--out", "out"],
    "compose": ["--ops", "bogus", "--out", "out"],
    "concepts": ["--alphas", "x", "--out", "out"],
    "perturb": ["--severities", "9", "--out", "out"],
    "app": ["--port", "x"],
}
PROBES = {"--help": lambda c: ["--help"], "bad flag": lambda c: ["--no-such-flag"], "bad value": BAD_VALUES.get}


def seconds(argv: list[str], env: dict, cwd: str) -> tuple[float, int]:
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, timeout=300)
    return time.perf_counter() - start, proc.returncode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--revs", nargs="+", default=["0.4.0", "WORKTREE"],
                   help=f"versions ({', '.join(VERSIONS)}), git revisions, or WORKTREE (this checkout)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--commands", nargs="+", default=list(BAD_VALUES), help="commands to probe")
    args = p.parse_args(argv)
    times: dict[tuple[str, str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {rev: checkout(VERSIONS.get(rev, rev), Path(tmp) / "src") for rev in args.revs}
        work = Path(tmp) / "work"
        work.mkdir()
        base = [seconds([sys.executable, "-c", "pass"], dict(os.environ), str(work))[0] for _ in range(args.rounds)]
        for r in range(args.rounds):
            order = args.revs[r % len(args.revs):] + args.revs[:r % len(args.revs)]
            for command in args.commands:
                for probe, extra in PROBES.items():
                    for rev in order:
                        env = {**os.environ, "PYTHONPATH": str(paths[rev])}
                        s, code = seconds([sys.executable, "-m", "featinv", command, *extra(command)], env, str(work))
                        if (code == 0) != (probe == "--help"):
                            raise SystemExit(f"{rev} {command} {probe}: exit {code}")
                        times.setdefault((command, probe, rev), []).append(s)
            print(f"round {r + 1} of {args.rounds} done", file=sys.stderr, flush=True)
    labels = [rev if rev != "WORKTREE" else "this change" for rev in args.revs]
    print(f"\n## Command-line answers: median seconds of {args.rounds} fresh processes "
          f"(`python -c pass`: {statistics.median(base):.2f} s)\n")
    print(f"| command | probe | {' | '.join(labels)} | {labels[0]} / {labels[-1]} |")
    print("|---|---|" + "---:|" * (len(labels) + 1))
    for command in args.commands:
        for probe in PROBES:
            med = [statistics.median(times[command, probe, rev]) for rev in args.revs]
            print(f"| {command} | {probe} | {' | '.join(f'{m:.2f}' for m in med)} | {med[0] / med[-1]:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
