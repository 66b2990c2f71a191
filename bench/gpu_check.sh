#!/usr/bin/env bash
# One-call GPU check: the unit tests on CUDA (no Triton interpreter), the self-check, then the GPU benchmark table.
#
# For a CUDA machine with no network (torch + triton preinstalled, e.g. torch 2.11 / triton 3.6, Python 3.12).
# Run from the repository root:   OUT=/some/dir bash bench/gpu_check.sh
# Writes at most 8 files, none deeper than $OUT/results/FILE:
#   $OUT/env.txt  (GPU name from nvidia-smi, driver, library versions)   $OUT/tests.log   $OUT/check.log
#   $OUT/bench.log (progress + final table)   $OUT/results/<device>_<date>.{json,md,png}   $OUT/fuse_dx.log
# Budget: under 8 minutes in all (tests 270 s: a fresh machine compiles every kernel variant; check 30 s, bench
# 130 s, FUSE_DX comparison 40 s, each under `timeout`); the bench starts no new shape after 90 s and writes its
# partial results after every shape, so a cut-short run still reports.
#
# Optional peers (pytorch-metric-learning, liger-kernel, cut-cross-entropy) can travel as wheels in .whl/ at the
# repository root (see the device notes: `pip download --no-deps --only-binary=:all: --python-version 3.12 ...`);
# they are installed into /tmp/site without touching the preinstalled torch. Absent peers show as absent.
set -u
OUT="${OUT:-bench/results/gpu_check}"
mkdir -p "$OUT/results"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
    date -u +"date %Y-%m-%dT%H:%M:%SZ"
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
EOF
    git log -1 --format="commit %H %s" 2>/dev/null
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

status=0
echo "== tests (CUDA, no interpreter)"
DEEPFENSE_TEST_DEVICE=cuda timeout 270 "$PY" -m pytest tests/ -x -q -p no:cacheprovider > "$OUT/tests.log" 2>&1
rc=$?; tail -n 3 "$OUT/tests.log"; echo "tests rc=$rc"; [ $rc -eq 0 ] || status=1

echo "== check"
timeout 30 "$PY" -m deepfense check --device cuda > "$OUT/check.log" 2>&1
rc=$?; cat "$OUT/check.log"; echo "check rc=$rc"; [ $rc -eq 0 ] || status=1

echo "== bench (GPU default sweep)"
timeout 130 "$PY" -m deepfense bench --device cuda --time-limit 90 --out "$OUT/results" > "$OUT/bench.log" 2>&1
rc=$?; echo "bench rc=$rc"; [ $rc -eq 0 ] || status=1

# dX computed in the forward for one-tile heads is opt-in (deepfense/kernels/ops.py FUSE_DX): time it against the
# default on the deepfake heads, so the choice can be made on measurements
echo "== bench: DEEPFENSE_FUSE_DX=1 vs default, deepfake heads"
for fuse in 0 1; do
    DEEPFENSE_FUSE_DX=$fuse timeout 20 "$PY" -m deepfense bench --device cuda --losses AMSoftmax,OCSoftmax \
        --B 4096,65536 --D 1024 --C 2 --dtypes bf16 --providers deepfense --compile none --no-errors \
        --out /tmp/fuse_dx_$fuse 2>&1 | grep -E "^\| (AM|OC)" | sed "s/^/FUSE_DX=$fuse /"
done > "$OUT/fuse_dx.log"
cat "$OUT/fuse_dx.log"
ls -la "$OUT" "$OUT/results"
exit $status
