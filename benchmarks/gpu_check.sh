#!/usr/bin/env bash
# The GPU path end to end on one lent GPU, in under 5 minutes (issue 20). Every step has a time limit, cut to what is
# left of the whole budget; each step's output, a short text log (gpu_check.log) and JSON land under $OUT, for
# benchmarks/results/gpu/.
#
#   bash benchmarks/gpu_check.sh                  # on the GPU machine, with its own python3
#   DRY_RUN=1 bash benchmarks/gpu_check.sh        # anywhere (also: --cpu): the same steps on the CPU, cpu and gloo
#
# The GPU machine reaches no package registry: what it lacks comes from .whl/ (git-ignored, ~52 MB), filled with
#   pip download mpich==5.0.2 --python-version 3.12 --only-binary :all: --platform manylinux_2_28_x86_64 -d .whl
#   pip download numpy tqdm matplotlib pytest-timeout pytest-mpi --python-version 3.12 --only-binary :all: \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl
#   rm .whl/pytest-[0-9]* .whl/pluggy-* .whl/iniconfig-* .whl/pygments-*    # the machine has pytest
# (with --platform manylinux2014_x86_64 alone, pip finds only mpich 0.0.0, an empty placeholder). Only what this
# python lacks is installed; the project itself runs from PYTHONPATH.
#
# Steps: 0 install what is missing, report torch, CUDA, NCCL, GPU and MPI; 1 the device and tile unit tests, then
# the CUDA tests (pytest -m cuda): collectives on CUDA tensors against float64 (nccl at 1 rank, mpi and gloo at 2),
# DDP against torch's DDP, ZeRO-Offload against AdamW, `torchrun --nproc-per-node 1 -m distrib.train --device cuda
# --backend nccl` and `mpiexec -n 2 ... --device cuda --backend mpi` checked to learn; 2 the allreduce benchmark's
# nccl rows at 1 rank; 3 ZeRO-Offload against AdamW on the GPU, ~1e9 parameters, bf16 (PARAMS=... to change).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DRY=${DRY_RUN:-0}
[ "${1:-}" = "--cpu" ] && DRY=1
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/distrib-gpu-check}
PREFIX=${PREFIX:-/tmp/distrib-gpu-prefix}  # mpich's bin/ and lib/, and the Python packages this python lacks
BUDGET=${BUDGET_S:-285}
SCALE=${TIME_SCALE:-1}  # every step's limit times this: for a dry run on a busy machine (with a larger BUDGET_S)
if [ "$DRY" = 1 ]; then
    DEVICE=cpu NCCL=gloo PARAMS=${PARAMS:-2e6}
else
    DEVICE=cuda NCCL=nccl PARAMS=${PARAMS:-1e9}
fi
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
STEPS=$OUT/steps.jsonl
: >"$LOG"
: >"$STEPS"
START=$SECONDS

say() { echo "$*" | tee -a "$LOG"; }

# step NAME LIMIT COMMAND...: run it under a timeout cut to what is left, keep its output, log how it ended.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    limit=$((limit * SCALE))
    if [ "$left" -lt 20 ]; then
        say "[$name] skipped: ${left} s left of the ${BUDGET} s budget"
        echo "{\"step\": \"$name\", \"status\": \"skipped\", \"seconds\": 0}" >>"$STEPS"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    say "[$name] $* (limit ${limit} s)"
    local began=$SECONDS rc status
    timeout -k 10 "$limit" "$@" >"$OUT/$name.out" 2>&1
    rc=$?
    case $rc in 0) status=passed ;; 124 | 137) status="timed out" ;; *) status="failed ($rc)" ;; esac
    tail -n 25 "$OUT/$name.out" | awk '{ print "    " $0 }' >>"$LOG"  # awk ends an unfinished last line
    say "[$name] $status after $((SECONDS - began)) s"
    echo "{\"step\": \"$name\", \"status\": \"$status\", \"rc\": $rc, \"seconds\": $((SECONDS - began))}" >>"$STEPS"
}

