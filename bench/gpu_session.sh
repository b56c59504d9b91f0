#!/usr/bin/env bash
# bench/gpu_session.sh - the one script to run on the lent GPU machine (H100/H200), from the checkout root.
#
# Only the checkout travels (tracked + untracked-not-ignored files, plus git-ignored paths named in `carry`,
# 64 MiB in all). Before the device call, on this machine, once per checkout (.gpu/ is git-ignored, ~31 MB):
#
#     mkdir -p .gpu && cp -r ../shared/device-kit ../shared/data/cifar10-jpeg.tar.gz .gpu/
#
# The device call (device tool `run`):   command: bash bench/gpu_session.sh   carry: [".gpu"]   timeout_s: 540
#
# What it does, each step fail-soft (its exit status and seconds are logged to steps.tsv; later steps still run):
#   kit       install .gpu/device-kit's wheels (sparseml, kornia, ...) into /tmp/site and export PYTHONPATH as
#             the kit's setup.sh prints it (kit folder first for its sitecustomize shim, then /tmp/site, then $PWD)
#   versions  python, torch, CUDA, the GPU (nvidia-smi queries only; the card's settings are never touched)
#   bench     python3 bench/bench_gpu.py --out $OUT/bench --budget $BENCH_BUDGET (rows beyond the budget are
#             skipped; hard limit BENCH_BUDGET + 90 s, for a last row that overruns its estimate)
#   paper     HOOK, off unless STEPS names it: short paper-settings Sup / SCL runs (see hook_paper below)
#   study     HOOK, off unless STEPS names it: a reduced CIFAR study (see hook_study below)
#
# What comes back under $OUT (the tool returns at most 8 files, at most 2 folders down):
#   session.log          everything printed, steps.tsv (step, exit status, seconds)
#   bench/results.json   all rows, the projection and the targets (rewritten after every row: a timeout keeps them)
#   bench/progress.log   bench_gpu.py's progress lines
#   paper/, study/       what the hooks copy there (keep it to 2 files together)
#
# Time: kit ~15 s + versions ~5 s + bench <= BENCH_BUDGET (default 280) + ~30 s overrun/report = ~5.5 min (at
# most 280 + 90 s for the bench); the
# hooks add PAPER_LIMIT / STUDY_LIMIT. Keep the total under ~8 min (the script warns when the limits add up to more).
#
# Environment knobs:
#   STEPS="kit versions bench"   steps to run, in this order (add "paper" / "study" for the hooks)
#   BENCH_BUDGET=280             seconds bench_gpu.py plans for
#   BENCH_ARGS=""                more bench_gpu.py arguments, e.g. "--skip extras" or "--rounds 2"
#   PAPER_LIMIT=120 STUDY_LIMIT=150   hard limits of the hooks, in seconds
#   PYTHON=python3               the interpreter (the image's python3 holds torch)
#   GPU_SESSION_DRY=1            a local dry run without a GPU: no kit, bench_gpu.py --device cpu --quick
set -u

OUT="${OUT:-/tmp/gpu-session-out}"
mkdir -p "$OUT"
LOG="$OUT/session.log"
STEPS_TSV="$OUT/steps.tsv"
PY="${PYTHON:-python3}"
STEPS="${STEPS:-kit versions bench}"
BENCH_BUDGET="${BENCH_BUDGET:-280}"
BENCH_ARGS="${BENCH_ARGS:-}"
PAPER_LIMIT="${PAPER_LIMIT:-120}"
STUDY_LIMIT="${STUDY_LIMIT:-150}"
DRY="${GPU_SESSION_DRY:-0}"
KIT="$PWD/.gpu/device-kit"
ARCHIVE="$PWD/.gpu/cifar10-jpeg.tar.gz"
export NM_DISABLE_ANALYTICS=1 PYTHONUNBUFFERED=1
T_SESSION=$(date +%s)

say() { echo "[gpu_session $(date -u +%H:%M:%S), +$(( $(date +%s) - T_SESSION )) s] $*" | tee -a "$LOG"; }
printf 'step\texit\tseconds\n' > "$STEPS_TSV"

# step NAME LIMIT_S CMD...: run CMD under a hard time limit, output into the log, exit status into steps.tsv
step() {
    local name="$1" limit="$2"
    shift 2
    say "step $name: start (limit ${limit} s): $*"
    local t0 rc
    t0=$(date +%s)
    timeout -k 15 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$STEPS_TSV"
    if [ "$rc" = 0 ]; then say "step $name: ok"; elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        say "step $name: TIMED OUT after ${limit} s (exit $rc)"; else say "step $name: FAILED (exit $rc)"; fi
    return 0
}

wants() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

total=$(( 20 + BENCH_BUDGET + 90 ))
wants paper && total=$(( total + PAPER_LIMIT ))
wants study && total=$(( total + STUDY_LIMIT ))
say "checkout $PWD; OUT=$OUT; steps: $STEPS; planned at most ~${total} s"
[ "$total" -gt 480 ] && say "WARNING: the step limits add up to ${total} s, more than ~8 min of device time"

# ---------------------------------------------------------------- kit (in this shell: it exports PYTHONPATH)
if wants kit && [ "$DRY" != 1 ]; then
    t0=$(date +%s)
    if [ -f "$KIT/setup.sh" ]; then
        say "step kit: installing $KIT/wheels into /tmp/site"
        kit_env=$(timeout -k 10 120 bash "$KIT/setup.sh" 2>>"$LOG")
        rc=$?
        if [ "$rc" = 0 ] && [ -n "$kit_env" ]; then
            eval "$kit_env"
            say "step kit: ok; $kit_env"
        else
            say "step kit: FAILED (exit $rc); continuing with PYTHONPATH=\$PWD (rows needing sparseml/kornia will fail)"
            export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
        fi
    else
        rc=missing
        say "step kit: no $KIT (carry .gpu, see the top of this script); continuing with PYTHONPATH=\$PWD"
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
    printf '%s\t%s\t%s\n' kit "$rc" "$(( $(date +%s) - t0 ))" >> "$STEPS_TSV"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

