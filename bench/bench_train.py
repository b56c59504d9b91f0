"""Training throughput of WRN-16-2 on 32x32 images, measured side by side in one run.

    (a) bare loop: forward/backward/SGD step on one random batch, nothing else
    (b) the project's training loop (`train.run_stage`): uint8 data, batched augmentation on the
        device, loss, metrics/sparsity logging; no recipe
    (c) the same under the GMP recipe, pruning steps inside the measured window

Goals (issue 2): (b) >= 90% of (a), (c) within 5% of (b). The three are interleaved in
rounds and the median of each is reported, because these machines are shared and noisy.

    python bench/bench_train.py [--steps 30] [--rounds 5] [--batch 128] [--bf16] [--prune-every 10] [--data cifar|random]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import whatislost  # noqa: E402,F401
from whatislost.config import TrainConfig  # noqa: E402
from whatislost.data import BatchLoader, ImageData, load_imagefolder, make_augment  # noqa: E402
from whatislost.models import WideResNet  # noqa: E402
from whatislost.train import EpochLog, PRUNABLE, load_manager, named_tensors, run_stage  # noqa: E402

CIFAR = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def bare_loop(cfg, steps, memory_format):
    """(a): images/s of the plain step on a fixed random batch."""
    model = WideResNet(16, 2, 3, 10).to(memory_format=memory_format).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(cfg.batch_size, 3, 32, 32).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (cfg.batch_size,))
    for i in range(steps + 2):
        if i == 2:  # two warm-up steps
            t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * cfg.batch_size / (time.perf_counter() - t0)


def project_loop(cfg, data: ImageData, steps, recipe: str | None, tmp: Path, prune_every: int = 10):
    """(b)/(c): images/s of `run_stage` for one epoch of `steps` batches (+2 warm-up steps excluded)."""
    torch.manual_seed(0)
    n = (steps + 2) * cfg.batch_size
    model = WideResNet(16, 2, 3, 10).to(memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    loader = BatchLoader(data.train_x[:n], data.train_y[:n], data.mean, data.std, cfg.batch_size, shuffle=True,
                         drop_last=True, augment=make_augment("sup", 32, 3, 4, True), channels_last=cfg.channels_last)
    manager = None
    if recipe:
        # a magnitude-pruning update every `prune_every` steps across the measured epoch (the paper: every 500)
        cfg.recipe, cfg.sparsity = recipe, 0.9
        cfg.recipe_vars = {"prune_start": 0.0, "prune_end": 1.0, "update_frequency": prune_every / len(loader)}
        manager = load_manager(cfg, 1)
    run_dir = Path(tempfile.mkdtemp(dir=tmp))
    epoch_log = EpochLog(run_dir, named_tensors(model, PRUNABLE))
    warm = {"left": 2, "t0": None}

    def step_loss(views, y):
        if warm["left"] == 0 and warm["t0"] is None:
            warm["t0"] = time.perf_counter()
        warm["left"] -= 1
        logits = model(views[0])
        return F.cross_entropy(logits, y), (logits.argmax(1) == y).sum()

    run_stage("ce", cfg, module=model, params=model.parameters(), loader=loader, step_loss=step_loss, epochs=1,
              lr=cfg.lr, nesterov=False, epoch_log=epoch_log, manager=manager, run_dir=run_dir)
    seconds = time.perf_counter() - warm["t0"]
    epoch_log.close()
    return steps * cfg.batch_size / seconds


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--prune-every", type=int, default=10, help="steps between GMP pruning updates in (c)")
    p.add_argument("--plain", action="store_true", help="contiguous (NCHW) instead of channels_last")
    p.add_argument("--data", choices=["cifar", "random"], default="cifar" if CIFAR.exists() else "random")
    args = p.parse_args()

    cfg = TrainConfig(batch_size=args.batch, bf16=args.bf16, channels_last=not args.plain, eval_every=0)
    if args.data == "cifar":
        data = load_imagefolder(str(CIFAR))
    else:
        g = torch.Generator().manual_seed(0)
        n = (args.steps + 2) * args.batch
        x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
        data = ImageData("random", [str(i) for i in range(10)], x, torch.randint(0, 10, (n,), generator=g), x[:10], torch.zeros(10).long())
    fmt = torch.contiguous_format if args.plain else torch.channels_last
    results = {"a": [], "b": [], "c": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            results["a"].append(bare_loop(cfg, args.steps, fmt))
            results["b"].append(project_loop(cfg, data, args.steps, None, Path(tmp)))
            results["c"].append(project_loop(cfg, data, args.steps, "recipes/gmp.yaml", Path(tmp), args.prune_every))
            print(f"round {r + 1}: " + "  ".join(f"{k} {v[-1]:.0f} img/s" for k, v in results.items()), flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"\nWRN-16-2, batch {args.batch}, {'bf16 autocast' if args.bf16 else 'fp32'}, "
          f"{'NCHW' if args.plain else 'channels_last'}, data={args.data}, torch threads {torch.get_num_threads()}, "
          f"{args.rounds} rounds x {args.steps} steps (median), GMP update every {args.prune_every} steps")
    print(f"(a) bare loop            {med['a']:7.1f} img/s")
    print(f"(b) project loop         {med['b']:7.1f} img/s   b/a = {med['b'] / med['a']:.3f}  (goal >= 0.90)")
    print(f"(c) project loop + GMP   {med['c']:7.1f} img/s   c/b = {med['c'] / med['b']:.3f}  (goal >= 0.95)")


if __name__ == "__main__":
    os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
    main()
