"""The paper grid in a day on one GPU: the issue's throughput table, before and after, side by side in one run.

WRN-16-2 on 32x32 CIFAR-10 images, one process unless a row says "packed". "before" is the project as it was
(batched kornia augmentation, eager fp32); "after" is its current path (whatislost.augment, channels_last, bf16
autocast, torch.compile with inductor). Rows, in the order they run (each one a few seconds, each guarded: an
error is written into the JSON and the next row runs; a row that would overrun --budget is skipped):

  core, interleaved in --rounds rounds (median): bare step fp32 b128 and bf16 b128 (eager, channels_last, one
      fixed batch on the GPU); project loop (train.run_stage on a Stage built as train.execute builds the "ce"
      stage: uint8 data on the GPU, batched augmentation, EpochLog) fp32 b128 with kornia (before) and with
      whatislost.augment (after), bf16 b128 (eager)
  bare bf16 b512; Sup augmentation alone b128 and SCL augmentation alone b1024 x 2 views, ours vs kornia
  sync audit (CUDA only): host synchronisations per step of the project Sup loop, Sup + GMP, SCL and linear-head
      loops, with the Python line that makes each (torch.cuda.set_sync_debug_mode("warn"); see sync_audit)
  bare SupCon step bf16 b1024 x 2 views; the project SCL loop (stage 1) after (ours, bf16) and before (kornia, fp32)
  GMP at the paper's cadence: the project loop dense vs under recipes/gmp.yaml, --gmp-steps (500) measured steps
      after 20 warm-up steps, magnitude updates at steps 0 and 500, so the measured window holds exactly one
      update per 500 steps (the paper's cadence) besides the per-step mask work (SparseML's forward pre-hooks,
      gradient hooks and post-step mask multiply on every pruned tensor) and its per-epoch logging (an epoch of
      520 steps here, 391 in the paper); both fresh models, bf16 eager
  authors'-style peer (bench/authors_style.py): ImageFolder + PIL + DataLoader, torch prune masks, fp32; 0 and 8
      workers (their default is 0)
  packed: K spawned processes on the one GPU, each with its own copy of the training images on the GPU, each
      running the project loop (warm-up first, then a synchronised start on a barrier, then --packed-seconds);
      the row is the sum of their images/s (overlap = fraction of the windows that all ran at once). Sup K = 1,
      4, 8 (bf16 eager); the SCL linear-head stage (batch 256, encoder forward only) single; SCL K = 4
  compiled (torch.compile, inductor): the project Sup loop bf16 b128 (compile time = warmup_s, then --rounds
      windows, median) and the SCL loop
  extras while the budget lasts: packed compiled SCL / Sup (when compiling was faster), the bare SupCon step with
      a sync-free loss, GMP at the earlier every-10-steps cadence, packed linear head, SCL K = 8, compiled GMP,
      the compiled bare step
  projection: GPU-hours of the paper grid = sum over Sup, SCL stage 1, SCL linear head and One-Shot fine-tunes of
      image-steps / best per-GPU throughput of that kind (packed or single; see GRID and projection()).

How to read the output
  * progress lines "[  12.3 s] key: ... images/s" as rows finish; the same in OUT/progress.log; every row also in
    OUT/results.json, rewritten after each row (a timeout keeps what was measured; "status" is ok, error or skipped).
  * images/s counts every image through the encoder: for SCL both views (views/s); "anchors/s" is images of the
    batch (the unit of the issue's SCL augmentation row). Aug rows give ms per training step of augmentation.
  * warmup_s: time from the start of a row to the end of its warm-up steps; for compiled rows this is the compile
    time. epoch_end_s: run_stage's end-of-epoch work (checks, CSV logs), paid once per epoch, not in images/s.
  * The final table: one line per issue row: before | after | after/before | the issue's figure (earlier
    measurement, other machine or code). Then the targets with their ratios (PASS/MISS), then the projection
    and its inputs, then one line to paste into BENCHMARKS.md: "paper grid projected: N GPU-hours (DEVICE, DATE)".
  * Compare rows only within one run: the GPU's clocks and other tenants vary between runs and machines.

    python bench/bench_gpu.py --out OUT [--budget 280] [--rounds 3] [--data auto|cifar|random] [--data-root PATH]
    python bench/bench_gpu.py --device cpu --quick --out /tmp/bench-smoke      # smoke test without a GPU
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for _p in (str(REPO), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)
os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

import torch  # noqa: E402

import authors_style  # noqa: E402
import bench_train as bt  # noqa: E402

# the paper grid (examples/cifar10_paper.yaml, 660 runs): runs, epochs, views per image, runs under a pruning mask
N_TRAIN = 50000
GRID = {
    "sup": dict(runs=150, epochs=205, views=1, pruned=120, note="Sup dense + GMP, 205 epochs, batch 128"),
    "scl": dict(runs=270, epochs=500, views=2, pruned=240, note="SCL stage 1 dense + GMP + dGMP, 500 epochs, 1024 x 2 views"),
    "linear": dict(runs=270, epochs=100, views=1, pruned=0,
                   note="SCL linear head, 100 epochs, batch 256, augmented images through the frozen encoder (forward only)"),
    "finetune": dict(runs=240, epochs=30, views=1, pruned=240, note="One-Shot fine-tunes (Sup and SCL), 30 epochs, batch 128"),
}
# the issue's figures (one H100, earlier code): printed beside ours for orientation, never as our measurements
ISSUE = {
    "bare_fp32_b128": 22826, "bare_bf16_b128": 14799, "bare_bf16_b512": 72284, "loop_fp32_b128": 11489,
    "loop_bf16_b128": 12032, "gmp_every10": 8272, "aug_sup_b128": 29822, "aug_scl_b1024x2": 10971,
    "bare_supcon_bf16": 43724, "authors_w0": 2471, "authors_w8": 18104,
    "packed_bare_bf16_k1": 19265, "packed_bare_bf16_k4": 53986, "packed_bare_bf16_k8": 54801,
}
TARGETS = dict(loop_vs_bare=0.9, gmp_vs_dense=0.95, scl_aug_share=0.15, sup_vs_authors=3.0, grid_hours=30.0,
               grid_hours_stretch=12.0)


# ------------------------------------------------------------------------------------------------ recording
class Recorder:
    """Rows into OUT/results.json (rewritten atomically after every row) and progress lines into OUT/progress.log."""

    def __init__(self, out: Path, budget: float, meta: dict):
        self.out, self.budget, self.t0 = out, budget, time.perf_counter()
        out.mkdir(parents=True, exist_ok=True)
        self.rows: dict = {}
        self.doc = {"meta": meta, "rows": self.rows, "summary": {}}
        self.log_file = open(out / "progress.log", "a", buffering=1)
        self.save()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed()

    def log(self, msg: str):
        line = f"[{self.elapsed():7.1f} s] {msg}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def save(self):
        tmp = self.out / ".results.json.tmp"
        tmp.write_text(json.dumps(self.doc, indent=1, default=_jsonable))
        os.replace(tmp, self.out / "results.json")

    def fits(self, key: str, label: str, est: float) -> bool:
        if self.left() >= est:
            return True
        self.rows[key] = dict(label=label, status="skipped",
                              reason=f"budget: {self.left():.0f} s left of {self.budget:.0f} s, row needs ~{est:.0f} s")
        self.log(f"{key}: skipped ({self.rows[key]['reason']})")
        self.save()
        return False

    def run(self, key: str, label: str, est: float, fn, **info):
        """Run one row if it fits the budget; its result (a dict) or None after an error or a skip."""
        if not self.fits(key, label, est):
            return None
        t = time.perf_counter()
        try:
            r = fn()
        except BaseException as err:  # noqa: BLE001 - one failed row must not lose the others
            if isinstance(err, KeyboardInterrupt):
                raise
            self.rows[key] = dict(label=label, status="error", error=f"{type(err).__name__}: {err}"[:2000],
                                  traceback=traceback.format_exc()[-3000:], wall_s=time.perf_counter() - t, **info)
            self.log(f"{key}: ERROR {type(err).__name__}: {str(err)[:300]}")
            _cleanup()
            self.save()
            return None
        r = {k: v for k, v in r.items() if k not in ("t_start", "t_stop")}  # this process's clock, meaningless later
        self.rows[key] = {"label": label, "status": "ok", "wall_s": time.perf_counter() - t, **info, **r}
        self.log(f"{key}: {describe(r)}  ({label}; {time.perf_counter() - t:.1f} s)")
        _cleanup()
        self.save()
        return r

    def get(self, key: str, field: str = "images_per_s"):
        row = self.rows.get(key)
        return row.get(field) if row and row.get("status") == "ok" else None


def _jsonable(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


def _cleanup():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def describe(r: dict) -> str:
    parts = []
    if "images_per_s" in r:
        parts.append(f"{r['images_per_s']:,.0f} images/s")
    if r.get("views", 1) > 1 and "anchors_per_s" in r:
        parts.append(f"{r['anchors_per_s']:,.0f} anchors/s")
    if "ms_per_step" in r:
        parts.append(f"{r['ms_per_step']:.2f} ms/step")
    if "syncs_per_step" in r:
        parts.append(f"{r['syncs_per_step']:g} host syncs per step at {r['per_step'] or '-'}; once: {r['once_per_run']}")
    for k, fmt in (("steps", "{} steps"), ("warmup_s", "warm-up {:.1f} s"), ("overlap", "overlap {:.2f}")):
        if r.get(k) is not None:
            parts.append(fmt.format(r[k]))
    if "rounds" in r:
        parts.append("rounds " + "/".join(f"{v:,.0f}" for v in r["rounds"]))
    return ", ".join(parts)


# ------------------------------------------------------------------------------------------------ packed processes
def _packed_child(idx: int, spec: dict, data_path: str, barrier, queue):
    """One of K processes sharing the GPU: data onto the GPU, warm-up (compile included), barrier, timed window."""
    try:
        torch.set_num_threads(spec["threads"])
        device = torch.device(spec["device"])
        blob = torch.load(data_path, weights_only=False)
        data = bt.ImageData(blob["name"], [str(c) for c in range(10)], blob["x"], blob["y"], blob["x"][:8], blob["y"][:8])
        dd = bt.on_device(data, device)
        loop = bt.ProjectLoop(dd, spec["kind"], spec["batch"], bf16=spec["bf16"], compile=spec["compile"], seed=idx)
        warm = loop.run(spec["warmup"], steps=spec["warm_steps"])
        barrier.wait(timeout=spec["barrier_timeout"])
        r = loop.run(2, seconds=spec["seconds"], min_steps=2)
        now_wall, now_perf = time.time(), time.perf_counter()
        r.update(idx=idx, warm_total_s=warm["warmup_s"] + warm["seconds"],
                 wall_start=now_wall - (now_perf - r.pop("t_start")), wall_stop=now_wall - (now_perf - r.pop("t_stop")))
        queue.put(r)
    except BaseException as err:  # noqa: BLE001
        try:
            barrier.abort()
        except Exception:
            pass
        queue.put({"idx": idx, "error": f"{type(err).__name__}: {err}"[:1500], "traceback": traceback.format_exc()[-2000:]})


def packed(dd_path: str, device: str, kind: str, k: int, batch: int, bf16: bool, compile: bool, seconds: float,
           warm_steps: int, timeout: float, threads: int) -> dict:
    """Sum over K spawned processes of the project loop's images/s, measured over synchronised windows."""
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(k), ctx.Queue()
    spec = dict(device=device, kind=kind, batch=batch, bf16=bf16, compile=compile, seconds=seconds,
                warmup=2, warm_steps=warm_steps, barrier_timeout=max(timeout - seconds - 5, 10), threads=threads)
    procs = [ctx.Process(target=_packed_child, args=(i, spec, dd_path, barrier, queue), daemon=True) for i in range(k)]
    t = time.perf_counter()
    for p in procs:
        p.start()
    results = []
    try:
        for _ in range(k):
            results.append(queue.get(timeout=max(timeout - (time.perf_counter() - t), 1)))
    except Exception:
        pass
    finally:
        for p in procs:
            p.join(timeout=5)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    errors = [r for r in results if "error" in r]
    if errors or len(results) < k:
        why = errors[0]["error"] if errors else f"{k - len(results)} of {k} processes did not report in {timeout:.0f} s"
        raise RuntimeError(f"packed {kind} K={k}: {why}" + (f"\n{errors[0].get('traceback', '')}" if errors else ""))
    start, stop = max(r["wall_start"] for r in results), min(r["wall_stop"] for r in results)
    mean_window = statistics.mean(r["seconds"] for r in results)
    total = sum(r["images_per_s"] for r in results)
    return dict(images_per_s=total, anchors_per_s=sum(r["anchors_per_s"] for r in results),
                per_process=[round(r["images_per_s"], 1) for r in results], k=k, views=results[0]["views"],
                overlap=max(stop - start, 0) / mean_window, seconds=mean_window,
                warmup_s=max(r["warm_total_s"] for r in results), kind=kind, batch=batch, bf16=bf16, compile=compile)