# ---------------------------------------------------------------- versions
if wants versions; then
    step versions 60 "$PY" -c '
import platform, sys, torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(0), f"{p.total_memory / 2**30:.0f} GiB", p.multi_processor_count, "SMs")
else:
    print("device: no CUDA GPU visible")
for name in ("torchvision", "kornia", "sparseml", "triton", "numpy", "PIL"):
    try:
        m = __import__(name)
        print(name, getattr(m, "__version__", "?"))
    except Exception as err:
        print(name, "MISSING:", type(err).__name__, str(err)[:200])
import whatislost
print("whatislost from", whatislost.__file__)
'
    if command -v nvidia-smi >/dev/null 2>&1; then
        step nvidia-smi 20 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,temperature.gpu,utilization.gpu --format=csv
    fi
    step cpus 10 bash -c 'echo "$(nproc) CPUs; $(free -g | awk "/Mem/{print \$2}") GiB RAM"; uptime'
fi

# ---------------------------------------------------------------- bench
if wants bench; then
    data_args=()
    [ -f "$ARCHIVE" ] && data_args=(--data-root "$ARCHIVE")
    if [ "$DRY" = 1 ]; then
        # shellcheck disable=SC2086
        step bench $(( BENCH_BUDGET + 600 )) "$PY" bench/bench_gpu.py --device cpu --quick --out "$OUT/bench" \
            "${data_args[@]}" $BENCH_ARGS
    else
        # shellcheck disable=SC2086
        step bench $(( BENCH_BUDGET + 90 )) "$PY" bench/bench_gpu.py --out "$OUT/bench" --budget "$BENCH_BUDGET" \
            "${data_args[@]}" $BENCH_ARGS
    fi
fi

# ---------------------------------------------------------------- hook: short paper-settings runs (issue: paper fidelity)
hook_paper() {
    # Dense Sup and SCL, one seed, with the paper's settings scaled to a few epochs (examples/cifar10_reduced.yaml:
    # Sup lr 1.0 multistep b128, SCL b1024 x 2 lr 0.05 cosine T 0.5 base T 0.07, augmented head), next to the same
    # runs with the earlier settings (Sup lr 0.05 cosine, no SupCon factor, no vertical flip, head on features).
    # Per-epoch figures: every run's metrics.csv, concatenated into one file.
    W=/tmp/paper; mkdir -p "$W" "$OUT/paper"
    common=(examples/cifar10_reduced.yaml --no-eval --runs-per-gpu 4 "methods={}" "sparsities=[0]" seeds=1
            train.data_root="$ARCHIVE")
    "$PY" -m whatislost.study "${common[@]}" --out "$W/paper" &
    "$PY" -m whatislost.study "${common[@]}" --out "$W/before" losses.ce.lr=0.05 losses.ce.lr_schedule=cosine \
        losses.supcon.base_temperature=null losses.supcon.lr_schedule=cosine losses.supcon.lr_min=0 \
        losses.supcon.weight_decay=5e-4 losses.supcon.linear_augment=false losses.supcon.linear_lr_schedule=cosine \
        train.vflip=false &
    wait $(jobs -p)
    for f in "$W"/*/runs/*/dense/s0/seed0/metrics.csv; do
        echo "# $f"; cat "$f"
    done > "$OUT/paper/metrics.csv"
    grep -h "" "$W"/*/runs.csv > "$OUT/paper/runs.csv"
}
if wants paper; then
    step paper "$PAPER_LIMIT" bash -c "OUT='$OUT' ARCHIVE='$ARCHIVE' PY='$PY'; $(declare -f hook_paper); hook_paper"
fi

# ---------------------------------------------------------------- hook: the reduced CIFAR study (issue: the paper's findings)
hook_study() {
    # examples/cifar10_reduced.yaml in one command: 35 runs packed 4 per GPU, then the eval (acc, PIEs, Q-Score,
    # depth on 2 models per population) and the report. Needs a session of its own: STEPS="kit versions study"
    # STUDY_LIMIT=600 (the bench alone takes ~6 of the 15 device minutes).
    W=/tmp/study; mkdir -p "$OUT/study"
    /usr/bin/time -v "$PY" -m whatislost.study examples/cifar10_reduced.yaml --out "$W" --runs-per-gpu 4 \
        train.data_root="$ARCHIVE" > "$OUT/study/study.log" 2>&1
    cp "$W/eval/tables/table1.md" "$W/eval/tables/populations.csv" "$OUT/study/" 2>/dev/null
    tail -40 "$OUT/study/study.log"
}
if wants study; then
    step study "$STUDY_LIMIT" bash -c "OUT='$OUT' ARCHIVE='$ARCHIVE' PY='$PY'; $(declare -f hook_study); hook_study"
fi

say "session done in $(( $(date +%s) - T_SESSION )) s; steps:"
if command -v column >/dev/null 2>&1; then column -t -s $'\t' "$STEPS_TSV" | tee -a "$LOG"; else cat "$STEPS_TSV"; fi
# the short summary last (the device tool returns the end of the output)
if [ -f "$OUT/bench/results.json" ]; then
    grep -h "paper grid projected" "$LOG" | tail -1
fi
exit 0
