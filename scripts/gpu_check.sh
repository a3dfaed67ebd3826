#!/usr/bin/env bash
# Verifies fastbptt's GPU backends on a CUDA machine in one command, with the torch already
# installed there (nothing is downloaded):
#   1. build  fastbptt._C with the CUDA kernels for the present GPU's architecture only
#             (FASTBPTT_CUDA=1, MAX_JOBS = cores), then `fastbptt info`;
#   2. tests  every GPU test (`pytest -m cuda`: tests/test_cuda.py, Triton on CUDA tensors, the
#             parity suite on the cuda and triton backends), ending with pytest's summary line;
#   3. bench  the gpu-kernels benchmark preset: fastbptt 'cuda' and 'triton' against torch.nn
#             (cuDNN) and torch.compile, float32 and bfloat16, time and peak memory; then the
#             cells preset: per-step loops of fastbptt's cells against torch.nn's cells.
# Everything is logged to $OUT/gpu_check.log (OUT defaults to benchmarks/out/gpu-check); the
# benchmark's JSON, markdown and plots land beside it; a table of the stages is printed last and
# written to $OUT/summary.md. Exit status: 0 when every stage passed, 1 otherwise, 2 when the
# machine cannot run the check (no GPU, a missing package).
#
#   scripts/gpu_check.sh            # build, tests, benchmark
#   scripts/gpu_check.sh --quick    # build and tests only
#   scripts/gpu_check.sh --bench    # build and benchmark only
#
# Environment:
#   PYTHON       interpreter with torch (default python3)
#   WHEELS       folder of wheels for Python packages the machine lacks, installed with
#                `pip --no-index` into a scratch folder put on PYTHONPATH (default .whl; see
#                docs/cuda.md for how to download them on a machine with a package index)
#   TIME_LIMIT   seconds the whole check may take (default 540): the tests are stopped in time
#                for the benchmark, and the benchmark starts no case too late to finish
#   PYTEST_ARGS  extra pytest arguments, e.g. "-k persistent -x"
#   BENCH_ARGS   extra `fastbptt bench` arguments, e.g. "--cells gru --reps 5"
set -uo pipefail

usage() { sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }

MODE=all
case "${1:-}" in
  "") ;;
  --quick) MODE=quick ;;
  --bench) MODE=bench ;;
  -h|--help) usage; exit 0 ;;
  *) echo "gpu_check: unknown option '$1' (expected --quick, --bench or --help)" >&2; exit 2 ;;
