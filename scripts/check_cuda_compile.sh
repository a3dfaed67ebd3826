#!/usr/bin/env bash
# Compile-only check of the CUDA sources: every csrc/cuda/*.cu with nvcc, and every
# csrc/cuda/*.cpp and csrc/ops.cpp (whose CUDA-only section a CPU build skips) with the host
# compiler, against the installed torch's headers, with the flags setup.py uses (torch's
# COMMON_NVCC_FLAGS + setup.py's nvcc/cxx flags) for one architecture.
# Needs nvcc, not a GPU, and works with the CPU torch wheel (its headers include ATen/cuda and
# c10/cuda). Fails on the first file that does not compile; prints each file's compile time.
#
#   scripts/check_cuda_compile.sh            # sm_90, 2 parallel jobs
#   ARCH=80 JOBS=4 scripts/check_cuda_compile.sh
#   PYTHON=.venv/bin/python NVCC=/usr/local/cuda/bin/nvcc scripts/check_cuda_compile.sh
#   scripts/check_cuda_compile.sh --list     # only print the files it would compile
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
shopt -s nullglob
# the slow host files first; csrc/ops.cpp has a section compiled only with FASTBPTT_WITH_CUDA
FILES=(csrc/cuda/*.cpp csrc/ops.cpp csrc/cuda/*.cu)
if [[ "${1:-}" == "--list" ]]; then printf '%s\n' "${FILES[@]}"; exit 0; fi
PYTHON="${PYTHON:-python}"
ARCH="${ARCH:-90}"
JOBS="${JOBS:-2}"
if [[ -z "${NVCC:-}" ]]; then
  if command -v nvcc >/dev/null 2>&1; then NVCC=nvcc
  elif [[ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]]; then NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
  else echo "check_cuda_compile: nvcc not found (set NVCC or CUDA_HOME)" >&2; exit 2; fi
fi
# CUDA headers for the host-compiled .cpp files: $CUDA_HOME, else the toolkit nvcc reports.
if [[ -n "${CUDA_HOME:-}" ]]; then CUDA_INC="$CUDA_HOME/include"
else CUDA_INC="$("$NVCC" -v -x cu -E /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1 || true)/include"; fi
if [[ ! -f "$CUDA_INC/cuda_runtime.h" ]]; then CUDA_INC=/usr/local/cuda/include; fi
CXX="${CXX:-c++}"

# Flags derived from torch and setup.py, one per line: "nvcc <flag>", "cxx <flag>", "inc <dir>".
FLAGS="$("$PYTHON" - <<'PY'
import ast, os, sysconfig
import torch.utils.cpp_extension as ext

tree = ast.parse(open("setup.py").read())
nvcc, cxx = [], []
for node in ast.walk(tree):
    if isinstance(node, ast.Assign) and isinstance(node.value, ast.List):
        target = ast.unparse(node.targets[0])
        values = [ast.literal_eval(e) for e in node.value.elts if isinstance(e, ast.Constant)]
        if target == 'extra["nvcc"]' or target == "extra['nvcc']":
            nvcc = values
        elif target == "cxx_flags":
            cxx = values
for d in ext.include_paths() + [sysconfig.get_paths()["include"]]:  # Python.h: csrc/ops.cpp binds to Python
    print("inc", d)
common = ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]
if not os.path.exists(os.path.join(ext.include_paths()[0], "c10/cuda/impl/cuda_cmake_macros.h")):
    # The CPU wheel ships c10/cuda headers but not this generated one (which only defines an
    # export macro on Windows); skip it there.
    common.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
for f in ext.COMMON_NVCC_FLAGS + ["--compiler-options", "-fPIC"] + nvcc + common:
    print("nvcc", f)
if not any(f.startswith("-std=") for f in nvcc):
    print("nvcc", "-std=c++20")
for f in cxx + ["-fPIC", "-DFASTBPTT_WITH_CUDA"] + common:
    print("cxx", f)
if not any(f.startswith("-std=") for f in cxx):
    print("cxx", "-std=c++20")
PY
)"
INC=() NVCC_FLAGS=() CXX_FLAGS=()
while read -r kind value; do
  case "$kind" in
    inc) INC+=("-I$value") ;;
    nvcc) NVCC_FLAGS+=("$value") ;;
    cxx) CXX_FLAGS+=("$value") ;;
  esac
done <<< "$FLAGS"
NVCC_FLAGS+=("-gencode" "arch=compute_${ARCH},code=sm_${ARCH}")

if [[ ${#FILES[@]} -eq 0 ]]; then echo "check_cuda_compile: no sources in csrc/cuda" >&2; exit 2; fi

LOGS="$(mktemp -d)"
trap 'rm -rf "$LOGS"' EXIT
export NVCC CXX CUDA_INC LOGS
export NVCC_FLAGS_STR="$(printf '%q ' "${NVCC_FLAGS[@]}")"
export CXX_FLAGS_STR="$(printf '%q ' "${CXX_FLAGS[@]}")"
export INC_STR="$(printf '%q ' "${INC[@]}")"

compile_one() {
  local src="$1" log="$LOGS/$(basename "$1").log" start end status
  start=$(date +%s.%N)
  if [[ "$src" == *.cu ]]; then
    eval "\"$NVCC\" -c -o /dev/null $INC_STR $NVCC_FLAGS_STR \"$src\"" >"$log" 2>&1 && status=0 || status=$?
  else
    eval "\"$CXX\" -c -o /dev/null $INC_STR -I\"$CUDA_INC\" $CXX_FLAGS_STR \"$src\"" >"$log" 2>&1 && status=0 || status=$?
  fi
  end=$(date +%s.%N)
  if [[ $status -eq 0 ]]; then
    printf '  ok    %6.1fs  %s\n' "$(echo "$end - $start" | bc)" "$src"
  else
    printf '  FAIL  %6.1fs  %s\n' "$(echo "$end - $start" | bc)" "$src"
    grep -E "error|Error" "$log" | head -40 >&2 || cat "$log" >&2
    return 1
  fi
}
export -f compile_one

echo "check_cuda_compile: ${#FILES[@]} files, sm_${ARCH}, ${JOBS} jobs, $("$NVCC" --version 2>/dev/null | tail -1 || true)"
START=$(date +%s.%N)
STATUS=0
printf '%s\n' "${FILES[@]}" | xargs -P "$JOBS" -I{} bash -c 'compile_one "$@"' _ {} || STATUS=$?
printf 'check_cuda_compile: total %.1fs\n' "$(echo "$(date +%s.%N) - $START" | bc)"
if [[ $STATUS -ne 0 ]]; then echo "check_cuda_compile: FAILED" >&2; exit 1; fi
echo "check_cuda_compile: all files compile"