# ------------------------------------------------------------------------------------------------ sync audit
def sync_audit(dd, kind: str, batch: int, recipe: bool = False, n1: int = 4, n2: int = 12) -> dict:
    """Host synchronisations of the project loop, found by torch.cuda.set_sync_debug_mode("warn"): each
    synchronising CUDA call warns with the Python line that made it. Two runs of n1 and n2 steps (2 warm-up steps
    each, fresh bf16 eager models): what grows with the steps is per step, the rest once per epoch or run (the
    epoch-end checks and logs). The bench's own clock syncs (bench_train.py) are left out."""
    import warnings
    from collections import Counter

    def count(n):
        loop = bt.ProjectLoop(dd, kind, batch, bf16=True, seed=21)
        kw = dict(recipe="gmp", recipe_vars=bt.gmp_vars(2 + n, 500)) if recipe else {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                loop.run(2, n, **kw)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        where = Counter()
        for w in caught:
            path = Path(w.filename)
            if "synchroniz" in str(w.message).lower() and path.name != "bench_train.py":
                where[f"{path.parent.name}/{path.name}:{w.lineno}"] += 1
        return where

    a, b = count(n1), count(n2)
    per_step = {k: round((b[k] - a.get(k, 0)) / (n2 - n1), 2) for k in b if b[k] != a.get(k, 0)}
    once = {k: v for k, v in a.items() if k not in per_step}
    return dict(syncs_per_step=sum(per_step.values()), per_step=per_step, once_per_run=once, steps=[n1, n2],
                kind=kind, batch=batch, gmp=recipe)


# ------------------------------------------------------------------------------------------------ projection
def grid_image_steps() -> dict:
    return {kind: g["runs"] * g["epochs"] * N_TRAIN * g["views"] for kind, g in GRID.items()}


def best_of(rec: Recorder, keys, field="images_per_s"):
    found = [(rec.get(k, field), k) for k in keys if rec.get(k, field)]
    return max(found) if found else (None, None)


def projection(rec: Recorder) -> dict:
    """GPU-hours of the paper grid from the measured per-GPU throughputs (packed when measured, else single)."""
    rows = rec.rows
    singles = ["loop_bf16_b128", "loop_bf16_b128_compiled", "loop_fp32_b128"]  # a single run is packing with K = 1
    sup, sup_key = best_of(rec, [k for k in rows if k.startswith("packed_sup")] + singles)
    sup_single, _ = best_of(rec, singles)
    scl, scl_key = best_of(rec, [k for k in rows if k.startswith("packed_scl")] + ["loop_scl_bf16",
                                                                                   "loop_scl_bf16_compiled"])
    linear, linear_key = best_of(rec, [k for k in rows if k.startswith("packed_linear")])
    linear_note = "packed, measured"
    if linear is None:
        single, linear_key = best_of(rec, ["loop_linear_bf16"])
        k1 = rec.get("packed_sup_k1") or sup_single
        gain = max(sup / k1, 1.0) if (sup and k1 and sup_key and sup_key.startswith("packed")) else 1.0
        linear = single * gain if single else None
        linear_note = f"single-process linear stage x the Sup packing gain {gain:.2f} (estimate)"
    dense, gmp = rec.get("gmp500_dense"), rec.get("gmp500_gmp")
    g = min(1.0, gmp / dense) if dense and gmp else 1.0
    thr = {"sup": sup, "scl": scl, "linear": linear, "finetune": sup}
    src = {"sup": sup_key, "scl": scl_key, "linear": f"{linear_key}: {linear_note}", "finetune": f"{sup_key} (same CE step, batch 128)"}
    steps = grid_image_steps()
    hours, hours_dense_rate, missing = {}, {}, []
    for kind, n in steps.items():
        if not thr[kind]:
            missing.append(kind)
            continue
        frac = GRID[kind]["pruned"] / GRID[kind]["runs"]
        hours_dense_rate[kind] = n / thr[kind] / 3600
        hours[kind] = hours_dense_rate[kind] * ((1 - frac) + frac / g)
    out = dict(image_steps=steps, throughput=thr, source=src, gmp_factor=g, hours=hours,
               hours_dense_rate=hours_dense_rate, missing=missing,
               note="hours: pruned runs' image-steps at throughput x GMP/dense (measured at every 500 steps, Sup, "
                    "applied to SCL and fine-tunes too); hours_dense_rate: all at the dense rate")
    if not missing:
        out["total_gpu_hours"] = sum(hours.values())
        out["total_gpu_hours_dense_rate"] = sum(hours_dense_rate.values())
        out["total_gpu_hours_without_linear"] = sum(v for k, v in hours.items() if k != "linear")
    return out


def targets(rec: Recorder, proj: dict) -> dict:
    def ratio(a, b):
        return a / b if a and b else None

    t = {}
    bare32, bare16 = rec.get("bare_fp32_b128"), rec.get("bare_bf16_b128")
    t["loop_fp32_vs_bare_fp32"] = (ratio(rec.get("loop_fp32_b128"), bare32), ">=", TARGETS["loop_vs_bare"])
    t["loop_bf16_vs_bare_bf16"] = (ratio(rec.get("loop_bf16_b128"), bare16), ">=", TARGETS["loop_vs_bare"])
    t["loop_bf16_compiled_vs_bare_bf16_eager"] = (ratio(rec.get("loop_bf16_b128_compiled"), bare16), ">=",
                                                  TARGETS["loop_vs_bare"])
    t["gmp_vs_dense_every_500"] = (ratio(rec.get("gmp500_gmp"), rec.get("gmp500_dense")), ">=", TARGETS["gmp_vs_dense"])
    aug_ms = rec.get("aug_scl_ours", "ms_per_step")
    supcon = rec.get("bare_supcon_bf16")
    step_ms = 1e3 * rec.rows["aug_scl_ours"]["batch"] * 2 / supcon if aug_ms and supcon else None
    t["scl_aug_share_of_bare_supcon_step"] = (aug_ms / step_ms if step_ms else None, "<=", TARGETS["scl_aug_share"])
    loop_scl = rec.get("loop_scl_bf16")
    if aug_ms and loop_scl:
        t["scl_aug_share_of_project_scl_step"] = (aug_ms / (1e3 * rec.rows["aug_scl_ours"]["batch"] * 2 / loop_scl),
                                                  "<=", TARGETS["scl_aug_share"])
    authors_best = max([v for v in (rec.get("authors_w0"), rec.get("authors_w8")) if v] or [0]) or None
    t["sup_per_gpu_vs_authors_best"] = (ratio(proj["throughput"].get("sup"), authors_best), ">=",
                                        TARGETS["sup_vs_authors"])
    total = proj.get("total_gpu_hours")
    t["grid_gpu_hours"] = (total, "<=", TARGETS["grid_hours"])
    t["grid_gpu_hours_stretch"] = (total, "<=", TARGETS["grid_hours_stretch"])
    out = {}
    for k, (v, op, goal) in t.items():
        ok = None if v is None else (v >= goal if op == ">=" else v <= goal)
        out[k] = dict(value=v, goal=f"{op} {goal}", met=ok)
    return out


def summarise(rec: Recorder):
    try:
        proj = projection(rec)
        rec.doc["summary"] = dict(projection=proj, targets=targets(rec, proj))
    except Exception as err:  # noqa: BLE001
        rec.doc["summary"] = dict(error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-2000:])
    rec.save()


