"""The authors'-style training pipeline, as the throughput peer of the project's loop.

Written from scratch to behave like the pipeline of the paper's code (Corti et al. 2022), for timing only:

  * data: torchvision ``ImageFolder`` over the unpacked CIFAR-10 JPEG folder (``train/<class>/*.jpg``), PIL
    transforms per image: RandomCrop(32, padding=4), RandomVerticalFlip, RandomHorizontalFlip, ToTensor,
    Normalize; a ``DataLoader(batch_size=128, shuffle=True, num_workers=W, pin_memory=True)`` (their default is
    0 workers). Their code reads CIFAR-10 from torchvision's pickles; here the JPEG files are decoded per image
    as well, which is what an ImageFolder-based pipeline costs.
  * model: the same WideResNet-16-2 (``whatislost.models.WideResNet``), fp32, default memory format, eager.
  * pruning: ``torch.nn.utils.prune.l1_unstructured`` on every Conv2d weight and on Linear weight and bias (as
    their layer-wise ``magnitude_pruning``), applied once before the measured window and again every
    ``prune_every`` steps (their cadence: 500); prune's forward pre-hooks multiply weight_orig by the mask at
    every forward, which is the steady-state cost of their masks.
  * loop: images/labels ``.to(device)``, zero_grad, forward, cross-entropy, backward, SGD(momentum 0.9,
    weight decay 5e-4), and per step ``loss.item()`` and ``(pred == y).sum().item()`` (two host syncs per step,
    as their running loss/accuracy bookkeeping); cuDNN deterministic, benchmark off (their settings; restored
    afterwards).

``measure(...)`` returns images/s over a window after warm-up, within one epoch of the loader (their workers
are not persistent: a new epoch restarts them, and a window crossing an epoch boundary would count that
restart more often than a 391-step epoch does).

    python bench/authors_style.py [--device cpu|cuda] [--workers 0] [--seconds 5] [--archive PATH]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# CIFAR-10 channel statistics (values do not affect timing)
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)

# where the CIFAR-10 JPEG archive may be: $WHATISLOST_CIFAR_JPEG, a carried copy in .gpu/, ../shared/data/
ARCHIVES = [REPO / ".gpu" / "cifar10-jpeg.tar.gz", REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"]


def find_archive(explicit: str | None = None) -> Path | None:
    """The CIFAR-10 JPEG archive (or unpacked folder) to use, or None when there is none."""
    for cand in [explicit, os.environ.get("WHATISLOST_CIFAR_JPEG"), *ARCHIVES]:
        if cand and Path(cand).exists():
            return Path(cand)
    return None


_FOLDERS: dict = {}


def train_folder(archive: str | Path | None = None, synthetic_per_class: int = 256) -> Path:
    """The ImageFolder root of the training images (``<root>/<class>/*.jpg``).

    An archive is unpacked once into whatislost's cache (``whatislost.data``'s unpack helper, keyed by content);
    an unpacked folder is used as is. Without any, a small synthetic JPEG folder (10 classes x
    `synthetic_per_class` random images) is written to a temp folder, so that the pipeline can still be timed.
    """
    key = str(archive)
    if key in _FOLDERS:
        return _FOLDERS[key]
    path = find_archive(str(archive) if archive else None)
    if path is None:
        folder = _synthetic_folder(synthetic_per_class)
    else:
        from whatislost.data import _find_split_root, _unpack_once

        root = _unpack_once(path) if path.is_file() else path
        folder = _find_split_root(root) / "train"
    _FOLDERS[key] = folder
    return folder


def _synthetic_folder(per_class: int) -> Path:
    import numpy as np
    from PIL import Image

    root = Path(tempfile.mkdtemp(prefix="authors-style-")) / "train"
    rng = np.random.default_rng(0)
    for c in range(10):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.jpg",
                                                                                   quality=75)
    return root


def make_loader(folder: Path, batch_size: int = 128, workers: int = 0, pin_memory: bool = True, vflip: bool = True,
                seed: int = 0):
    """ImageFolder + per-image PIL transforms in a DataLoader, as the authors' get_cifar10 (train split)."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    flips = [T.RandomVerticalFlip()] if vflip else []
    transform = T.Compose([T.RandomCrop(32, padding=4), *flips, T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(MEAN, STD)])
    dataset = ImageFolder(str(folder), transform=transform)
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                       pin_memory=pin_memory, generator=g)


def prune_layerwise(model: nn.Module, amount: float):
    """torch prune's l1_unstructured on every Conv2d weight and every Linear weight and bias (prune's hooks stay)."""
    import torch.nn.utils.prune as prune

    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            prune.l1_unstructured(module, name="weight", amount=amount)
        elif isinstance(module, nn.Linear):
            prune.l1_unstructured(module, name="weight", amount=amount)
            if module.bias is not None:
                prune.l1_unstructured(module, name="bias", amount=amount)


def make_model(device, prune_amount: float = 0.5) -> nn.Module:
    from whatislost.models import WideResNet

    model = WideResNet(16, 2, 3, 10).to(device)
    if prune_amount > 0:
        prune_layerwise(model, prune_amount)
    return model.train()


@contextlib.contextmanager
def authors_cudnn(enabled: bool = True):
    """cuDNN deterministic and no autotuning, as the authors set it; the previous flags come back afterwards."""
    old = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    if enabled:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = old


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(device="cpu", workers: int = 0, batch_size: int = 128, warmup: int = 3, steps: int = 0,
            seconds: float = 0.0, min_steps: int = 2, archive=None, prune_amount: float = 0.5,
            prune_every: int = 500, item_sync: bool = True, lr: float = 0.05, model: nn.Module | None = None,
            seed: int = 0, folder: Path | None = None) -> dict:
    """Images/s of the authors'-style loop after `warmup` steps: `steps` steps, or `seconds` seconds (at least
    `min_steps`), whichever is given, ended early at the end of the loader's epoch.

    `folder` (an ImageFolder root) overrides `archive`. Returns images_per_s, steps, seconds, startup_s (iterator
    creation to the first batch: worker start-up), warmup_s, workers, batch_size, data (the folder used) and
    whether the epoch end cut the window.
    """
    device = torch.device(device)
    folder = folder or train_folder(archive)
    torch.manual_seed(seed)
    model = model if model is not None else make_model(device, prune_amount)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    loader = make_loader(folder, batch_size, workers, pin_memory=device.type == "cuda", seed=seed)
    with authors_cudnn(device.type == "cuda"):
        t_iter = time.perf_counter()
        it = iter(loader)
        n = measured = 0
        t0 = t1 = None
        startup = None
        running_loss, correct, cut = 0.0, 0, False
        try:
            while True:
                if t0 is None and n == warmup:
                    _sync(device)
                    t0 = time.perf_counter()
                if t0 is not None:
                    elapsed = time.perf_counter() - t0
                    if (steps and measured >= steps) or (not steps and elapsed >= seconds and measured >= min_steps):
                        break
                try:
                    images, labels = next(it)
                except StopIteration:
                    cut = True
                    break
                if startup is None:
                    startup = time.perf_counter() - t_iter
                images, labels = images.to(device), labels.to(device)
                if prune_every and prune_amount > 0 and n and n % prune_every == 0:
                    prune_layerwise(model, prune_amount)  # a new magnitude mask on top of the current one
                optimizer.zero_grad()
                outputs = model(images)
                loss = F.cross_entropy(outputs, labels)
                loss.backward()
                optimizer.step()
                if item_sync:
                    running_loss += loss.item()
                    correct += (outputs.detach().argmax(1) == labels).sum().item()
                n += 1
                if t0 is not None:
                    measured += 1
            _sync(device)
            t1 = time.perf_counter()
        finally:
            del it  # shuts the workers down
    if t0 is None or measured == 0:
        raise RuntimeError(f"authors'-style loop: the loader's epoch ({len(loader)} batches) ended before the "
                           f"{warmup} warm-up steps were done")
    return dict(images_per_s=measured * batch_size / (t1 - t0), steps=measured, seconds=t1 - t0,
                startup_s=startup, warmup_s=t0 - t_iter, workers=workers, batch_size=batch_size, data=str(folder),
                epoch_end_cut=cut, prune_amount=prune_amount, item_sync=item_sync)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--archive", default=None, help="CIFAR-10 JPEG .tar.gz or unpacked folder (default: found)")
    args = ap.parse_args(argv)
    r = measure(args.device, args.workers, args.batch, args.warmup, seconds=args.seconds, archive=args.archive)
    print(f"authors'-style loop, {args.device}, {args.workers} workers, batch {args.batch}: "
          f"{r['images_per_s']:,.0f} images/s over {r['steps']} steps ({r['seconds']:.1f} s; "
          f"first batch after {r['startup_s']:.2f} s){' [epoch end]' if r['epoch_end_cut'] else ''}")
    return r


if __name__ == "__main__":
    os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
    main()