esac
if [[ $# -gt 1 ]]; then echo "gpu_check: one option at most, got: $*" >&2; exit 2; fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PYTHON="${PYTHON:-python3}"
WHEELS="${WHEELS:-.whl}"
TIME_LIMIT="${TIME_LIMIT:-540}"
OUT_DIR="${OUT:-$ROOT/benchmarks/out/gpu-check}"
BENCH_RESERVE=240   # seconds kept for the benchmark when the tests run first
CELLS_SHARE=75      # of the benchmark's seconds, those for the cell loops (preset cells)
mkdir -p "$OUT_DIR" || exit 2
LOG="$OUT_DIR/gpu_check.log"
SUMMARY="$OUT_DIR/summary.md"
: >"$LOG"
STAGES=()
FAILED=0

log() { echo "$*" | tee -a "$LOG"; }

# record NAME STATUS SECONDS DETAIL: one row of the final table
record() {
  STAGES+=("| $1 | $2 | $3 | $4 |")
  [[ "$2" == ok ]] || FAILED=1
}

finish() {
  {
    echo
    echo "## gpu_check ($MODE): $(date -u +%Y-%m-%dT%H:%M:%SZ), ${SECONDS} s in all"
    echo
    echo "| stage | status | seconds | detail |"
    echo "|---|---|---|---|"
    printf '%s\n' "${STAGES[@]}"
    echo
    echo "log and results: $OUT_DIR"
  } | tee "$SUMMARY" | tee -a "$LOG"
  exit "$1"
}

# ----------------------------------------------------------------------------- 0. machine
log "gpu_check: mode $MODE, repository $ROOT, output $OUT_DIR"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  SITE="$(mktemp -d)/site"
  if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
      "$WHEELS"/*.whl >>"$LOG" 2>&1; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    log "installed the carried wheels: $(find "$WHEELS" -maxdepth 1 -name '*.whl' -printf '%f ')"
  else
    log "gpu_check: installing the wheels in $WHEELS failed (see $LOG)"
    record machine failed 0 "wheels in $WHEELS did not install"
    finish 2
  fi
fi
{
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  fi
  if command -v nvcc >/dev/null; then nvcc --version | tail -2; fi
} 2>&1 | tee -a "$LOG"
MACHINE="$("$PYTHON" - "$WHEELS" 2>&1 <<'PY'
import importlib.util, sys
missing = [m for m in ("torch", "triton", "numpy", "pytest", "hypothesis", "matplotlib", "setuptools")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python packages: {', '.join(missing)}; carry them as wheels in {sys.argv[1]}/")
import torch
from torch.utils import cpp_extension
if not torch.cuda.is_available():
    sys.exit(f"no CUDA GPU is visible to torch {torch.__version__} (CUDA {torch.version.cuda}): "
             "run this on a GPU machine")
if cpp_extension.CUDA_HOME is None:
    sys.exit("building the CUDA kernels needs nvcc, and torch finds no CUDA toolkit (set CUDA_HOME)")
if not cpp_extension.is_ninja_available():  # the build still works, one file at a time
    print("warning: ninja not found; the extension builds without parallel compiles", file=sys.stderr)
import triton
major, minor = torch.cuda.get_device_capability()
print(f"{major}.{minor}|{torch.cuda.get_device_name()} (sm_{major}{minor}), torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, Triton {triton.__version__}, "
      f"Python {sys.version.split()[0]}")
PY
)"
status=$?
if [[ $status -ne 0 ]]; then
  log "gpu_check: $MACHINE"
  record machine failed "$SECONDS" "$MACHINE"
  finish 2
fi
# the last line is "capability|description"; lines before it are warnings
if [[ "$MACHINE" == *$'\n'* ]]; then log "${MACHINE%$'\n'*}"; fi
MACHINE="${MACHINE##*$'\n'}"
ARCH="${MACHINE%%|*}"
record machine ok "$SECONDS" "${MACHINE#*|}"
log "machine: ${MACHINE#*|}"

# ----------------------------------------------------------------------------- 1. build
log "=== build: fastbptt._C with CUDA kernels for compute capability $ARCH, $(nproc) jobs"
start=$SECONDS
FASTBPTT_CUDA=1 FASTBPTT_CUDA_ARCH="$ARCH" MAX_JOBS="$(nproc)" \
  "$PYTHON" -m pip install -v --no-index --no-deps --no-build-isolation -e . >>"$LOG" 2>&1
status=$?
if [[ $status -eq 0 ]]; then
  "$PYTHON" -c "import sys, fastbptt._C as c; sys.exit(0 if c.with_cuda else 1)" >>"$LOG" 2>&1
  status=$?
  [[ $status -eq 0 ]] || log "gpu_check: the build finished but fastbptt._C has no CUDA kernels"
fi
if [[ $status -ne 0 ]]; then
  grep -E "error|Error|FAILED" "$LOG" | tail -40
  record build failed $((SECONDS - start)) "exit $status; compiler errors in gpu_check.log"
  finish 1
fi
record build ok $((SECONDS - start)) "sm_${ARCH/./}"
"$PYTHON" -m fastbptt info 2>&1 | tee -a "$LOG"

# ----------------------------------------------------------------------------- 2. tests
if [[ $MODE != bench ]]; then
  reserve=$([[ $MODE == all ]] && echo "$BENCH_RESERVE" || echo 0)
  limit=$((TIME_LIMIT - SECONDS - reserve))
  [[ $limit -ge 60 ]] || limit=60
  log "=== tests: pytest -m cuda, at most ${limit} s"
  start=$SECONDS
  per_test=()
  # a hung kernel (a grid barrier that never opens) stops the run with the test's name and stack
  if "$PYTHON" -c "import pytest_timeout" 2>/dev/null; then per_test=(--timeout 120 --timeout-method thread); fi
  # shellcheck disable=SC2086  # PYTEST_ARGS is a list of words
  (unset TRITON_INTERPRET; timeout --kill-after=10 "$limit" \
    "$PYTHON" -m pytest -m cuda -p no:cacheprovider -q -rfEs --tb=short "${per_test[@]}" ${PYTEST_ARGS:-} tests) \
    2>&1 | tee -a "$LOG"
  status=${PIPESTATUS[0]}
  line="$(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|error|deselected)' "$LOG" | tail -1 | sed 's/^=* *//; s/ *=*$//')"
  case $status in
    0) record tests ok $((SECONDS - start)) "$line" ;;
    124|137) record tests "timed out" $((SECONDS - start)) "stopped after ${limit} s; ${line:-no summary}" ;;
    5) record tests failed $((SECONDS - start)) "no GPU test was collected" ;;
    *) record tests failed $((SECONDS - start)) "exit $status; ${line:-no summary}" ;;
  esac
