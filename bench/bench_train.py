"""Training throughput of WRN-16-2 on 32x32 images: the project's loop against a bare step and the authors' pipeline.

Measured side by side in one process, interleaved round by round (medians reported, because these machines
are shared and noisy):

    (a) bare step: forward / backward / SGD step on one fixed batch already on the device, nothing else
    (b) the project's loop: `train.run_stage` with a Stage built as `train.execute` builds the "ce" stage
        (BatchLoader over uint8 images on the device, `make_augment("sup", ...)` batched augmentation,
        cross-entropy + correct count, per-epoch EpochLog into a temp folder), no recipe
    (c) the same under recipes/gmp.yaml (layer-wise GMP), one magnitude-pruning update every --prune-every
        steps (the paper prunes every 500 steps, out of reach of a short CPU run; the cadence used is printed)
    (d) the authors'-style pipeline (bench/authors_style.py): ImageFolder over the CIFAR-10 JPEGs, PIL
        transforms, DataLoader with --workers workers (their default 0), torch prune masks

Ratios printed: b/a (goal >= 0.95 on CPU), c/b (goal >= 0.95), b/d (goal >= 1.3 on CPU).
Data: the real CIFAR-10 JPEG archive when found (../shared/data/cifar10-jpeg.tar.gz, .gpu/, or
$WHATISLOST_CIFAR_JPEG), else random uint8 images (the authors' side then uses a small synthetic JPEG folder).

    python bench/bench_train.py [--steps 10] [--rounds 4] [--batch 128] [--bf16] [--prune-every 10]
                                [--workers 0] [--data cifar|random] [--device cpu|cuda] [--plain] [--threads N]

This file also holds the helpers bench/bench_gpu.py builds on (TimedLoader, ProjectLoop, bare_rate,
aug_rate, kornia_augment).
"""
from __future__ import annotations

import argparse
import inspect
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for p in (str(REPO), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)
os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

import authors_style  # noqa: E402
from whatislost.config import TrainConfig  # noqa: E402
from whatislost.augment import make_augment  # noqa: E402
from whatislost.data import BatchLoader, ImageData, load_imagefolder  # noqa: E402
from whatislost.losses import supcon_loss  # noqa: E402
from whatislost.models import WideResNet  # noqa: E402
from whatislost.pruning import PRUNABLE, load_manager, named_tensors  # noqa: E402
from whatislost.train import EpochLog, Stage, linear_stage, run_stage  # noqa: E402


# ------------------------------------------------------------------------------------------------ helpers
def sync(device):
    """Wait for the device (the edges of a timed window); invisible to torch.cuda's sync debug mode, which
    bench_gpu.sync_audit uses to find the syncs of the loop itself."""
    device = torch.device(device)
    if device.type == "cuda":
        mode = torch.cuda.get_sync_debug_mode()
        if mode:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize(device)
        if mode:
            torch.cuda.set_sync_debug_mode(mode)


def load_bench_data(kind: str = "auto", archive=None, n_random: int = 50000) -> ImageData:
    """CIFAR-10 from the JPEG archive (decoded once, cached by whatislost), or random uint8 images."""
    path = authors_style.find_archive(archive)
    if kind == "cifar" or (kind == "auto" and path is not None):
        if path is None:
            raise SystemExit("--data cifar: no CIFAR-10 JPEG archive found (give --data-root)")
        return load_imagefolder(str(path))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n_random, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n_random,), generator=g)
    return ImageData("random", [str(i) for i in range(10)], x, y, x[:64], y[:64])


def on_device(data: ImageData, device) -> SimpleNamespace:
    """The training images as the trainer holds them: uint8 (N, C, H, W) and labels on the device, once."""
    device = torch.device(device)
    return SimpleNamespace(x=data.train_x.to(device), y=data.train_y.to(device), mean=data.mean, std=data.std,
                           normalize=data.normalize_unit, size=data.image_size, channels=data.in_channels,
                           name=data.name, device=device)


def batch_loader(dd: SimpleNamespace, batch: int, augment, n_views: int, channels_last: bool, seed: int):
    """whatislost.data.BatchLoader as train.execute builds a training loader (shuffled, last partial batch dropped),
    for either of its signatures: (x, y, normalize, ...) now, (x, y, mean, std, ...) before."""
    common = dict(shuffle=True, drop_last=True, augment=augment, n_views=n_views, channels_last=channels_last, seed=seed)
    if "normalize" in inspect.signature(BatchLoader.__init__).parameters:
        return BatchLoader(dd.x, dd.y, dd.normalize, batch, dd.device, **common)
    return BatchLoader(dd.x, dd.y, dd.mean, dd.std, batch, dd.device, **common)


