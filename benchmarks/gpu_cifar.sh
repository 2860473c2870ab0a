#!/usr/bin/env bash
# CIFAR-10 on a GPU in one command: the time-to-accuracy recipe, the paper's exact ResNet-20 recipe
# (64k iterations), and, with the time left, He et al.'s Table 6, each with its wall time.
#
#   benchmarks/gpu_cifar.sh DATA [WHEEL_DIR]
#
# DATA: a CIFAR-10 folder (the pickle release, or train/<class>/*.jpg), or a .tar.gz of one, unpacked to
# /tmp/cifar10 first. Packages as benchmarks/gpu_check.sh installs them (WHEEL_DIR default .whl/).
# Environment: OUT_DIR (default $OUT, else /tmp/gpu_cifar): the results, a few small files; RUNS_DIR (default
# /tmp/gpu_cifar_runs): the runs' workdirs, checkpoints included; RUNS (default fast,paper), PAPER_STEPS (default
# 64000), TABLE_DEPTHS (e.g. 20,32,44,56,110: add the table runs), TABLE_STEPS (default 64000),
# ALLOW_CPU=1 (a dry run without a GPU; combine with PAPER_STEPS=8 and FAST_EPOCHS=0.2), STEPS_PER_CALL
# (config.steps_per_call of the train.py runs, default 1). RUNS=calls (first, a few minutes): the paper
# recipe's loop and train.py's own, one and ten steps per call (CALLS, default "1 10"; CALL_STEPS steps
# each, default 500), by benchmarks/train_loop.py into OUT_DIR/train_loop_cifar10_resnet20_calls_of_K.json.
# The training batches are augmented on the device (dataset.augment_on=auto): the input pipeline only
# draws indices and crop offsets. Wall times, accuracies and the GPU's name are in OUT_DIR/*.json; a run
# stopped before its end (a time limit's SIGTERM) has checkpointed: the same command resumes it.
# Across machines (a lease shorter than the runs): TIME_LIMIT (seconds) stops the runs that many seconds
# after the script starts, each with a checkpoint, so that what follows still runs; PACK_RUNS=1 then packs
# RUNS_DIR's workdirs (an unfinished run's newest checkpoint, a finished run's records) into
# OUT_DIR/runs.tar.gz.00, .01, ... (at most PART_MIB MiB each, default 15; benchmarks/runs_archive.py);
# RUNS_IN="PART..." (e.g. "saved/runs.tar.gz.*") unpacks such parts into RUNS_DIR first, so the same command
# on the next machine resumes every unfinished run. A run finished in RUNS_DIR (its summary.json) is not run
# again. RUNS=none runs only the table.
set -uo pipefail
cd "$(dirname "$0")/.."
DATA="${1:?usage: benchmarks/gpu_cifar.sh DATA [WHEEL_DIR]}"
PY="${PYTHON:-python3}"
OUT_DIR="${OUT_DIR:-${OUT:-/tmp/gpu_cifar}}"
RUNS_DIR="${RUNS_DIR:-/tmp/gpu_cifar_runs}"
mkdir -p "$OUT_DIR" "$RUNS_DIR"
export PYTHONUNBUFFERED=1
status=0
start=$(date +%s)
stopped=""

if [ -f "$DATA" ]; then
  mkdir -p /tmp/cifar10 && tar xzf "$DATA" -C /tmp/cifar10 || { echo "FAIL: cannot unpack $DATA"; exit 1; }
  DATA=/tmp/cifar10
fi
if [ -z "${SKIP_INSTALL:-}" ] && compgen -G "${2:-.whl}/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "${2:-.whl}"/*.whl || { echo "FAIL: wheel install"; exit 1; }
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
$PY -c "import jax, flax, optax, orbax.checkpoint as ocp, os; print('== devices:', jax.devices()); \
print(f'== jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}, orbax {ocp.__version__}'); \
assert jax.default_backend() == 'gpu' or os.environ.get('ALLOW_CPU') == '1', jax.default_backend()" \
  || { echo "FAIL: jax does not see a GPU"; exit 1; }

if [ -n "${RUNS_IN:-}" ]; then
  # shellcheck disable=SC2086  # RUNS_IN is a list of parts, or a glob of them.
  $PY benchmarks/runs_archive.py unpack "$RUNS_DIR" $RUNS_IN || { echo "FAIL: cannot unpack RUNS_IN=$RUNS_IN"; exit 1; }
fi

