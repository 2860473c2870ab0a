#!/usr/bin/env bash
# GPU check in one command (235 s on one H100 with COMPARE_TORCH=1; results in benchmarks/README.md):
#   1. prints the Python version and the GPU, and installs the project as a user would,
#      `pip install -e ".[$CUDA_EXTRA,test]"` from the package registry (CUDA_EXTRA: cuda13 by default, or
#      cuda12); where the registry cannot be reached (GPU machines without network access), from a folder
#      of wheels instead (default .whl/, see benchmarks/fetch_gpu_wheels.sh), else with what is installed;
#   2. ResNet-50, 224x224, bfloat16, batch 256, synthetic data: training images/s and model FLOP utilisation
#      (goal: at least 3,500 images/s), JSON in $OUT_DIR;
#   3. the parity and gradient tests on the GPU with JAX_DEFAULT_MATMUL_PRECISION=highest (no TF32).
#
# Usage:  benchmarks/gpu_check.sh [WHEEL_DIR]
# Environment: PYTHON (default python3), OUT_DIR (default $OUT, else /tmp/gpu_check), COMPARE_TORCH=1 to
# also time PyTorch (torchvision ResNet-50, channels_last, bf16 autocast, cuDNN autotuning) in the same run,
# BATCH (default 256), TEST_WORKERS (pytest-xdist workers for the tests where xdist is installed, default 8),
# XLA_EXTRA (extra XLA_FLAGS for the benchmark), SIZE (default 224), ALLOW_CPU=1 (dry run of this script on
# a machine without a GPU, e.g. ALLOW_CPU=1 BATCH=2 SIZE=64; the goal is then not met, by construction).
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS="${1:-.whl}"
PY="${PYTHON:-python3}"
OUT_DIR="${OUT_DIR:-${OUT:-/tmp/gpu_check}}"
BATCH="${BATCH:-256}"
SIZE="${SIZE:-224}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
status=0

echo "== python: $($PY -c 'import sys; print(sys.version.split()[0], sys.executable)')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"

# 1. Packages: from the registry when it answers (into a fresh virtual environment); otherwise everything
# in the wheel folder goes to /tmp/site (first on the path, so carried versions win over preinstalled ones),
# and the repository itself is used in place.
if timeout 20 $PY -m pip download -q --no-deps -d /tmp/gpu_check_probe "jax==${JAX_VERSION:-0.12.0.1}" \
     >/dev/null 2>&1; then
  echo "== installing from the registry: pip install -e \".[${CUDA_EXTRA:-cuda13},test]\""
  $PY -m venv /tmp/gpu_check_venv && PY=/tmp/gpu_check_venv/bin/python \
    && $PY -m pip install -q -e ".[${CUDA_EXTRA:-cuda13},test]" || { echo "FAIL: install"; exit 1; }
  [ "${COMPARE_TORCH:-0}" = "1" ] && { $PY -m pip install -q torch torchvision || echo "(no torch)"; }
elif compgen -G "$WHEELS/*.whl" >/dev/null; then
  echo "== the registry cannot be reached: installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl || { echo "FAIL: wheel install"; exit 1; }
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "== no wheels in $WHEELS: using the installed packages"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
$PY - <<'EOF' || { echo "FAIL: jax does not see a GPU"; exit 1; }
import jax, jaxlib, flax, optax
print(f"== jax {jax.__version__}, jaxlib {jaxlib.__version__}, flax {flax.__version__}, optax {optax.__version__}")
print("== devices:", jax.devices())
import os
assert jax.default_backend() == "gpu" or os.environ.get("ALLOW_CPU") == "1", jax.default_backend()
EOF

# 2. Throughput (the CPU convolution flag does not apply: --cpu-conv default).
# With torch in the same process, jax may take at most 45% of the GPU's memory (it preallocates 75% by default).
TORCH_ARG=()
if [ "${COMPARE_TORCH:-0}" = "1" ]; then
  TORCH_ARG=(--compare-torch --torch-formats channels_last)
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}"
fi
echo "== resnet50, bf16, batch $BATCH, ${SIZE}x${SIZE}, training and inference"
timeout 240 $PY benchmarks/bench.py --model resnet50 --dtype bfloat16 --batch "$BATCH" --size "$SIZE" \
  --mode both --repeats 5 --warmup 3 --min-repeat-seconds 1 --cpu-conv default \
  --xla-flags "${XLA_EXTRA:-}" "${TORCH_ARG[@]}" --json "$OUT_DIR/gpu_resnet50_bf16.json" \
  || { echo "FAIL: benchmark"; status=1; }
if [ -f "$OUT_DIR/gpu_resnet50_bf16.json" ]; then
  $PY - "$OUT_DIR/gpu_resnet50_bf16.json" <<'EOF' || status=1
import json, sys
r = json.load(open(sys.argv[1]))
ips = r["jax"]["train"]["images_per_s"]
u = r["utilisation"]
mfu = u.get("mfu")
print(f"== {r['jax']['device']}: {ips:.0f} images/s training, "
      f"MFU {100 * mfu:.1f}%" if mfu is not None else f"== {ips:.0f} images/s (peak of this GPU unknown)")
print("== goal 3,500 images/s:", "MET" if ips >= 3500 else "NOT MET")
sys.exit(0 if ips >= 3500 else 1)
EOF
fi

# 3. Parity and gradient tests on the GPU at full float32 precision.
TESTS=()
for f in tests/test_residual.py tests/test_blocks*.py tests/test_models.py tests/test_convert*.py \
         tests/test_parity*.py tests/test_gradcheck*.py; do
  [ -f "$f" ] && TESTS+=("$f")
done
# Several pytest processes share the GPU (xdist, where installed): none may preallocate its memory.
XDIST=()
$PY -c "import xdist" 2>/dev/null && XDIST=(-n "${TEST_WORKERS:-8}")
echo "== tests on the GPU (JAX_DEFAULT_MATMUL_PRECISION=highest, ${XDIST[*]:-1 process}): ${TESTS[*]}"
unset XLA_PYTHON_CLIENT_MEM_FRACTION
JAX_DEFAULT_MATMUL_PRECISION=highest XLA_PYTHON_CLIENT_PREALLOCATE=false \
  timeout 200 $PY -m pytest -q -p no:cacheprovider "${XDIST[@]}" "${TESTS[@]}" \
  2>&1 | tee "$OUT_DIR/gpu_tests.log" | tail -25
[ "${PIPESTATUS[0]}" = "0" ] || { echo "FAIL: tests"; status=1; }

echo "== gpu_check: $([ $status = 0 ] && echo PASS || echo FAIL)"
exit $status
