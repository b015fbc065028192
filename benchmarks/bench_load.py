"""Load time and peak memory of ``load_featinv`` per file format, and of ``featinv convert``, as Markdown tables.

    python benchmarks/bench_load.py [--config featinv_convnext] [--tmp DIR] [--convert-only]

Writes the config's full model with random weights once (a safetensors file with the config in its
metadata, streamed tensor by tensor; then a Lightning-style ``.ckpt`` zip archive from it), loads each
file in a fresh process and reports the wall time of ``load_featinv`` and the process's peak RSS
(``resource.getrusage(...).ru_maxrss``) against the size of the weights. The files are deleted after.
``convert`` (the ``.ckpt`` -> safetensors, as a user converts the released weights) is measured the same way,
its peak as ``VmHWM`` of ``/proc/self/status``, against one copy of the weights plus the largest tensor.
Needs free disk of about three times the weights (16 GiB for featinv_convnext) and RAM of about 1.3x;
``--config tiny`` is the smoke run, ``--convert-only`` skips the two loads.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

GIB = 2 ** 30
ST_DTYPE = {torch.float32: "F32", torch.float64: "F64", torch.int64: "I64"}


def _peak_rss() -> int:
    """Peak resident set size of this process in bytes (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _vmhwm() -> int:
    """Peak resident set size of this process in bytes, from /proc/self/status (VmHWM, kB)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def write_random_safetensors(config: str, path: Path) -> tuple[int, int]:
    """The full model's reference-layout state dict with random weights (real schedule buffers),
    written one tensor at a time, so the writer never holds the model; returns (weight bytes, largest
    tensor's bytes)."""
    from featinv.checkpoint.config_file import load_config, to_dict
    from featinv.checkpoint.layout import METADATA_KEY, to_reference
    from featinv.nets.model import FeatInv

    cfg = load_config(config).model
    with torch.device("meta"):
        meta = FeatInv(cfg).state_dict()
    shapes = to_reference(meta, cfg.diffusion)  # outside the meta context: real schedule buffers
    header, offset, largest = {}, 0, 0
    for key, t in shapes.items():
        size = t.numel() * t.element_size()
        largest = max(largest, size)
        header[key] = {"dtype": ST_DTYPE[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {METADATA_KEY: json.dumps(to_dict(cfg), sort_keys=True)}
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    g = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for key, t in shapes.items():
            value = t if not t.is_meta else torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.02
            f.write(value.contiguous().numpy().tobytes())
    return offset, largest


def measure_convert(src: Path) -> dict:
    """In this (fresh) process: ``featinv convert``'s function on ``src``; seconds and VmHWM before / after."""
    from featinv.checkpoint.convert import convert_to_safetensors

    dst = src.with_name("converted.safetensors")
    before = _vmhwm()
    start = time.perf_counter()
    convert_to_safetensors(src, dst)
    seconds = time.perf_counter() - start
    peak = _vmhwm()
    dst.unlink()
    return {"seconds": seconds, "peak_before": before, "peak": peak}


def write_ckpt(src: Path, dst: Path) -> None:
    """A Lightning-style checkpoint (zip archive) holding the tensors of ``src``."""
    from featinv.checkpoint.tensor_files import read_safetensors

    sd, _ = read_safetensors(src)  # mapped: the pages are page cache, not this process's memory
    torch.save({"state_dict": sd, "epoch": 0, "global_step": 1, "pytorch-lightning_version": "1.4.2"}, dst)


def measure(path: Path, config: str) -> dict:
    """In this (fresh) process: load once, report seconds and peak RSS before / after."""
    from featinv.checkpoint.config_file import load_config
    from featinv.checkpoint.load import load_featinv

    cfg = load_config(config).model
    before = _peak_rss()
    start = time.perf_counter()
    model = load_featinv(path, cfg)
    seconds = time.perf_counter() - start
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"seconds": seconds, "peak_before": before, "peak": _peak_rss(), "params_bytes": params}


def _child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="featinv_convnext")
    p.add_argument("--tmp", default=None, help="folder for the temporary weight files (default: system temp)")
    p.add_argument("--convert-only", action="store_true", help="measure convert only (skip the two loads)")
    p.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        mode, path = args.child
        if mode == "write-ckpt":
            write_ckpt(Path(path).with_suffix(".safetensors"), Path(path))
            print(json.dumps({}))
        elif mode == "convert":
            print(json.dumps(measure_convert(Path(path))))
        else:
            print(json.dumps(measure(Path(path), args.config)))
        return 0
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        st = Path(tmp) / "full.safetensors"
        weights, largest = write_random_safetensors(args.config, st)
        ckpt = st.with_suffix(".ckpt")
        _child("--config", args.config, "--child", "write-ckpt", str(ckpt))
        for name, path in (("safetensors (featinv)", st), ("Lightning / LDM .ckpt (torch.save zip)", ckpt)):
            if not args.convert_only:
                r = _child("--config", args.config, "--child", "measure", str(path))
                rows.append((name, path.stat().st_size, r))
        st.unlink()  # the disk the converted file needs
        conv = _child("--config", args.config, "--child", "convert", str(ckpt))
        ckpt_size = ckpt.stat().st_size
    print(f"`python benchmarks/bench_load.py --config {args.config}`: {platform.machine()}, torch {torch.__version__}; "
          f"weights {weights / GIB:.2f} GiB; each load in a fresh process\n")
    print("| file | file size | load seconds | peak RSS | peak RSS before loading | load's growth / weights |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, size, r in rows:
        growth = (r["peak"] - r["peak_before"]) / weights
        print(f"| {name} | {size / GIB:.2f} GiB | {r['seconds']:.1f} | {r['peak'] / GIB:.2f} GiB | "
              f"{r['peak_before'] / GIB:.2f} GiB | {growth:.2f}x |")
    growth = conv["peak"] - conv["peak_before"]
    print(f"\n`featinv convert` of the .ckpt ({ckpt_size / GIB:.2f} GiB) to safetensors, in a fresh process: "
          f"{conv['seconds']:.1f} s; peak (VmHWM) {conv['peak'] / GIB:.2f} GiB, {conv['peak_before'] / GIB:.2f} GiB "
          f"before; growth {growth / GIB:.2f} GiB = {growth / weights:.2f}x the weights ({weights / GIB:.2f} GiB), "
          f"{growth / (weights + largest):.2f}x the weights plus the largest tensor ({largest / GIB:.3f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
