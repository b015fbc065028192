"""featinv's sparse autoencoders side by side with Overcomplete's TopKSAE: quality and training throughput.

    python benchmarks/bench_sae.py                           # ~8 min on a 2-core CPU
    python benchmarks/bench_sae.py --quick                   # < 1 min: fewer epochs and vectors
    python benchmarks/bench_sae.py --demo-out featinv_demo   # quality on the cached demo classifier's maps

(a) Quality: the per-location channel vectors of the demo's kind of feature map (the digits CNN, 64 x 2 x 2 at
8 px, trained here for 8 epochs; with --demo-out the cached demo pair's classifier instead), training digits for
fitting and held-out digits for scoring. 256 latents, k = 8, the same batches (batch 256, shuffled per epoch),
epochs and learning rate (featinv's default for 256 latents) for every row, on one thread. Rows: featinv TopK
with AuxK (its default), without AuxK, BatchTopK; Overcomplete's TopKSAE (its default Linear + BatchNorm encoder,
its train_sae with its default gradient clipping 1.0) with a plain MSE loss and with its top_k_auxiliary_loss.
Held-out FVU (Σ‖x − x_hat‖² / Σ‖x − mean‖²), mean L0 and the share of latents never active on the held-out set.

(b) Throughput at the scale shape: d = 1024, 4,096 latents, k = 32, batch 4,096, Adam, random N(0, 1) data
(8 distinct batches cycled), one epoch of --vectors vectors after one untimed warm-up step; vectors/s and the
ratio to Overcomplete. Seeds: --seed for the CNN, the SAEs' initialisation and the batch order.
"""
from __future__ import annotations

import argparse
import time

import torch
from _common import write_results

from featinv.analysis.sae import default_lr, sae_metrics, train_sae
from featinv.demo.digits import load_digits_split, make_extractor, rgb, train_classifier

LATENTS, TOP_K, BATCH = 256, 8, 256
SCALE = {"d": 1024, "latents": 4096, "top_k": 32, "batch": 4096}


class Epochs:
    """An iterable whose e-th iteration yields ``batches(e)``: Overcomplete's train_sae re-iterates its loader
    once per epoch, so both libraries see the same batches in the same order."""

    def __init__(self, batches):
        self.batches, self.epoch = batches, 0

    def __iter__(self):
        self.epoch += 1
        return iter(self.batches(self.epoch - 1))


def shuffled(x: torch.Tensor, batch: int, seed: int):
    return lambda epoch: x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 1000 + epoch))].split(
        batch)


