#!/usr/bin/env bash
# One-call GPU check: the unit tests on CUDA (compiled kernels, no Triton interpreter), the self-check, the compile
# check (registers / spills / occupancy read from the cubins), and the GPU benchmark sweep with a roofline line per
# launch (profiled kernel times against the counted work).
#
# For a CUDA machine with no network (torch + triton preinstalled, e.g. torch 2.11 / triton 3.6). Installs nothing
# from the network: optional peers (pytorch-metric-learning, liger-kernel, cut-cross-entropy) travel as wheels in
# .whl/ at the repository root and are installed with --no-index into /tmp/site. Absent peers show as absent.
# Run from the repository root:   OUT=/some/dir bash bench/gpu_check.sh
# DRY=1 runs the CPU-runnable parts on CPU with tiny settings (plumbing check: every step, the file layout).
#
# Writes exactly these 9 files, none deeper than $OUT/results/FILE:
#   $OUT/env.txt (GPU, driver, versions)  $OUT/tests.log  $OUT/check.log  $OUT/compile.log  $OUT/heads.md
#   (the adaptive-margin heads against their authors' formulations, bench/adaptive_heads.py)
#   $OUT/bench.log (the launch plans with predicted times, progress, the bf16 and fp32 tables, roofline lines)
#   $OUT/results/<device>_<date>.{json,md,png} (the bf16 sweep)
# Time budget, each step under `timeout` (sum 475 s < 8 min): tests 190 s (a fresh machine compiles every kernel
# variant), check 30 s, compile check 75 s, plans 15 s, bf16 sweep 80 s (no new case after 50 s, then roofline
# profiles), fp32 sweep 30 s, the adaptive heads at 1024 x 512 x 93431 55 s. Every step writes as it goes, so a step cut short still reports.
set -u
OUT="${OUT:-bench/results/gpu_check}"
mkdir -p "$OUT/results"
PY="${PYTHON:-python3}"
DRY="${DRY:-0}"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "$DRY" = 1 ]; then
    DEV=cpu
    TESTS=(timeout 120 "$PY" -m pytest tests/test_gpu_compile.py tests/test_roofline.py -x -q -p no:cacheprovider
           -k "occupancy or parser or plan_prints or fake")
    CHECK=(timeout 60 "$PY" -m deepfense check --device cpu --no-interpreter)
    COMPILE=(timeout 120 "$PY" bench/compile_check.py --dtypes bf16 --only combine)
    PLAN=(timeout 30 "$PY" -m deepfense bench --plan --losses AMSoftmax --dtypes bf16 --shapes 256x192x5994)
    BF16=(timeout 120 "$PY" -m deepfense bench --device cpu --shapes 64x32x2,32x32x300 --losses AMSoftmax
          --dtypes fp32 --providers deepfense,eager --compile none --reps 3 --out "$OUT/results")
    FP32=(timeout 60 "$PY" -m deepfense bench --device cpu --shapes 64x32x2 --losses CrossEntropy --dtypes fp32
          --providers deepfense --compile none --reps 3 --no-errors --out /tmp/gpu_check_fp32)
    HEADS=(timeout 120 "$PY" bench/adaptive_heads.py --bench --shape 16 32 300 --rounds 2 --out "$OUT/heads.md")
else
    DEV=cuda
    TESTS=(env DEEPFENSE_TEST_DEVICE=cuda timeout 190 "$PY" -m pytest tests/ -x -q -p no:cacheprovider)
    CHECK=(timeout 30 "$PY" -m deepfense check --device cuda)
    COMPILE=(timeout 75 "$PY" bench/compile_check.py --dtypes bf16)  # this machine's triton; fp32: docs/kernels.md
    PLAN=(timeout 15 "$PY" -m deepfense bench --plan --losses AMSoftmax,CrossEntropy --dtypes bf16,fp32
          --shapes 65536x1024x2,256x192x5994,1024x512x1000000)
    # the full CUDA sweep: deepfake heads up to B = 65536 (D up to 1024), speaker 128-512 x 192-256 x 5994-17982,
    # face 1024 x 512 x C up to 10^6, bf16, torch.compile on the anchors, the peers that installed
    BF16=(timeout 80 "$PY" -m deepfense bench --device cuda --full --dtypes bf16 --time-limit 50 --out "$OUT/results")
    # fp32 (tf32x3 dots by default) on the representative heads, fused against eager: times and roofline lines
    FP32=(timeout 30 "$PY" -m deepfense bench --device cuda --dtypes fp32 --losses AMSoftmax,CrossEntropy
          --shapes 65536x1024x2,256x192x5994,128x192x17982,1024x512x1000000 --providers deepfense,eager
          --compile none --no-errors --time-limit 15 --out /tmp/gpu_check_fp32)
    # each adaptive-margin head at a face shape against its authors' formulation, eager and compiled, peak memory
    HEADS=(timeout 55 "$PY" bench/adaptive_heads.py --bench --shape 1024 512 93431 --rounds 3 --out "$OUT/heads.md")
fi

{
    date -u +"date %Y-%m-%dT%H:%M:%SZ"
    echo "mode $DEV (DRY=$DRY)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
for mod in ("triton", "pytorch_metric_learning", "liger_kernel", "cut_cross_entropy", "yaml"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "installed"))
    except Exception as exc:
        print(mod, "absent:", type(exc).__name__)
from deepfense.kernels import plan
print("fp32 dot precision", plan.FP32_PRECISION)
EOF
    git log -1 --format="commit %H %s" 2>/dev/null
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

status=0
step() {  # step NAME LOG CMD...: run CMD into LOG under its timeout, report its exit status
    local name=$1 log=$2
    shift 2
    echo "== $name"
    "$@" >> "$log" 2>&1
    local rc=$?
    tail -n 4 "$log"
    echo "$name rc=$rc$([ $rc -eq 124 ] && echo ' (timed out)')"
    [ $rc -eq 0 ] || status=1
}
for f in tests check compile bench; do : > "$OUT/$f.log"; done
step "tests ($DEV)" "$OUT/tests.log" "${TESTS[@]}"
step "check" "$OUT/check.log" "${CHECK[@]}"
step "compile check (registers, spills, occupancy from the cubins)" "$OUT/compile.log" "${COMPILE[@]}"
step "launch plans with counted work and predicted H200 times" "$OUT/bench.log" "${PLAN[@]}"
step "bench bf16 sweep + roofline" "$OUT/bench.log" "${BF16[@]}"
step "bench fp32 + roofline" "$OUT/bench.log" "${FP32[@]}"
step "adaptive-margin heads against their authors' formulations" "$OUT/bench.log" "${HEADS[@]}"

find "$OUT" -type f | sort
exit $status