# limited NAME COMMAND...: run it, stopped by SIGTERM at TIME_LIMIT (a run checkpoints and exits); not
# started with less than 30 s left, too little to reach the training loop, where SIGTERM is handled.
limited() {
  local name="$1" left rc; shift
  if [ -z "${TIME_LIMIT:-}" ]; then "$@"; return; fi
  left=$((start + TIME_LIMIT - $(date +%s)))
  if [ "$left" -lt 30 ]; then
    echo "== $name: not started, $left s of TIME_LIMIT=$TIME_LIMIT s left"; stopped="$stopped $name"; return 0
  fi
  timeout --signal=TERM --kill-after=120 "$left" "$@"
  rc=$?
  if [ $rc = 124 ]; then echo "== $name: stopped at TIME_LIMIT=$TIME_LIMIT s"; stopped="$stopped $name"; return 0; fi
  return $rc
}

timed() {  # timed NAME COMMAND...: run it (within TIME_LIMIT), record its wall time in OUT_DIR/NAME.time
  local name="$1" t0; shift
  if [ -f "$RUNS_DIR/$name/summary.json" ]; then
    echo "== $name: finished already ($RUNS_DIR/$name/summary.json), not run again"; return
  fi
  t0=$(date +%s.%N)
  limited "$name" "$@" || { echo "FAIL: $name"; status=1; }
  awk -v a="$(date +%s.%N)" -v b="$t0" 'BEGIN { printf "%.1f\n", a - b }' > "$OUT_DIR/$name.time"
  echo "== $name: $(cat "$OUT_DIR/$name.time") s wall"
}

if [[ ",${RUNS:-fast,paper}," == *",calls,"* ]]; then
  for k in ${CALLS:-1 10}; do
    limited "calls_of_$k" $PY benchmarks/train_loop.py --config configs/cifar10_resnet20.py --data_dir "$DATA" \
      --steps "${CALL_STEPS:-500}" --steps_per_call "$k" --json "$OUT_DIR/train_loop_cifar10_resnet20_calls_of_$k.json" \
      || status=1
  done
fi
if [[ ",${RUNS:-fast,paper}," == *",fast,"* ]]; then
  timed cifar10_fast $PY train.py --config=configs/cifar10_fast.py --config.dataset.data_dir="$DATA" \
    --config.num_epochs="${FAST_EPOCHS:-50}" --config.progress_bar=False --config.steps_per_call="${STEPS_PER_CALL:-1}" \
    --workdir="$RUNS_DIR/cifar10_fast"
  if [[ " $stopped " != *" cifar10_fast "* ]]; then
    $PY experiments/time_to_accuracy.py --workdir "$RUNS_DIR/cifar10_fast" --out "$OUT_DIR" \
      --name cifar10_fast_gpu || status=1
  fi
fi
if [[ ",${RUNS:-fast,paper}," == *",paper,"* ]]; then
  timed cifar10_resnet20 $PY train.py --config=configs/cifar10_resnet20.py --config.dataset.data_dir="$DATA" \
    --config.dataset.holdout=-1 --config.num_train_steps="${PAPER_STEPS:-64000}" --config.progress_bar=False \
    --config.steps_per_call="${STEPS_PER_CALL:-1}" --workdir="$RUNS_DIR/cifar10_resnet20"
  # The metrics also of a run stopped early: its evaluations and rate so far.
  if [ -f "$RUNS_DIR/cifar10_resnet20/metrics.jsonl" ]; then
    cp "$RUNS_DIR/cifar10_resnet20/metrics.jsonl" "$OUT_DIR/cifar10_resnet20_gpu_metrics.jsonl" || status=1
  fi
  if [[ " $stopped " != *" cifar10_resnet20 "* ]]; then
    cp "$RUNS_DIR/cifar10_resnet20/summary.json" "$OUT_DIR/cifar10_resnet20_gpu_summary.json" || status=1
  fi
fi
if [ -n "${TABLE_DEPTHS:-}" ]; then
  timed he_table $PY experiments/he_table.py --data_dir "$DATA" --depths "$TABLE_DEPTHS" \
    --steps "${TABLE_STEPS:-64000}" --steps_per_call "${STEPS_PER_CALL:-1}" --workdir "$RUNS_DIR/he_table" --out "$OUT_DIR"
fi
if [ -n "${PACK_RUNS:-}" ]; then
  $PY benchmarks/runs_archive.py pack "$RUNS_DIR" "$OUT_DIR/runs.tar.gz" --part_mib "${PART_MIB:-15}" \
    --drop_finished_checkpoints || status=1
fi
if [ -n "$stopped" ]; then
  echo "== not finished within TIME_LIMIT (stopped with a checkpoint, or not started; the same command goes on):$stopped"
fi
echo "== gpu_cifar: $([ $status = 0 ] && echo PASS || echo FAIL)"
exit $status