# 0. What this machine has, and what it lacks from .whl/.
install() {
    set -e
    local mpich
    mpich=$(ls .whl/mpich-*.whl | head -n 1)
    "$PY" -m pip install -q --no-index --no-deps --ignore-installed --prefix "$PREFIX/mpich" "$mpich"
    local wheels=() forced=${FORCE_WHEELS:-}
    [ "$DRY" = 1 ] && forced="tqdm $forced"  # the dry run proves the path of a package the machine lacks
    for module in numpy tqdm matplotlib pytest_timeout pytest_mpi; do
        if [[ " $forced " != *" $module "* ]] && "$PY" -c "import $module" 2>/dev/null; then continue; fi
        case $module in
        matplotlib) wheels+=(.whl/matplotlib-* .whl/contourpy-* .whl/cycler-* .whl/fonttools-* .whl/kiwisolver-*
            .whl/packaging-* .whl/pillow-* .whl/pyparsing-* .whl/python_dateutil-* .whl/tzdata-*)
            "$PY" -c "import numpy, sys; sys.exit(int(numpy.__version__.split('.')[0]) < 2)" 2>/dev/null ||
                wheels+=(.whl/numpy-*) ;;  # contourpy's wheel needs numpy 2
        *) wheels+=(.whl/"${module}"-*) ;;
        esac
    done
    if [ "${#wheels[@]}" -gt 0 ]; then
        echo "installing what this python lacks: ${wheels[*]}"
        "$PY" -m pip install -q --no-index --no-deps --target "$PREFIX/site" "${wheels[@]}"
    fi
    local lib
    lib=$(find "$PREFIX/mpich" -name libmpi.so.12 | head -n 1)
    [ -n "$lib" ] || { echo "the mpich wheel left no libmpi.so.12 under $PREFIX/mpich"; exit 1; }
    echo "MPI library: $lib"
}
rm -rf "$PREFIX"
say "gpu_check $(date -Iseconds) on $(hostname): device $DEVICE, budget ${BUDGET} s, output in $OUT"
export -f install
export DRY PY PREFIX
step install 90 bash -c install
LIBMPI=$(find "$PREFIX/mpich" -name libmpi.so.12 2>/dev/null | head -n 1)
MPIBIN=$(dirname "$(find "$PREFIX/mpich" -name mpiexec -type f 2>/dev/null | head -n 1)")
export PATH="$MPIBIN:$PATH" LD_LIBRARY_PATH="$(dirname "$LIBMPI"):${LD_LIBRARY_PATH:-}" MPI4PY_LIBMPI="$LIBMPI"
export PYTHONPATH="$ROOT:$PREFIX/site${PYTHONPATH:+:$PYTHONPATH}"
step env 45 "$PY" -m benchmarks.gpu_check env --json "$OUT/env.json"
[ -f "$OUT/env.json" ] && sed 's/^/    /' "$OUT/env.json" >>"$LOG"
command -v nvidia-smi >/dev/null && nvidia-smi -L 2>&1 | sed 's/^/    /' >>"$LOG"
say "    mpiexec: $(command -v mpiexec) ($(mpiexec --version 2>&1 | grep -m1 Version | tr -s ' '))"

# 1. The tests: the device logic and the tile schedule on the CPU, then everything marked cuda.
PYTEST=("$PY" -m pytest -q -p no:cacheprovider)
step unit 60 "${PYTEST[@]}" -rfEs tests/test_device.py tests/test_zero_tiles.py
[ "$DRY" = 1 ] && export DISTRIB_GPU_DRY_RUN=1
export DISTRIB_GPU_RESULTS=$OUT
step cuda_tests 180 "${PYTEST[@]}" -rA -m cuda tests/test_cuda.py

# 2. The allreduce benchmark's rows for the path at 1 rank (for the record: no peer to reduce with).
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc-per-node 1)
step allreduce 60 "${TORCHRUN[@]}" -m benchmarks.allreduce --backends "$NCCL" --max-size 256M --iters 10 \
    --json "$OUT/allreduce-$NCCL-1rank.json" --plot "$OUT/allreduce-$NCCL-1rank.png"

# 3. ZeRO-Offload on the GPU against AdamW there: step time, GPU memory, tiled copies on and off (last: it takes
# what time is left, and keeps the rows measured if cut short).
step zero_benchmark 200 "${TORCHRUN[@]}" -m benchmarks.gpu_check zero --device "$DEVICE" --backend "$NCCL" \
    --params "$PARAMS" --steps 3 --json "$OUT/zero-benchmark.json"

"$PY" - "$OUT" "$DRY" <<'EOF'
import json, pathlib, sys
out, dry = pathlib.Path(sys.argv[1]), sys.argv[2] == "1"
steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
env = json.loads((out / "env.json").read_text()) if (out / "env.json").exists() else {}
summary = {"dry_run_on_cpu": dry, "env": env, "steps": steps}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")
print("steps:", ", ".join(f"{s['step']} {s['status']}" for s in steps))
EOF
say "gpu_check done in $((SECONDS - START)) s"
grep -q '"status": "passed"' "$STEPS" && ! grep -v '"status": "passed"' "$STEPS" | grep -q .
