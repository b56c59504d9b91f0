"""End-to-end cost of `whatislost-eval` versus the bare forward passes it needs, side by side.

Builds a few WRN-16-2 populations (weights from real training are not needed for timing:
random-init checkpoints cost the same), then times
    bare:  load data + for every model one forward pass over the test set, and for the
           prediction-depth models one more over the training set (hidden representations on)
    eval:  run_eval(metrics=acc,pie,qscore,depth) on the same runs, cache cleared
    umap:  run_eval(metrics=umap) afterwards (forward passes cached), reported separately
Goal (issue 3): eval / bare <= 1.3, UMAP excluded.

    python bench/bench_eval.py [--data cifar|digits] [--models 3] [--depth-models 1] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from whatislost.config import TrainConfig  # noqa: E402
from whatislost.data import load_data  # noqa: E402
from whatislost.eval import run_eval  # noqa: E402
from whatislost.models import WideResNet  # noqa: E402
from whatislost.rundir import load_model, save_checkpoint, write_done  # noqa: E402

CIFAR = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def make_runs(root: Path, dataset: str, data_root: str, data, models: int):
    """Sup dense and Sup GMP-90 populations of random-init WRN-16-2 checkpoints."""
    runs = []
    for method, sparsity in (("dense", 0.0), ("gmp", 0.9)):
        for seed in range(models):
            torch.manual_seed(seed)
            cfg = TrainConfig(dataset=dataset, data_root=data_root, recipe=f"recipes/{method}.yaml", sparsity=sparsity,
                              seed=seed)
            run = root / f"{method}-{seed}"
            run.mkdir(parents=True)
            model = WideResNet(16, 2, data.in_channels, data.num_classes)
            save_checkpoint(run, model, config=cfg.to_dict(), method=method, loss="ce", dataset=data.name,
                            target_sparsity=sparsity, sparsity=sparsity, seed=seed, test_acc=0.0)
            write_done(run, {})
            runs.append(run)
    return runs


@torch.no_grad()
def bare_passes(runs, dataset, data_root, depth_models, device):
    data = load_data(dataset, data_root)
    mean, std = data.mean.to(device).view(1, -1, 1, 1), data.std.to(device).view(1, -1, 1, 1)

    def forward(model, x, hidden):
        for i in range(0, len(x), 1000):
            xb = ((x[i:i + 1000].to(device).float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)
            h = model.encoder(xb, return_hidden=hidden)
            model.classifier(h[0] if hidden else h)

    per_population = {}
    for run in runs:
        model = load_model(run)[0].to(device, memory_format=torch.channels_last)
        pop = run.name.split("-")[0]
        k = per_population.setdefault(pop, 0)
        forward(model, data.test_x, hidden=k < depth_models)
        if k < depth_models:
            forward(model, data.train_x, hidden=True)
        per_population[pop] = k + 1
    if device == "cuda":
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", choices=["cifar", "digits"], default="cifar")
    p.add_argument("--models", type=int, default=3, help="models per population (2 populations)")
    p.add_argument("--depth-models", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-umap", action="store_true")
    p.add_argument("--data-root", default=str(CIFAR), help="cifar10-jpeg.tar.gz (for --data cifar)")
    args = p.parse_args()
    dataset, data_root = ("imagefolder", args.data_root) if args.data == "cifar" else ("digits", "")
    data = load_data(dataset, data_root)  # warm the decoded-tensor cache so neither side pays for JPEG decoding
    root = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    try:
        runs = make_runs(root / "runs", dataset, data_root, data, args.models)
        t0 = time.perf_counter()
        bare_passes(runs, dataset, data_root, args.depth_models, args.device)
        bare = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_eval(root / "runs", root / "eval", device=args.device, metrics=("acc", "pie", "qscore", "depth"),
                 depth_models=args.depth_models, report=False)
        full = time.perf_counter() - t0
        print(f"\n{len(runs)} WRN-16-2 models in 2 populations, {args.depth_models} depth model(s) each, data={data.name} "
              f"(test {len(data.test_x)}, train {len(data.train_x)}), device={args.device}, threads {torch.get_num_threads()}")
        print(f"bare forward passes   {bare:8.1f} s")
        print(f"whatislost-eval       {full:8.1f} s   eval/bare = {full / bare:.2f}  (goal <= 1.3, UMAP excluded)")
        if not args.no_umap:
            t0 = time.perf_counter()
            run_eval(root / "runs", root / "eval-umap", device=args.device, metrics=("umap",), report=False)
            print(f"UMAP (4 embeddings)   {time.perf_counter() - t0:8.1f} s   (separately, forward passes cached)")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
