"""Benchmark: batched torch k-NN (whatislost.metrics.knn_predict) vs scikit-learn, for prediction depth.

Workload: prediction depth of --queries test samples against --refs training
samples at --probes probes of --dim features, k=30 Euclidean majority vote, i.e.
one k-NN classification per probe. Synthetic data: 10 Gaussian classes whose
centres separate more at later probes, float32, seeded, so both sides see the same
arrays and distance ties do not occur.

scikit-learn side: KNeighborsClassifier(n_neighbors=k, weights='uniform',
algorithm='brute', n_jobs=--sklearn-jobs) fit + predict per probe (n_jobs default
None; in scikit-learn >= 1.1 brute-force Euclidean queries run on the OpenMP
pool, which uses every core whatever n_jobs says).

Each side runs in its own worker process, so that memory figures are its own;
the two workers take turns probe by probe (torch, sklearn, torch, ...), so that
load from other jobs on a shared machine falls on both alike. Times are
wall-clock seconds per probe (k-NN fit + predict; on cuda including the copies
to and from the GPU), the minimum over --repeat runs; "cpu-s" is the CPU time
(all threads) of that run, less sensitive to other jobs on a shared machine.
Memory, per process:
    peak RSS       = the worker's peak resident set size at the end (Linux VmHWM;
                     includes Python, the torch or sklearn import and the input
                     arrays of all probes);
    peak over base = that peak minus the peak just before the first k-NN call,
                     i.e. the extra high-water mark the k-NN work adds on top of
                     the imports and the already-built inputs.
On --device cuda the torch side also reports torch.cuda.max_memory_allocated.

Usage:
    python bench/bench_knn.py                 # 10,000 x 50,000 x 128, 8 probes
    python bench/bench_knn.py --quick         # smoke run
    python bench/bench_knn.py --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

K = 30
NUM_CLASSES = 10


def make_probe(seed: int, probe: int, num_probes: int, n_refs: int, n_queries: int, dim: int):
    """Seeded synthetic representations of one probe: (refs, ref_labels, queries, query_labels)."""
    rng = np.random.default_rng([seed, probe])
    centres = rng.standard_normal((NUM_CLASSES, dim)).astype(np.float32)
    # separation grows with depth, so later probes classify better and depths spread out
    scale = np.float32(0.05 + 0.45 * probe / max(1, num_probes - 1))
    rng_labels = np.random.default_rng([seed, 10_000])  # labels shared by every probe
    ref_labels = rng_labels.integers(0, NUM_CLASSES, n_refs)
    query_labels = rng_labels.integers(0, NUM_CLASSES, n_queries)
    refs = scale * centres[ref_labels] + rng.standard_normal((n_refs, dim), dtype=np.float32)
    queries = scale * centres[query_labels] + rng.standard_normal((n_queries, dim), dtype=np.float32)
    return refs, ref_labels, queries, query_labels


def maxrss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes.

    Linux: VmHWM from /proc/self/status, the high-water mark of this address space
    (unlike ru_maxrss, it does not inherit the parent's peak across fork + exec).
    Elsewhere: ru_maxrss.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if platform.system() == "Darwin" else rss * 1024


class Side:
    """One side of the comparison; lives in its own worker process."""

    def __init__(self, args):
        self.args = args
        self.probes = [make_probe(args.seed, p, args.probes, args.refs, args.queries, args.dim)
                       for p in range(args.probes)]
        self.info = {"side": args.worker}
        if args.worker == "torch":
            import torch

            from whatislost.metrics import _auto_chunk, knn_predict

            self.torch, self.knn_predict = torch, knn_predict
            self.tensors = [(torch.from_numpy(r), torch.from_numpy(rl), torch.from_numpy(q))
                            for r, rl, q, _ in self.probes]
            self.chunk = args.chunk_size or _auto_chunk(args.refs, args.block_mb * 2**20, 4)
            self.info.update(threads=torch.get_num_threads(), chunk_size=self.chunk)
            if args.device == "cuda":
                r, rl, q = self.tensors[0]
                knn_predict(r[:2 * K], rl[:2 * K], q[:4], k=K, device="cuda")  # context + kernels, untimed
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
        else:
            from sklearn.neighbors import KNeighborsClassifier

            self.knn_cls = KNeighborsClassifier
        self.preds = [None] * args.probes
        self.info["base_rss"] = maxrss_bytes()

    def run(self, p: int) -> dict:
        t0, c0 = time.perf_counter(), time.process_time()
        if self.args.worker == "torch":
            refs, ref_labels, queries = self.tensors[p]
            pred = self.knn_predict(refs, ref_labels, queries, k=K, num_classes=NUM_CLASSES,
                                    chunk_size=self.chunk, device=self.args.device).numpy()
        else:
            refs, ref_labels, queries, _ = self.probes[p]
            clf = self.knn_cls(n_neighbors=K, weights="uniform", algorithm="brute", n_jobs=self.args.sklearn_jobs)
            pred = clf.fit(refs, ref_labels).predict(queries)
        timing = {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}
        self.preds[p] = pred
        return timing

    def finish(self) -> dict:
        np.save(self.args.out, np.stack(self.preds))
        self.info["peak_rss"] = maxrss_bytes()
        if self.args.worker == "torch" and self.args.device == "cuda":
            self.info["cuda_peak_bytes"] = int(self.torch.cuda.max_memory_allocated())
        return self.info


def worker(args) -> None:
    """Serve "run P" / "finish" lines on stdin, answer one JSON line each on stdout."""
    side = Side(args)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "run":
            print(json.dumps(side.run(int(cmd[1]))), flush=True)
        elif cmd[0] == "finish":
            print(json.dumps(side.finish()), flush=True)
            return


class WorkerProc:
    def __init__(self, side: str, args, out: str):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", side, "--out", out,
               "--queries", str(args.queries), "--refs", str(args.refs), "--probes", str(args.probes),
               "--dim", str(args.dim), "--seed", str(args.seed), "--device", args.device,
               "--block-mb", str(args.block_mb), "--chunk-size", str(args.chunk_size or 0)]
        if args.sklearn_jobs is not None:
            cmd += ["--sklearn-jobs", str(args.sklearn_jobs)]
        env = dict(os.environ)
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
        self.side = side
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.ask(None)

    def ask(self, line):
        if line is not None:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        if not reply:
            self.proc.wait()
            sys.exit(f"{self.side} worker died (exit {self.proc.returncode})")
        return json.loads(reply)

    def close(self) -> dict:
        info = self.ask("finish")
        self.proc.wait()
        return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--refs", type=int, default=50_000)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--block-mb", type=int, default=256, help="distance-block budget of the torch side")
    ap.add_argument("--chunk-size", type=int, default=0, help="queries per block (0: from --block-mb)")
    ap.add_argument("--sklearn-jobs", type=int, default=None, help="KNeighborsClassifier n_jobs (default None)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per probe and side; the minimum is reported")
    ap.add_argument("--skip-sklearn", action="store_true")
    ap.add_argument("--worker", choices=["torch", "sklearn"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.queries, args.refs, args.probes, args.dim = 500, 3000, 3, 32
    if args.worker:
        worker(args)
        return

    print(f"queries={args.queries} refs={args.refs} probes={args.probes} dim={args.dim} k={K} "
          f"device={args.device} cpu_count={os.cpu_count()} date={time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    load_before = os.getloadavg()
    times = {"torch": [[] for _ in range(args.probes)], "sklearn": [[] for _ in range(args.probes)]}
    with tempfile.TemporaryDirectory() as tmp:
        # both workers stay alive and take turns probe by probe, so background load
        # on a shared machine falls on both sides alike; memory stays per process.
        sides = {"torch": WorkerProc("torch", args, os.path.join(tmp, "torch.npy"))}
        if not args.skip_sklearn:
            sides["sklearn"] = WorkerProc("sklearn", args, os.path.join(tmp, "sklearn.npy"))
        for p in range(args.probes):
            for _ in range(args.repeat):
                for name, w in sides.items():
                    reply = w.ask(f"run {p}")
                    times[name][p].append((reply["seconds"], reply["cpu_seconds"]))
        ours = sides["torch"].close()
        ours_preds = np.load(os.path.join(tmp, "torch.npy"))
        theirs = None
        if "sklearn" in sides:
            theirs = sides["sklearn"].close()
            theirs_preds = np.load(os.path.join(tmp, "sklearn.npy"))
    ours["seconds"] = [min(t)[0] for t in times["torch"]]
    ours["cpu_seconds"] = [min(t)[1] for t in times["torch"]]  # CPU time of the fastest run
    if theirs:
        theirs["seconds"] = [min(t)[0] for t in times["sklearn"]]
        theirs["cpu_seconds"] = [min(t)[1] for t in times["sklearn"]]
    # torch only now, after the workers are gone: keeps the parent small while they run
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import torch

    from whatislost.metrics import depth_from_probe_predictions

    query_labels = make_probe(args.seed, 0, args.probes, args.refs, args.queries, args.dim)[3]
    depth = depth_from_probe_predictions(torch.from_numpy(ours_preds), torch.from_numpy(query_labels))

    chunk = min(ours["chunk_size"], args.queries)
    print(f"torch: threads={ours['threads']} chunk_size={chunk} queries/block "
          f"(block {chunk * args.refs * 4 / 2**20:.0f} MiB); sklearn n_jobs={args.sklearn_jobs}")
    print(f"{'probe':>5} {'torch s':>9} {'sklearn s':>10} {'ratio':>7} {'mismatches':>10}"
          f" {'torch cpu-s':>12} {'sklearn cpu-s':>14}")
    for p in range(args.probes):
        t, tc = ours["seconds"][p], ours["cpu_seconds"][p]
        if theirs:
            s, sc = theirs["seconds"][p], theirs["cpu_seconds"][p]
            mism = int((ours_preds[p] != theirs_preds[p]).sum())
            print(f"{p:>5} {t:>9.3f} {s:>10.3f} {s / t:>7.2f} {mism:>10} {tc:>12.3f} {sc:>14.3f}")
        else:
            print(f"{p:>5} {t:>9.3f} {'':>10} {'':>7} {'':>10} {tc:>12.3f}")
    total_t = sum(ours["seconds"])
    line = f"total torch {total_t:.2f} s"
    if theirs:
        total_s = sum(theirs["seconds"])
        mism = int((ours_preds != theirs_preds).sum())
        line += (f", sklearn {total_s:.2f} s, ratio sklearn/torch {total_s / total_t:.2f}; "
                 f"predictions identical: {mism == 0} ({mism} mismatches of {ours_preds.size})")
    print(line)
    print(f"prediction depth (authors' convention, reference = true label): mean {float(depth.double().mean()):.3f}, "
          f"histogram {torch.bincount(depth, minlength=args.probes + 1)[1:].tolist()}")
    print(f"load average (1 min) before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}; "
          f"seconds are the min over {args.repeat} run(s) per probe")
    mib = 2**20
    print(f"torch   peak RSS {ours['peak_rss'] / mib:.0f} MiB, over pre-kNN base {(ours['peak_rss'] - ours['base_rss']) / mib:.0f} MiB")
    if theirs:
        print(f"sklearn peak RSS {theirs['peak_rss'] / mib:.0f} MiB, over pre-kNN base {(theirs['peak_rss'] - theirs['base_rss']) / mib:.0f} MiB")
    if "cuda_peak_bytes" in ours:
        print(f"torch CUDA max_memory_allocated {ours['cuda_peak_bytes'] / mib:.0f} MiB")


if __name__ == "__main__":
    main()