def digit_maps(args) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(train (N, C), held-out (M, C)) per-location vectors and where they come from."""
    if args.demo_out:
        from featinv.demo.pair import load_demo_pair
        pair = load_demo_pair(args.demo_out, device="cpu")
        extractor, data, source = pair.extractor, pair.data, f"demo pair {args.demo_out}"
    else:
        data = load_digits_split(8, seed=args.seed)
        extractor = make_extractor(train_classifier(data, 8, args.seed, torch.device("cpu")), 8)
        source = "digits CNN, 8 epochs"
    with torch.no_grad():
        maps = [extractor(rgb(data[k])) for k in ("x_train", "x_test")]
    return *(m.permute(0, 2, 3, 1).reshape(-1, m.shape[1]) for m in maps), source


def overcomplete_or_none():
    try:
        from overcomplete.sae import TopKSAE
        from overcomplete.sae import train_sae as oc_train
        from overcomplete.sae.losses import top_k_auxiliary_loss
    except ImportError as err:  # not installed, or matplotlib >= 3.9 (see FACTS: pip install "matplotlib<3.9")
        print(f"Overcomplete unavailable: {err}")
        return None
    return TopKSAE, oc_train, top_k_auxiliary_loss


def mse(x, x_hat, z_pre, z, dictionary):
    return (x - x_hat).square().mean()


@torch.no_grad()
def oc_metrics(model, x: torch.Tensor) -> dict:
    model.eval()
    _, z, x_hat = model(x)
    fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    dead = int(((z > 0).sum(0) == 0).sum())
    l0 = (z > 0).sum(1).float().mean().item()
    return {"fvu": fvu.item(), "l0": l0, "dead": dead, "dead_share": dead / z.shape[1]}


def bench_quality(args, oc) -> dict:
    train, held_out, source = digit_maps(args)
    d, lr, rows = train.shape[1], default_lr(LATENTS), {}
    batches = shuffled(train, BATCH, args.seed)
    for name, kind, aux_k in (("featinv topk + AuxK", "topk", None), ("featinv topk, no AuxK", "topk", 0),
                              ("featinv batchtopk + AuxK", "batchtopk", None)):
        sae, stats = train_sae(batches, d, LATENTS, TOP_K, kind, epochs=args.epochs, lr=lr, aux_k=aux_k, seed=args.seed)
        rows[name] = {**sae_metrics(sae, held_out), "seconds": stats["seconds"]}
    if oc is not None:
        TopKSAE, oc_train, aux_loss = oc
        for name, criterion in (("Overcomplete TopKSAE, MSE", mse), ("Overcomplete TopKSAE + its AuxK", aux_loss)):
            torch.manual_seed(args.seed)
            model = TopKSAE(d, LATENTS, top_k=TOP_K)
            start = time.perf_counter()
            oc_train(model, Epochs(batches), criterion, torch.optim.Adam(model.parameters(), lr=lr),
                     nb_epochs=args.epochs, monitoring=0)
            rows[name] = {**oc_metrics(model, held_out), "seconds": time.perf_counter() - start}
    return {"source": source, "train": len(train), "held_out": len(held_out), "d": d, "epochs": args.epochs,
            "lr": lr, "rows": rows}


def bench_speed(args, oc) -> dict:
    d, latents, k, batch = SCALE.values()
    g = torch.Generator().manual_seed(args.seed)
    pool = [torch.randn(batch, d, generator=g) for _ in range(8)]
    steps = max(1, args.vectors // batch)
    cycle = lambda epoch: (pool[i % len(pool)] for i in range(steps))
    rows = {}
    kinds = ("topk",) if args.quick else ("topk", "batchtopk")
    for kind in kinds:
        train_sae(lambda e: pool[:1], d, latents, k, kind)  # warm-up: lazy imports, allocator
        _, stats = train_sae(cycle, d, latents, k, kind, seed=args.seed)
        rows[f"featinv {kind}"] = stats["seconds"]
    if oc is not None:
        TopKSAE, oc_train, _ = oc
        torch.manual_seed(args.seed)
        model = TopKSAE(d, latents, top_k=k)
        opt = torch.optim.Adam(model.parameters(), lr=default_lr(latents))
        oc_train(model, pool[:1], mse, opt, nb_epochs=1, monitoring=0)  # warm-up
        start = time.perf_counter()
        oc_train(model, Epochs(cycle), mse, opt, nb_epochs=1, monitoring=0)
        rows["Overcomplete TopKSAE"] = time.perf_counter() - start
    return {"vectors": steps * batch, **SCALE, "seconds": rows}


def markdown(res: dict) -> str:
    q, s = res["quality"], res["speed"]
    lines = [(f"### (a) Quality: {q['source']}, {q['train']} training / {q['held_out']} held-out vectors, "
              f"d = {q['d']}, {LATENTS} latents, k = {TOP_K}, batch {BATCH}, {q['epochs']} epochs, lr {q['lr']:.2g}, "
              "1 thread"), "",
             "| SAE | held-out FVU | L0 | dead share | train s |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {r['fvu']:.4f} | {r['l0']:.2f} | {r['dead_share']:.1%} | {r['seconds']:.1f} |"
              for name, r in q["rows"].items()]
    oc = s["seconds"].get("Overcomplete TopKSAE")
    lines += ["", (f"### (b) Throughput: d = {s['d']}, {s['latents']} latents, k = {s['top_k']}, batch {s['batch']}, "
                   f"one epoch of {s['vectors']:,} random vectors, {res['threads']} threads"), "",
              "| SAE | seconds / epoch | vectors / s | vs Overcomplete |", "|---|---|---|---|"]
    lines += [f"| {name} | {sec:.1f} | {s['vectors'] / sec:,.0f} | {'-' if oc is None else f'{oc / sec:.2f}x'} |"
              for name, sec in s["seconds"].items()]
    if oc is None:
        lines += ["", "Overcomplete is not installed: `pip install overcomplete \"matplotlib<3.9\"`."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="8 epochs and 16,384 vectors (< 1 min on an idle 2-core CPU)")
    p.add_argument("--epochs", type=int, help="quality part's epochs (default 60, --quick 8)")
    p.add_argument("--vectors", type=int, help="throughput part's vectors (default 262,144, --quick 16,384)")
    p.add_argument("--demo-out", help="a cached demo folder (featinv.demo.pair.load_demo_pair): its classifier's maps")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the throughput part ((a) uses 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_sae")
    args = p.parse_args(argv)
    args.epochs = args.epochs or (8 if args.quick else 60)
    args.vectors = args.vectors or (16_384 if args.quick else 262_144)
    oc = overcomplete_or_none()
    torch.set_num_threads(1)  # (a)'s tensors are small: a second thread costs more in hand-offs than it gains
    quality = bench_quality(args, oc)
    torch.set_num_threads(args.threads)
    res = {"threads": args.threads, "overcomplete": oc is not None, "quality": quality, "speed": bench_speed(args, oc)}
    write_results(args.out, "bench_sae", res, markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