def kornia_augment(kind: str, size: int = 32, padding: int = 4):
    """The kornia pipelines the project used before whatislost.augment (data.make_augment at that time)."""
    import kornia.augmentation as K

    if kind == "sup":
        return nn.Sequential(K.RandomCrop((size, size), padding=padding), K.RandomHorizontalFlip())
    return nn.Sequential(K.RandomResizedCrop((size, size), scale=(0.2, 1.0)), K.RandomHorizontalFlip(),
                         K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8), K.RandomGrayscale(p=0.2))


def compile_fn(fn):
    """As train.execute compiles a stage's step (backend from WHATISLOST_COMPILE_BACKEND, default inductor)."""
    import torch._dynamo as dynamo

    for name in ("recompile_limit", "cache_size_limit"):  # fresh models per round must not fall back to eager
        if hasattr(dynamo.config, name):
            try:
                setattr(dynamo.config, name, max(getattr(dynamo.config, name), 64))
            except Exception:
                pass
    return torch.compile(fn, backend=os.environ.get("WHATISLOST_COMPILE_BACKEND", "inductor"))


class TimedLoader:
    """A BatchLoader seen by run_stage as one epoch: `warmup` batches, then the device is synchronised and the clock
    starts, then batches until `steps` are measured (or `seconds` have passed with at least `min_steps`), then the
    device is synchronised and the clock stops (before run_stage's end-of-epoch work, timed apart).

    len() is warmup + steps when `steps` is given (SparseML schedules need the exact epoch length), else nominal.
    The inner loader is re-iterated (a new shuffled epoch) when it runs out.
    """

    NOMINAL = 1_000_000

    def __init__(self, inner, warmup: int, steps: int = 0, seconds: float = 0.0, min_steps: int = 1, device="cpu"):
        self.inner, self.generator = inner, inner.generator
        self.warmup, self.steps, self.seconds, self.min_steps = warmup, steps, seconds, max(min_steps, 1)
        self.device = torch.device(device)
        self.measured, self.t_begin, self.t_start, self.t_stop = 0, None, None, None

    def __len__(self):
        return self.warmup + (self.steps or self.NOMINAL)

    def _done(self) -> bool:
        if self.t_start is None:
            return False
        if self.steps:
            return self.measured >= self.steps
        return self.measured >= self.min_steps and time.perf_counter() - self.t_start >= self.seconds

    def __iter__(self):
        self.t_begin = time.perf_counter()
        it, n = iter(self.inner), 0
        while True:
            if self.t_start is None and n >= self.warmup:
                sync(self.device)
                self.t_start = time.perf_counter()
            if self._done():
                break
            try:
                batch = next(it)
            except StopIteration:
                it = iter(self.inner)
                batch = next(it)
            yield batch
            n += 1
            if self.t_start is not None:
                self.measured += 1
        sync(self.device)
        self.t_stop = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return self.t_stop - self.t_start


