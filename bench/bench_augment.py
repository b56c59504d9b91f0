"""Batched augmentation throughput: whatislost.augment versus the equivalent kornia pipeline, side by side.

    sup: RandomCrop(size, padding=4) + RandomHorizontalFlip, one call per batch (default batch 128)
    scl: RandomResizedCrop(size, scale=(0.2, 1)) + RandomHorizontalFlip + RandomApply(ColorJitter(0.4, 0.4, 0.4,
         0.1), p=0.8) + RandomGrayscale(0.2), one call per view as BatchLoader does (default 1024 x 2 views)

Both sides get the same float (B, 3, size, size) batch in [0, 1] already on the device (the loader's input).
Measurements are interleaved (ours, kornia, ours, kornia, ... per round), each one `iters` calls timed between
device synchronisations; medians over rounds are reported with the ratio ours / kornia (> 1: ours faster).
Target (GPU): the SCL augmentation of one step (batch x views images) <= 15% of an SCL training step, with the
step taking batch x views / --step-rate seconds (WRN-16-2 bf16 on an H100: ~44k images/s, i.e. ~46 ms for
1024 x 2 views, so the augmentation should stay well under ~7 ms).

    python bench/bench_augment.py [--device cpu|cuda] [--rounds 5] [--sup-batch 128] [--scl-batch 1024]
                                  [--views 2] [--size 32] [--threads N] [--seconds 0.2]
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from whatislost.augment import make_augment  # noqa: E402


def kornia_pipeline(kind: str, size: int, crop_padding: int = 4):
    """The kornia equivalents (what data.make_augment built before whatislost.augment)."""
    import kornia.augmentation as K

    if kind == "sup":
        return torch.nn.Sequential(K.RandomCrop((size, size), padding=crop_padding), K.RandomHorizontalFlip())
    return torch.nn.Sequential(K.RandomResizedCrop((size, size), scale=(0.2, 1.0)), K.RandomHorizontalFlip(),
                               K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8), K.RandomGrayscale(p=0.2))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, x, views, iters, device) -> float:
    """Seconds per call of `views` augmentations of x."""
    sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        for _ in range(views):
            fn(x)
    sync(device)
    return (time.perf_counter() - t) / iters


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sup-batch", type=int, default=128)
    ap.add_argument("--scl-batch", type=int, default=1024)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--seconds", type=float, default=0.2, help="about this long per measurement")
    ap.add_argument("--step-rate", type=float, default=44000.0,
                    help="SCL training throughput in images (views) per second, for the share of a step")
    ap.add_argument("--kinds", default="sup,scl")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    import kornia

    print(f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"torch {torch.__version__}, kornia {kornia.__version__}, {torch.get_num_threads()} CPU threads, "
          f"{args.size}x{args.size} RGB, {args.rounds} interleaved rounds, medians")
    torch.manual_seed(0)
    results = {}
    for kind in args.kinds.split(","):
        batch, views = (args.sup_batch, 1) if kind == "sup" else (args.scl_batch, args.views)
        x = torch.randint(0, 256, (batch, 3, args.size, args.size), device=device).float().div_(255)
        sides = {"ours": make_augment(kind, args.size, 3, 4, True),
                 "kornia": kornia_pipeline(kind, args.size).to(device)}
        iters = {}
        for name, fn in sides.items():  # warm up (allocator, cuDNN/kernels), then size the measurements
            timed(fn, x, views, 1, device)
            once = timed(fn, x, views, 1, device)
            iters[name] = max(1, math.ceil(args.seconds / max(once, 1e-6)))
        per_call = {name: [] for name in sides}
        for _ in range(args.rounds):
            for name, fn in sides.items():
                per_call[name].append(timed(fn, x, views, iters[name], device))
        med = {name: statistics.median(ts) for name, ts in per_call.items()}
        results[kind] = med
        n = batch * views
        print(f"\n{kind}: batch {batch} x {views} view(s) per call ({n} images)")
        for name in sides:
            print(f"  {name:7s} {n / med[name]:>12,.0f} images/s   {med[name] * 1e3:9.3f} ms per call"
                  f"   ({iters[name]} calls per measurement)")
        print(f"  ratio ours/kornia (throughput): {med['kornia'] / med['ours']:.2f}x")
        if kind == "scl" and device.type == "cuda":
            step = n / args.step_rate
            for name in sides:
                print(f"  {name:7s} share of an SCL step of {step * 1e3:.1f} ms ({args.step_rate:,.0f} images/s): "
                      f"{100 * med[name] / step:.1f}%  (target <= 15%, i.e. <= {0.15 * step * 1e3:.1f} ms)")
    return results


if __name__ == "__main__":
    main()