# ------------------------------------------------------------------------------------------------ the run
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for progress.log and results.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny batches and windows (smoke test, e.g. on CPU)")
    ap.add_argument("--budget", type=float, default=280.0, help="seconds for the whole run; rows that would not fit are skipped")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the interleaved core rows")
    ap.add_argument("--seconds", type=float, default=1.5, help="measured window of a single-process row")
    ap.add_argument("--packed-seconds", type=float, default=3.0, help="measured window of each packed process")
    ap.add_argument("--gmp-steps", type=int, default=500, help="measured steps of the GMP pair (one update per 500)")
    ap.add_argument("--data", choices=["auto", "cifar", "random"], default="auto")
    ap.add_argument("--data-root", default=None, help="CIFAR-10 JPEG archive (default: .gpu/, ../shared/data/)")
    ap.add_argument("--skip", default="", help="comma-separated row groups to skip: core,bare512,aug,sync,scl,gmp,authors,"
                                               "packed_sup,linear,packed_scl,compiled,extras")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU visible (use --device cpu --quick for a smoke test)")
    quick = args.quick
    if quick and not cuda:
        # exercise the compiled paths without inductor's C++ compilation on a small CPU
        os.environ.setdefault("WHATISLOST_COMPILE_BACKEND", "aot_eager")
    B = SimpleNamespace(sup=32 if quick else 128, b512=64 if quick else 512, scl=32 if quick else 1024,
                        linear=64 if quick else 256)
    W = SimpleNamespace(eager=1 if quick else 15, compiled=2 if quick else 15, scl=1 if quick else 5)
    secs = 0.2 if quick else args.seconds
    rounds = 1 if quick else args.rounds
    gmp_steps, gmp_every = (6, 5) if quick else (args.gmp_steps, 500)
    gmp_warm = 2 if quick else 20
    packed_ks = (1, 2) if quick else (1, 4, 8)
    packed_secs = 0.5 if quick else args.packed_seconds
    authors_workers = (0, 2) if quick else (0, 8)
    threads_per_child = 1 if not cuda else max(1, (os.cpu_count() or 8) // 8)

    meta = dict(device=torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or platform.machine()}, "
                f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads)",
                date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), torch=torch.__version__,
                cuda=torch.version.cuda, python=platform.python_version(), argv=sys.argv[1:], quick=quick,
                batches=vars(B), compile_backend=os.environ.get("WHATISLOST_COMPILE_BACKEND", "inductor"),
                cudnn_tf32=torch.backends.cudnn.allow_tf32, grid=GRID, issue_figures=ISSUE, targets=TARGETS)
    rec = Recorder(Path(args.out), args.budget if not quick else 1e9, meta)
    rec.log(f"device {meta['device']}, torch {torch.__version__}, CUDA {torch.version.cuda}, budget {args.budget:.0f} s"
            f"{' (quick)' if quick else ''}")

    # data: once, on the GPU; also saved for the packed processes
    t = time.perf_counter()
    data = bt.load_bench_data(args.data, args.data_root, n_random=8192 if quick else 50000)
    dd = bt.on_device(data, device)
    tmp = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    dd_path = str(tmp / "train.pt")
    torch.save(dict(x=data.train_x, y=data.train_y, name=data.name), dd_path)
    rec.doc["meta"]["data"] = f"{data.name}: {len(data.train_x)} training images"
    rec.log(f"data {data.name} ({len(data.train_x)} images) on {device} in {time.perf_counter() - t:.1f} s")

    try:
        _rows(rec, args, skip, device, dd, dd_path, B, W, secs, rounds, gmp_steps, gmp_every, gmp_warm, packed_ks,
              packed_secs, authors_workers, threads_per_child, quick, cuda)
    finally:
        summarise(rec)
        print_report(rec)
        try:
            os.unlink(dd_path)
            tmp.rmdir()
        except OSError:
            pass
    return rec.doc