class ProjectLoop:
    """The project's training loop for one kind of stage, on one model kept across calls of run().

    kind "ce" (Sup), "supcon" (SCL stage 1, 2 views) or "linear" (SCL stage 2 with augmented images through the
    frozen encoder, as linear_augment=true), built as train.execute / train.linear_stage build them; augment
    "ours" (whatislost.augment) or "kornia" (the earlier pipeline). A GMP run needs a
    fresh ProjectLoop (SparseML's masks stay on the model after the stage).
    """

    def __init__(self, dd: SimpleNamespace, kind: str = "ce", batch: int = 128, bf16: bool = False,
                 compile: bool = False, channels_last: bool = True, augment: str = "ours", vflip: bool = False,
                 seed: int = 0):
        self.dd, self.kind, self.batch, self.augment_name = dd, kind, batch, augment
        self.device, self.seed = dd.device, seed
        self.cfg = cfg = TrainConfig(batch_size=batch, bf16=bf16, compile=compile, channels_last=channels_last,
                                     eval_every=0, save_every=0, device=dd.device.type, linear_batch_size=batch,
                                     linear_augment=True, vflip=vflip, out="bench")
        torch.manual_seed(seed)
        supcon = kind == "supcon"
        model = WideResNet(16, 2, dd.channels, 10, projection_head=supcon)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model = model.to(dd.device, memory_format=fmt)
        self.n_views = 2 if supcon else 1

        def compiled(fn):
            return compile_fn(fn) if cfg.compile else fn

        self.compiled = compiled
        self.schedule = dict(kind=cfg.lr_schedule, per=cfg.lr_step, milestones=cfg.lr_milestones, gamma=cfg.lr_gamma,
                             lr_min=cfg.lr_min)
        if kind == "ce":
            def ce_step(views, y):
                logits = model(views[0])
                return F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing), (logits.argmax(1) == y).sum()

            self.module, self.step = model, compiled(ce_step)
        elif kind == "supcon":
            def supcon_step(views, y):
                z = model.head(model.encoder(torch.cat(views)))  # (V*B, D), view-major
                return supcon_loss(z.view(len(views), len(y), -1).transpose(0, 1), y, cfg.temperature,
                                   cfg.base_temperature), None

            self.module, self.step = nn.ModuleDict({"encoder": model.encoder, "head": model.head}), compiled(supcon_step)
        elif kind == "linear":
            # train.linear_stage with linear_augment: its Stage is built once; each run gets a fresh loader
            self.template = linear_stage(cfg, model, None, lambda batch_size: self.batches(), None, None, compiled)
            self.module, self.step = self.template.module, self.template.step_loss
        else:
            raise ValueError(kind)
        self.pruned = named_tensors(self.module, PRUNABLE) if kind != "linear" else {}

    def batches(self):
        dd = self.dd
        if self.augment_name == "kornia":
            aug = kornia_augment("scl" if self.kind == "supcon" else "sup", dd.size).to(dd.device)
        else:
            aug = make_augment("scl" if self.kind == "supcon" else "sup", dd.size, dd.channels, self.cfg.crop_padding,
                               self.cfg.hflip, self.cfg.vflip)
        return batch_loader(dd, self.batch, aug, self.n_views, self.cfg.channels_last, self.seed)

    def stage(self, loader, manager=None) -> Stage:
        cfg = self.cfg
        if self.kind == "ce":
            return Stage("ce", self.module, list(self.module.parameters()), loader, self.step, 1, cfg.lr, cfg.nesterov,
                         cfg.weight_decay, self.schedule, manager, None)
        if self.kind == "supcon":
            return Stage("supcon", self.module, list(self.module.parameters()), loader, self.step, 1, cfg.lr,
                         cfg.nesterov, cfg.weight_decay, self.schedule, manager, logs_train_acc=False)
        t = self.template
        return Stage(t.name, t.module, t.params, loader, t.step_loss, 1, t.lr, t.nesterov, t.weight_decay,
                     t.schedule, manager, None, t.train_mode)

    def run(self, warmup: int = 2, steps: int = 0, seconds: float = 0.0, min_steps: int = 1, recipe: str | None = None,
            recipe_vars: dict | None = None, sparsity: float = 0.9) -> dict:
        """One epoch of run_stage over a TimedLoader; images/s of the measured window.

        images_per_s counts every image through the encoder (both views for supcon), anchors_per_s the batch's
        images. epoch_end_s: run_stage's end-of-epoch work after the window (checks, EpochLog, finalize).
        """
        loader = TimedLoader(self.batches(), warmup, steps, seconds, min_steps, self.device)
        manager = load_manager(recipe, 1, sparsity, recipe_vars or {}) if recipe else None
        run_dir = Path(tempfile.mkdtemp(prefix="bench-run-"))
        epoch_log = EpochLog(run_dir, self.pruned)
        try:
            run_stage(self.stage(loader, manager), self.cfg, epoch_log, run_dir)
            t_after = time.perf_counter()
        finally:
            epoch_log.close()
            shutil.rmtree(run_dir, ignore_errors=True)
        anchors = loader.measured * self.batch
        return dict(images_per_s=anchors * self.n_views / loader.elapsed, anchors_per_s=anchors / loader.elapsed,
                    steps=loader.measured, seconds=loader.elapsed, warmup_s=loader.t_start - loader.t_begin,
                    epoch_end_s=t_after - loader.t_stop, batch=self.batch, views=self.n_views,
                    t_start=loader.t_start, t_stop=loader.t_stop)


