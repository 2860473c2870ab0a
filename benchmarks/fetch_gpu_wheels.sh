#!/usr/bin/env bash
# Download the wheels that benchmarks/gpu_check.sh installs on a GPU machine that cannot reach the package
# registry (where it can, gpu_check.sh installs with `pip install -e ".[cuda13,test]"` instead)
# (Linux x86_64, CPython 3.12; gpu_check.sh prints the machine's Python version first: change PYVER if it
# differs). Run this where PyPI is reachable, then bring the folder along.
#
#   benchmarks/fetch_gpu_wheels.sh [DIR] [minimal|full]      (default: .whl minimal)
#
# minimal: what a CUDA image that already has jax, flax, optax, chex, torch and pytest lacks for train.py
#          (ml_collections for the configs; grain with array_record and portpicker for the input pipeline;
#          tensorboardX for the event files; orbax-checkpoint at the version this library needs): about
#          6 MB. gpu_check.sh itself needs none of them.
# full:    jax[cuda13] 0.12.0.1 (the newest supported release) with its CUDA libraries, flax, optax, chex,
#          ml_collections: about 3 GB, for a machine with only Python and the NVIDIA driver.
set -euo pipefail
DIR="${1:-.whl}"
SET="${2:-minimal}"
PYVER="${PYVER:-3.12}"
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
mkdir -p "$DIR"
dl() { python3 -m pip download -q --only-binary=:all: --python-version "$PYVER" --implementation cp "${PLAT[@]}" \
         -d "$DIR" "$@"; }
case "$SET" in
  minimal)
    dl --no-deps "ml_collections==1.1.0" "grain==0.2.18" "array_record==0.8.6" "portpicker==1.6.0" \
      "tensorboardX==2.6.5" "orbax-checkpoint==0.12.8" ;;
  full)
    # With dependencies, so that the folder is complete; pip picks one version of each.
    dl "jax[cuda13]==0.12.0.1" "flax==0.12.12" "optax==0.2.8" "chex==0.1.92" "ml_collections==1.1.0" "grain==0.2.18" \
       "pytest" "hypothesis" ;;
  *) echo "usage: $0 [DIR] [minimal|full]" >&2; exit 2 ;;
esac
ls -la "$DIR"