fi

# ----------------------------------------------------------------------------- 3. benchmark
# bench_preset NAME BUDGET [ARGS...]: runs one preset, cases started within BUDGET s, and records
# a row with its records by status; a failed record fails the row ("unavailable" is a kernel path
# declining a case, with its reason in the JSON)
bench_preset() {
  local name=$1 budget=$2 start=$SECONDS status counts counted
  shift 2
  log "=== bench: preset $name, cases started within ${budget} s"
  rm -f "$OUT_DIR/$name"-*   # only this run's results are counted and brought back
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of words
  "$PYTHON" -m fastbptt bench --preset "$name" --device cuda --out "$OUT_DIR" --budget "$budget" "$@" \
    ${BENCH_ARGS:-} 2>&1 | tee -a "$LOG"
  status=${PIPESTATUS[0]}
  counts="$("$PYTHON" - "$OUT_DIR" "$name" 2>&1 <<'PY'
import collections, glob, json, os, sys
paths = sorted(glob.glob(os.path.join(sys.argv[1], f"{sys.argv[2]}-*.json")), key=os.path.getmtime)
if not paths:
    sys.exit("no result file was written")
records = json.load(open(paths[-1]))["records"]
counts = collections.Counter(r["status"] for r in records)
print(f"{os.path.basename(paths[-1])}: {len(records)} records, "
      + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
sys.exit(3 if counts["failed"] else 0)
PY
)"
  counted=$?
  if [[ $status -ne 0 ]]; then
    record "bench $name" failed $((SECONDS - start)) "exit $status; $counts"
  elif [[ $counted -ne 0 ]]; then
    record "bench $name" "records failed" $((SECONDS - start)) "$counts"
  else
    record "bench $name" ok $((SECONDS - start)) "$counts"
  fi
}

if [[ $MODE != quick ]]; then
  # the last case started, and the files written, in 60 s; the cell loops (preset cells) get
  # CELLS_SHARE s of what is left, the kernels (preset gpu-kernels) the rest, first
  budget=$((TIME_LIMIT - SECONDS - 60 - CELLS_SHARE))
  if [[ $budget -lt 30 ]]; then
    record bench skipped 0 "only $((budget + CELLS_SHARE)) s left of TIME_LIMIT=${TIME_LIMIT}"
  else
    bench_preset gpu-kernels "$budget"
    # the cell loops' records in their JSON and their tables in the log: no plots or markdown, so
    # that the output folder holds eight files at most
    bench_preset cells $((TIME_LIMIT - SECONDS - 60 > 30 ? TIME_LIMIT - SECONDS - 60 : 30)) --no-plots
    rm -f "$OUT_DIR"/cells-*.md
  fi
fi

finish "$FAILED"