def gmp_vars(total_steps: int, every: int) -> dict:
    """recipes/gmp.yaml variables for a one-epoch stage of `total_steps` steps: pruning from step 0 to the end, one
    magnitude update every `every` steps (updates at steps 0, every, 2 every, ...)."""
    return {"prune_start": 0.0, "prune_end": 1.0, "update_frequency": min(every / total_steps, 1.0)}


def _supcon_loss_nosync(features, labels, temperature=0.5, base_temperature=None):
    """The SupCon loss of whatislost.losses with the anchors-without-positives filter as a masked mean instead of
    boolean indexing (no data-dependent shape, hence no host sync); same value whenever every anchor has one."""
    b, v, _ = features.shape
    z = F.normalize(features.float(), dim=-1).transpose(0, 1).reshape(b * v, -1)
    y = labels.repeat(v)
    self_mask = torch.eye(b * v, dtype=torch.bool, device=z.device)
    logits = (z @ z.T / temperature).masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (y[:, None] == y[None, :]) & ~self_mask
    n_pos = positives.sum(1)
    mean_pos = log_prob.masked_fill(~positives, 0.0).sum(1) / n_pos.clamp_min(1)
    has = (n_pos > 0).to(mean_pos.dtype)
    loss = -(mean_pos * has).sum() / has.sum().clamp_min(1)
    return loss if base_temperature is None else loss * (temperature / base_temperature)