def _median_rounds(first, again, n: int) -> dict:
    """first() then again() n - 1 times; the first result with images_per_s the median of all and the rounds."""
    res = first()
    rounds = [res["images_per_s"]] + [again()["images_per_s"] for _ in range(n - 1)]
    return {**res, "images_per_s": statistics.median(rounds), "rounds": rounds}


def _rows(rec, args, skip, device, dd, dd_path, B, W, secs, rounds, gmp_steps, gmp_every, gmp_warm, packed_ks,
          packed_secs, authors_workers, threads_per_child, quick, cuda):
    # ---------------- core (eager): interleaved rounds, medians
    if "core" not in skip:
        loops = {}

        def loop(key, **kw):  # one model per configuration, kept across rounds
            if key not in loops:
                loops[key] = bt.ProjectLoop(dd, "ce", B.sup, **kw)
            return loops[key]

        core = [
            ("bare_fp32_b128", "bare step fp32 b128, eager, channels_last", 5,
             lambda: bt.bare_rate(device, "ce", B.sup, False, warmup=W.eager, seconds=secs)),
            ("bare_bf16_b128", "bare step bf16 b128, eager, channels_last", 5,
             lambda: bt.bare_rate(device, "ce", B.sup, True, warmup=W.eager, seconds=secs)),
            ("loop_before_fp32_b128", "project loop fp32 b128, kornia augmentation, eager (before)", 6,
             lambda: loop("kornia", augment="kornia").run(W.eager, seconds=secs)),
            ("loop_fp32_b128", "project loop fp32 b128, whatislost.augment, eager", 5,
             lambda: loop("fp32").run(W.eager, seconds=secs)),
            ("loop_bf16_b128", "project loop bf16 b128, whatislost.augment, eager", 5,
             lambda: loop("bf16", bf16=True).run(W.eager, seconds=secs)),
        ]
        failed = set()
        for r in range(rounds):
            for key, label, est, fn in core:
                if key in failed:
                    continue
                first = rec.rows.get(key, {}).get("rounds")
                if not first and not rec.fits(key, label, est):
                    failed.add(key)
                    continue
                if first and rec.left() < 2 + secs:  # keep the rounds already measured
                    rec.rows[key]["rounds_skipped"] = rec.rows[key].get("rounds_skipped", 0) + 1
                    continue
                t = time.perf_counter()
                try:
                    res = fn()
                except Exception as err:  # noqa: BLE001
                    failed.add(key)
                    rec.rows[key] = dict(label=label, status="error", error=f"{type(err).__name__}: {err}"[:2000],
                                         traceback=traceback.format_exc()[-3000:])
                    rec.log(f"{key}: ERROR {type(err).__name__}: {str(err)[:300]}")
                    _cleanup()
                    rec.save()
                    continue
                row = rec.rows.get(key) if first else None
                if row is None:
                    row = dict(label=label, status="ok", rounds=[],
                               first={k: v for k, v in res.items() if k not in ("t_start", "t_stop")})
                row["rounds"].append(res["images_per_s"])
                row["images_per_s"] = statistics.median(row["rounds"])
                row["warmup_s"] = row["first"]["warmup_s"]
                row["steps_last"] = res["steps"]
                row["epoch_end_s"] = res.get("epoch_end_s")
                rec.rows[key] = row
                rec.log(f"{key} round {r + 1}: {res['images_per_s']:,.0f} images/s ({res['steps']} steps, "
                        f"warm-up {res['warmup_s']:.1f} s; {time.perf_counter() - t:.1f} s)")
                rec.save()
        loops.clear()
        _cleanup()
        summarise(rec)

    # ---------------- bare b512, augmentation alone
    if "bare512" not in skip:
        rec.run("bare_bf16_b512", "bare step bf16 b512, eager, channels_last", 5,
                lambda: bt.bare_rate(device, "ce", B.b512, True, warmup=W.eager, seconds=secs))
    if "aug" not in skip:
        for which in ("ours", "kornia"):
            rec.run(f"aug_sup_{which}", f"Sup augmentation alone b{B.sup} ({which})", 3,
                    lambda which=which: bt.aug_rate(device, "sup", B.sup, 1, which, seconds=min(secs, 0.7)))
        for which in ("ours", "kornia"):
            rec.run(f"aug_scl_{which}", f"SCL augmentation alone b{B.scl} x 2 views ({which})", 4,
                    lambda which=which: bt.aug_rate(device, "scl", B.scl, 2, which, seconds=min(secs, 1.0)))

    # ---------------- where the project loop synchronises with the host (CUDA only)
    if "sync" not in skip:
        for key, kind, batch, gmp in (("sync_sup", "ce", B.sup, False), ("sync_sup_gmp", "ce", B.sup, True),
                                      ("sync_scl", "supcon", min(B.scl, 256), False),
                                      ("sync_linear", "linear", B.linear, False)):
            if not cuda:
                rec.rows[key] = dict(label="sync audit", status="skipped", reason="needs CUDA (sync debug mode)")
                continue
            rec.run(key, f"host syncs per step of the project {kind} loop{' + GMP' if gmp else ''} (sync debug mode)",
                    4, lambda kind=kind, batch=batch, gmp=gmp: sync_audit(dd, kind, batch, gmp))
        rec.save()

    # ---------------- SCL: bare SupCon step, the project SCL loop after / before
    if "scl" not in skip:
        rec.run("bare_supcon_bf16", f"bare SupCon step bf16 b{B.scl} x 2 views, eager", 6,
                lambda: bt.bare_rate(device, "supcon", B.scl, True, warmup=W.scl, seconds=secs, min_steps=3))
        rec.run("loop_scl_bf16", f"project SCL loop (stage 1) bf16 b{B.scl} x 2, whatislost.augment, eager", 7,
                lambda: bt.ProjectLoop(dd, "supcon", B.scl, bf16=True).run(W.scl, seconds=secs, min_steps=3))
        rec.run("loop_scl_before_fp32", f"project SCL loop fp32 b{B.scl} x 2, kornia, eager (before)", 9,
                lambda: bt.ProjectLoop(dd, "supcon", B.scl, augment="kornia").run(2 if not quick else 1, seconds=secs,
                                                                                  min_steps=3))

    # ---------------- GMP at the paper's cadence (fresh bf16 eager models, dense and GMP, same steps)
    if "gmp" not in skip:
        total = gmp_warm + gmp_steps
        gvars = bt.gmp_vars(total, gmp_every)
        est = 2 * (gmp_steps * B.sup / 8000 + 3)
        info = dict(cadence=gmp_every, warmup_steps=gmp_warm,
                    updates_in_window=len([s for s in range(gmp_warm, total) if s % gmp_every == 0]))
        if rec.fits("gmp500_dense", "GMP pair", est):
            rec.run("gmp500_dense", f"project loop bf16 b{B.sup} dense, {gmp_steps} steps (GMP pair)", 0,
                    lambda: bt.ProjectLoop(dd, "ce", B.sup, bf16=True, seed=11).run(gmp_warm, gmp_steps), **info)
            rec.run("gmp500_gmp", f"project loop bf16 b{B.sup} + layer-wise GMP, update every {gmp_every} steps", 0,
                    lambda: bt.ProjectLoop(dd, "ce", B.sup, bf16=True, seed=11).run(
                        gmp_warm, gmp_steps, recipe="gmp", recipe_vars=gvars), **info)

    # ---------------- the authors'-style peer
    if "authors" not in skip:
        for w in authors_workers:
            rec.run(f"authors_w{w}", f"authors'-style loop fp32 b{B.sup}, ImageFolder + PIL, {w} workers, prune masks",
                    12 if w == 0 else 10,
                    lambda w=w: authors_style.measure(device, w, B.sup, warmup=2 if w == 0 else 10,
                                                      seconds=3.0 if not quick else 0.3, min_steps=2,
                                                      archive=args.data_root))
        summarise(rec)

    def run_packed(key, label, kind, k, batch, bf16=True, compile=False, est=None):
        warm = 20 if not quick else 1
        timeout = (150 if compile else 90) if not quick else 240
        rec.run(key, label, est or (12 + packed_secs + (40 if compile else 0)),
                lambda: packed(dd_path, str(device), kind, k, batch, bf16, compile, packed_secs, warm, timeout,
                               threads_per_child))
        summarise(rec)

    # ---------------- packed Sup (eager)
    if "packed_sup" not in skip:
        for k in packed_ks:
            run_packed(f"packed_sup_k{k}", f"{k} processes x project Sup loop bf16 b{B.sup}, eager (sum)", "ce", k, B.sup)

    # ---------------- SCL linear head (single process)
    if "linear" not in skip:
        rec.run("loop_linear_bf16", f"SCL linear-head stage bf16 b{B.linear}, augmented images through the frozen "
                f"encoder, eager", 6, lambda: bt.ProjectLoop(dd, "linear", B.linear, bf16=True).run(W.eager, seconds=secs))
        summarise(rec)

    # ---------------- packed SCL (eager; K=1 is the single-process SCL loop above)
    if "packed_scl" not in skip:
        k = packed_ks[1]
        run_packed(f"packed_scl_k{k}", f"{k} processes x project SCL loop bf16 b{B.scl} x 2, eager (sum)", "supcon", k,
                   B.scl, est=18 + packed_secs)

    # ---------------- compiled (inductor): compile time in warmup_s, then median of rounds
    if "compiled" not in skip:
        cl = {}

        def compiled_sup():
            cl["sup"] = bt.ProjectLoop(dd, "ce", B.sup, bf16=True, compile=True)
            return cl["sup"].run(W.compiled, seconds=secs)

        rec.run("loop_bf16_b128_compiled", "project loop bf16 b128, whatislost.augment, torch.compile (after)", 60,
                lambda: _median_rounds(compiled_sup, lambda: cl["sup"].run(3, seconds=secs), rounds))
        cl.clear()
        summarise(rec)
        rec.run("loop_scl_bf16_compiled", f"project SCL loop bf16 b{B.scl} x 2, torch.compile", 50,
                lambda: bt.ProjectLoop(dd, "supcon", B.scl, bf16=True, compile=True).run(
                    W.scl + 2, seconds=secs, min_steps=3))
        summarise(rec)

    # ---------------- extras, as the budget allows
    if "extras" not in skip:
        def better(a, b):
            return bool(rec.get(a) and rec.get(b) and rec.get(a) > 1.03 * rec.get(b))

        if better("loop_scl_bf16_compiled", "loop_scl_bf16"):
            k = packed_ks[1]
            run_packed(f"packed_scl_compiled_k{k}", f"{k} processes x project SCL loop bf16 b{B.scl} x 2, compiled "
                       f"(sum)", "supcon", k, B.scl, compile=True, est=45 + packed_secs)
        if better("loop_bf16_b128_compiled", "loop_bf16_b128"):
            k = packed_ks[1]
            run_packed(f"packed_sup_compiled_k{k}", f"{k} processes x project Sup loop bf16 b{B.sup}, compiled (sum)",
                       "ce", k, B.sup, compile=True)
        rec.run("bare_supcon_bf16_nosync", f"bare SupCon step bf16 b{B.scl} x 2, loss without the boolean-index sync",
                6, lambda: bt.bare_rate(device, "supcon", B.scl, True, warmup=W.scl, seconds=secs, min_steps=3,
                                        nosync_loss=True))
        every, n10 = (10, 200) if not quick else (2, 4)
        rec.run("gmp_every10", f"project loop bf16 b{B.sup} + GMP, update every {every} steps (the earlier cadence)",
                10, lambda: bt.ProjectLoop(dd, "ce", B.sup, bf16=True, seed=12).run(
                    gmp_warm, n10, recipe="gmp", recipe_vars=bt.gmp_vars(gmp_warm + n10, every)), cadence=every)
        run_packed(f"packed_linear_k{packed_ks[1]}", f"{packed_ks[1]} processes x SCL linear-head stage bf16 "
                   f"b{B.linear}, eager (sum)",
                   "linear", packed_ks[1], B.linear)
        if len(packed_ks) > 2:
            run_packed(f"packed_scl_k{packed_ks[2]}", f"{packed_ks[2]} processes x project SCL loop bf16 b{B.scl} x 2, "
                       f"eager (sum)", "supcon", packed_ks[2], B.scl, est=25 + packed_secs)
        if better("loop_bf16_b128_compiled", "loop_bf16_b128"):
            rec.run("gmp500_gmp_compiled", f"project loop bf16 b{B.sup} compiled + GMP every {gmp_every} steps", 70,
                    lambda: bt.ProjectLoop(dd, "ce", B.sup, bf16=True, compile=True, seed=13).run(
                        gmp_warm, gmp_steps, recipe="gmp", recipe_vars=bt.gmp_vars(gmp_warm + gmp_steps, gmp_every)),
                    cadence=gmp_every)
        rec.run("bare_bf16_b128_compiled", f"bare step bf16 b{B.sup}, torch.compile", 50,
                lambda: bt.bare_rate(device, "ce", B.sup, True, compile=True, warmup=W.compiled, seconds=secs))


