#!/usr/bin/env bash
# The benchmark rows on CUDA in one command: benchmarks/speed_memory.py (AlexNet, every method) and
# benchmarks/packing.py (with and without 1-bit saved tensors), then LeNet-2 and ResNet18 rows while time is left.
# Memory on CUDA is torch.cuda.max_memory_allocated (harness.py). Under 5 minutes on an H200.
#
#   bash benchmarks/gpu.sh                  # on the GPU machine, from anywhere; CSVs and a log to $OUT, else
#                                           # benchmarks/results/
#   bash benchmarks/gpu.sh --fetch-wheels   # beforehand, on a machine with network: the pure-Python packages the
#                                           # GPU image lacks, as wheels in .whl/ (carry .whl along)
#
# Python: $PYTHON if set, else .venv/bin/python if it imports torch with CUDA, else python3. Missing packages are
# installed from .whl/*.whl (no network needed), else from the package index, into a folder on PYTHONPATH; the
# project itself runs from src/ (no install). Environment: OUT (output folder), GPU_BUDGET_S (seconds for all runs,
# default 270), DEVICE (default cuda; cpu with QUICK=1 checks this script without a GPU), QUICK=1 (smoke sizes).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1

# Pure-Python packages that `import lightning_tlbptt` and the benchmarks need beyond torch, lightning, torchmetrics,
# numpy, matplotlib, scipy, h5py, torchvision (which a CUDA image with PyTorch has), pinned to the versions tested.
WHEELS=(spikingjelly==2.0.0 loguru==0.7.3 SciencePlots==2.2.2 tonic==1.7.0 importRosbag==1.0.4 librosa==0.11.0
    mlxtend==0.25.0 jsonargparse==4.53.0 docstring_parser==0.18.0 typeshed_client==2.15.0)
IMPORTS="import torch, lightning, torchmetrics, spikingjelly.activation_based, lightning_tlbptt, lightning_tlbptt.packing, lightning_tlbptt.paper, tlbptt.compare"

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    mkdir -p .whl
    grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >>.git/info/exclude
    exec "${PYTHON:-python3}" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}"
fi

OUT_DIR="${OUT:-$ROOT/benchmarks/results}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_log.txt"
if [[ -z "${GPU_SH_LOGGING:-}" ]]; then  # run again with all output also in the log; tee ends before we do
    GPU_SH_LOGGING=1 bash "${BASH_SOURCE[0]}" "$@" 2>&1 | tee -a "$LOG"
    exit "${PIPESTATUS[0]}"
fi
DEVICE="${DEVICE:-cuda}"
BUDGET="${GPU_BUDGET_S:-270}"
START=$SECONDS
echo "== benchmarks/gpu.sh $(date -u +%FT%TZ) on $(hostname), device $DEVICE, budget ${BUDGET}s, output $OUT_DIR"

# --- Python and packages -------------------------------------------------------------------------------------
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MPLBACKEND=Agg WANDB_MODE=disabled
PY=""
for candidate in "${PYTHON:-}" "$ROOT/.venv/bin/python" python3; do
    [[ -n "$candidate" ]] || continue
    if [[ "$DEVICE" == cpu ]]; then
        check="import torch"
    else
        check="import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    fi
    if "$candidate" -c "$check" >/dev/null 2>&1; then
        PY="$candidate"
        break
    fi
done
if [[ -z "$PY" ]]; then
    echo "no Python with torch (and CUDA, for DEVICE=$DEVICE) found: set PYTHON=/path/to/python" >&2
    exit 2
fi
echo "python: $PY"
if ! "$PY" -c "$IMPORTS" >/dev/null 2>&1; then
    SITE="${TMPDIR:-/tmp}/tlbptt-site"
    mkdir -p "$SITE"
    if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
        echo "installing $(ls "$ROOT"/.whl/*.whl | wc -l) carried wheels into $SITE"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "$ROOT"/.whl/*.whl
    else
        echo "no .whl/ folder: installing ${WHEELS[*]} from the package index into $SITE"
        timeout 180 "$PY" -m pip install -q --no-deps --target "$SITE" "${WHEELS[@]}"
    fi
    export PYTHONPATH="$PYTHONPATH:$SITE"  # after src/ and the image's own packages take precedence
fi
if ! "$PY" -c "$IMPORTS"; then
    echo "the benchmarks cannot import their packages (above); run 'bash benchmarks/gpu.sh --fetch-wheels' on a" \
        "machine with network and carry .whl/" >&2
    exit 2
fi
"$PY" - <<'EOF'
import platform, torch, lightning, spikingjelly
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"python {platform.python_version()}, torch {torch.__version__}, lightning {lightning.__version__}, "
      f"spikingjelly {getattr(spikingjelly, '__version__', '?')}, {gpu}")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# --- Runs, most important first; each gets what is left of the budget ------------------------------------------
FAILED=()
run() {  # run NAME MIN_S CSV_GLOB -- COMMAND...: run if MIN_S of the budget are left, move the CSVs it wrote
    local name="$1" min="$2" pattern="$3"
    shift 4
    local left=$((BUDGET - (SECONDS - START)))
    if ((left < min)); then
        echo "== skipped $name: ${left}s of the budget left, it needs about ${min}s"
        FAILED+=("$name (skipped)")
        return
    fi
    echo "== $name ($((SECONDS - START))s in, ${left}s left): $*"
    local began=$SECONDS
    if ! timeout --kill-after=10 "$left" "$@"; then
        echo "== $name failed or ran out of time"
        FAILED+=("$name")
    fi
    echo "== $name took $((SECONDS - began))s"
    if [[ "$OUT_DIR" != "$ROOT/benchmarks/results" ]]; then
        for f in $ROOT/benchmarks/results/$pattern; do
            [[ -f "$f" && "$f" -nt "$OUT_DIR/.start" ]] && mv "$f" "$OUT_DIR/"
        done
    fi
}
touch "$OUT_DIR/.start"
QUICK_FLAG=()
[[ "${QUICK:-0}" == 1 ]] && QUICK_FLAG=(--quick)
TAG="$DEVICE"
run "packing exactness check" 20 "none" -- "$PY" benchmarks/packing.py --check --device "$DEVICE"
SM=("$PY" benchmarks/speed_memory.py --device "$DEVICE" --rounds 1 --tag "$TAG" "${QUICK_FLAG[@]}")
run "speed_memory alexnet" 60 "speed_memory_alexnet*_$TAG.csv" -- "${SM[@]}" --network alexnet \
    --methods a,aL,b,bw,bs,c,cw,cs,d,e
run "packing alexnet" 60 "packing_*.csv" -- "$PY" benchmarks/packing.py --device "$DEVICE" --rounds 1 \
    --out "$OUT_DIR" "${QUICK_FLAG[@]}"
run "speed_memory lenet2" 60 "speed_memory_lenet2*_$TAG.csv" -- "${SM[@]}" --network lenet2 --methods a,b,bs,c
run "speed_memory resnet18" 60 "speed_memory_resnet18*_$TAG.csv" -- "${SM[@]}" --network resnet18 --methods a,b,bs,c
rm -f "$OUT_DIR/.start"

echo "== done in $((SECONDS - START))s; files in $OUT_DIR:"
ls -l "$OUT_DIR"
if ((${#FAILED[@]})); then
    echo "== not complete: ${FAILED[*]}"
    exit 1
fi