def bare_rate(device, kind: str = "ce", batch: int = 128, bf16: bool = False, channels_last: bool = True,
              compile: bool = False, warmup: int = 3, steps: int = 0, seconds: float = 0.0, min_steps: int = 2,
              views: int = 2, nosync_loss: bool = False, seed: int = 0) -> dict:
    """Images/s of the bare step on one fixed random batch on the device: forward, loss, backward, SGD step.

    kind "ce": model(x) + cross-entropy; "supcon": encoder + projection head over views x batch images + the
    project's SupCon loss (nosync_loss: the masked-mean variant above). images_per_s counts every image.
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    supcon = kind == "supcon"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = WideResNet(16, 2, 3, 10, projection_head=supcon).to(device, memory_format=fmt).train()
    params = list(model.encoder.parameters()) + list(model.head.parameters()) if supcon else list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    n = batch * (views if supcon else 1)
    x = torch.randn(n, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)
    loss_fn = _supcon_loss_nosync if nosync_loss else supcon_loss

    def step():
        if supcon:
            z = model.head(model.encoder(x))
            return loss_fn(z.view(views, batch, -1).transpose(0, 1), y, 0.5, 0.07)
        return F.cross_entropy(model(x), y)

    fn = compile_fn(step) if compile else step
    t_begin = time.perf_counter()
    i = measured = 0
    t0 = None
    while True:
        if t0 is None and i >= warmup:
            sync(device)
            t0 = time.perf_counter()
        if t0 is not None and ((steps and measured >= steps) or
                               (not steps and measured >= min_steps and time.perf_counter() - t0 >= seconds)):
            break
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        i += 1
        if t0 is not None:
            measured += 1
    sync(device)
    dt = time.perf_counter() - t0
    return dict(images_per_s=measured * n / dt, anchors_per_s=measured * batch / dt, steps=measured, seconds=dt,
                warmup_s=t0 - t_begin, batch=batch, views=views if supcon else 1)


def aug_rate(device, kind: str, batch: int, views: int = 1, which: str = "ours", warmup: int = 3,
             seconds: float = 0.5, min_calls: int = 3, size: int = 32) -> dict:
    """Augmentation alone on a float batch in [0, 1] already on the device (the loader's input), `views` calls per
    step as BatchLoader makes them. anchors_per_s = batch images per second (each with `views` views)."""
    device = torch.device(device)
    x = torch.randint(0, 256, (batch, 3, size, size), device=device).float().div_(255)
    fn = kornia_augment(kind, size).to(device) if which == "kornia" else make_augment(kind, size, 3, 4, True)
    for _ in range(warmup):
        for _ in range(views):
            fn(x)
    sync(device)
    t0 = time.perf_counter()
    calls = 0
    while calls < min_calls or time.perf_counter() - t0 < seconds:
        for _ in range(views):
            fn(x)
        calls += 1
    sync(device)
    dt = (time.perf_counter() - t0) / calls
    return dict(anchors_per_s=batch / dt, images_per_s=batch * views / dt, ms_per_step=dt * 1e3, calls=calls,
                batch=batch, views=views)


# ------------------------------------------------------------------------------------------------ the CPU comparison
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="measured steps per configuration and round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast in (a)-(c) (the authors' side stays fp32)")
    p.add_argument("--prune-every", type=int, default=10, help="steps between GMP updates in (c) (paper: 500)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of the authors'-style pipeline (d)")
    p.add_argument("--plain", action="store_true", help="contiguous (NCHW) instead of channels_last in (a)-(c)")
    p.add_argument("--data", choices=["auto", "cifar", "random"], default="auto")
    p.add_argument("--data-root", default=None, help="CIFAR-10 JPEG archive (default: found, see the docstring)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    t_setup = time.perf_counter()
    data = load_bench_data(args.data, args.data_root)
    dd = on_device(data, device)
    folder = authors_style.train_folder(args.data_root)
    authors_model = authors_style.make_model(device)
    dense = ProjectLoop(dd, "ce", args.batch, bf16=args.bf16, channels_last=not args.plain)
    total = args.warmup + args.steps
    updates = len([s for s in range(args.warmup, total) if s % args.prune_every == 0])
    print(f"setup {time.perf_counter() - t_setup:.1f} s; data {data.name} ({len(data.train_x)} images), "
          f"authors' folder {folder}", flush=True)

    load_before = os.getloadavg()
    results = {"a": [], "b": [], "c": [], "d": []}
    for r in range(args.rounds):
        results["a"].append(bare_rate(device, "ce", args.batch, args.bf16, not args.plain, warmup=args.warmup,
                                      steps=args.steps)["images_per_s"])
        results["b"].append(dense.run(args.warmup, args.steps)["images_per_s"])
        gmp = ProjectLoop(dd, "ce", args.batch, bf16=args.bf16, channels_last=not args.plain, seed=r + 1)
        results["c"].append(gmp.run(args.warmup, args.steps, recipe="gmp",
                                    recipe_vars=gmp_vars(total, args.prune_every))["images_per_s"])
        results["d"].append(authors_style.measure(device, args.workers, args.batch, args.warmup, steps=args.steps,
                                                  folder=folder, model=authors_model,
                                                  seed=r)["images_per_s"])
        print(f"round {r + 1}: " + "  ".join(f"{k} {v[-1]:.1f}" for k, v in results.items()) + " images/s", flush=True)

    med = {k: statistics.median(v) for k, v in results.items()}
    spread = {k: (min(v), max(v)) for k, v in results.items()}
    print(f"\nWRN-16-2, {device}, batch {args.batch}, {'bf16 autocast' if args.bf16 else 'fp32'}, "
          f"{'NCHW' if args.plain else 'channels_last'}, data={data.name}, torch threads {torch.get_num_threads()}, "
          f"{args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up (median; min-max); load average "
          f"{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after (a shared machine: rounds far apart are noise)")
    print(f"(a) bare step                    {med['a']:8.1f} img/s  ({spread['a'][0]:.0f}-{spread['a'][1]:.0f})")
    print(f"(b) project loop (run_stage)     {med['b']:8.1f} img/s  ({spread['b'][0]:.0f}-{spread['b'][1]:.0f})")
    print(f"(c) project loop + GMP           {med['c']:8.1f} img/s  ({spread['c'][0]:.0f}-{spread['c'][1]:.0f})  "
          f"layer-wise GMP, one update every {args.prune_every} steps ({updates} in each measured window)")
    print(f"(d) authors'-style, {args.workers} workers     {med['d']:8.1f} img/s  "
          f"({spread['d'][0]:.0f}-{spread['d'][1]:.0f})  fp32, ImageFolder + PIL + DataLoader, torch prune masks")
    print(f"b/a = {med['b'] / med['a']:.3f}  (goal >= 0.95 on CPU, >= 0.90 on GPU)")
    print(f"c/b = {med['c'] / med['b']:.3f}  (goal >= 0.95; cadence here: every {args.prune_every} steps, paper: 500)")
    print(f"b/d = {med['b'] / med['d']:.3f}  (goal >= 1.3 on CPU)")
    return dict(median=med, rounds=results, updates_per_window=updates)


if __name__ == "__main__":
    main()