# ------------------------------------------------------------------------------------------------ the report
def print_report(rec: Recorder):
    g = rec.get

    def f(v):
        return "-" if v is None else f"{v:,.0f}"

    def ratio(a, b):
        return "-" if not a or not b else f"{a / b:.2f}"

    lines = [
        ("bare step fp32 b128 (eager / compiled)", g("bare_fp32_b128"), None, ISSUE["bare_fp32_b128"]),
        ("bare step bf16 b128 (eager / compiled)", g("bare_bf16_b128"), g("bare_bf16_b128_compiled"), ISSUE["bare_bf16_b128"]),
        ("bare step bf16 b512", g("bare_bf16_b512"), None, ISSUE["bare_bf16_b512"]),
        ("project loop fp32 b128 (kornia / ours)", g("loop_before_fp32_b128"), g("loop_fp32_b128"), ISSUE["loop_fp32_b128"]),
        ("project loop b128 (fp32 kornia / bf16 ours)", g("loop_before_fp32_b128"), g("loop_bf16_b128"), ISSUE["loop_bf16_b128"]),
        ("project loop b128 (fp32 kornia / bf16 compiled)", g("loop_before_fp32_b128"), g("loop_bf16_b128_compiled"), None),
        ("project loop bf16 b128 (eager / compiled)", g("loop_bf16_b128"), g("loop_bf16_b128_compiled"), None),
        ("loop + GMP (every 10 / every 500 steps)", g("gmp_every10"), g("gmp500_gmp"), ISSUE["gmp_every10"]),
        ("  its dense twin (every-500 pair)", None, g("gmp500_dense"), None),
        ("Sup augmentation alone b128 (kornia / ours)", g("aug_sup_kornia", "anchors_per_s"), g("aug_sup_ours", "anchors_per_s"),
         ISSUE["aug_sup_b128"]),
        ("SCL augmentation b1024x2, anchors/s (kornia / ours)", g("aug_scl_kornia", "anchors_per_s"),
         g("aug_scl_ours", "anchors_per_s"), ISSUE["aug_scl_b1024x2"]),
        ("bare SupCon step bf16 b1024x2, views/s (loss as is / no sync)", g("bare_supcon_bf16"), g("bare_supcon_bf16_nosync"),
         ISSUE["bare_supcon_bf16"]),
        ("project SCL loop views/s (fp32 kornia / bf16 ours)", g("loop_scl_before_fp32"), g("loop_scl_bf16"), None),
        ("project SCL loop views/s (bf16 eager / compiled)", g("loop_scl_bf16"), g("loop_scl_bf16_compiled"), None),
        ("SCL linear-head stage b256 (single / K packed)", g("loop_linear_bf16"),
         best_of(rec, [k for k in rec.rows if k.startswith("packed_linear")])[0], None),
        ("authors'-style peer (0 / 8 workers)", g("authors_w0"), g("authors_w8"), ISSUE["authors_w0"]),
    ]
    ks = sorted({int(k.rsplit("_k", 1)[1]) for k in rec.rows if k.startswith("packed_sup_k")})
    for k in ks:
        lines.append((f"packed Sup loop, {k} processes (sum; issue: bare bf16)", g("packed_sup_k1"), g(f"packed_sup_k{k}"),
                      ISSUE.get(f"packed_bare_bf16_k{k}")))
    for key in sorted(k for k in rec.rows if k.startswith("packed_scl_k") or k.startswith("packed_sup_compiled")):
        lines.append((f"{key} (sum, views/s for SCL)", None, g(key), None))
    print("\n" + "=" * 118)
    print(f"{rec.doc['meta']['device']}, torch {rec.doc['meta']['torch']}, {rec.doc['meta']['date']}, "
          f"{rec.doc['meta'].get('data', '')}; images/s unless noted")
    print(f"{'row':62s} {'before':>10s} {'after':>10s} {'after/before':>12s} {'issue (earlier)':>16s}")
    for name, before, after, issue in lines:
        print(f"{name:62s} {f(before):>10s} {f(after):>10s} {ratio(after, before):>12s} {f(issue):>16s}")
    audits = [(k, r) for k, r in rec.rows.items() if k.startswith("sync_") and r.get("status") == "ok"]
    if audits:
        print("\nhost syncs per step of the project loops (where; once per run):")
        for k, r in audits:
            print(f"  {k:14s} {r['syncs_per_step']:5g}  {r['per_step'] or '-'};  once: {r['once_per_run'] or '-'}")
    summary = rec.doc.get("summary", {})
    print("\ntargets:")
    for k, t in summary.get("targets", {}).items():
        v = t["value"]
        mark = {True: "PASS", False: "MISS", None: "n/a"}[t["met"]]
        print(f"  {k:45s} {('-' if v is None else f'{v:.3f}'):>10s}  goal {t['goal']:10s} {mark}")
    proj = summary.get("projection", {})
    if proj:
        print("\nprojection (image-steps / per-GPU images/s):")
        for kind, n in proj["image_steps"].items():
            thr = proj["throughput"].get(kind)
            hrs = proj["hours"].get(kind)
            print(f"  {kind:9s} {n:.3e} image-steps at {f(thr):>8s}/s ({proj['source'].get(kind)}) -> "
                  f"{'-' if hrs is None else f'{hrs:.1f}'} GPU-hours")
        print(f"  GMP/dense factor applied to pruned runs: {proj['gmp_factor']:.3f}")
        if "total_gpu_hours" in proj:
            print(f"  total {proj['total_gpu_hours']:.1f} GPU-hours (all at dense rates: "
                  f"{proj['total_gpu_hours_dense_rate']:.1f}; without the linear head: "
                  f"{proj['total_gpu_hours_without_linear']:.1f})")
            day = rec.doc["meta"]["date"][:10]
            print(f"\npaper grid projected: {proj['total_gpu_hours']:.0f} GPU-hours ({rec.doc['meta']['device']}, {day})")
        else:
            print(f"  incomplete: no throughput for {', '.join(proj['missing'])}")
    bad = [k for k, r in rec.rows.items() if r.get("status") != "ok"]
    if bad:
        listed = ", ".join(k + " (" + rec.rows[k]["status"] + ")" for k in bad)
        print(f"\nnot measured: {listed}")
    print(f"results: {rec.out / 'results.json'}")


if __name__ == "__main__":
    main()
