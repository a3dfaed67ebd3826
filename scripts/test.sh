#!/usr/bin/env bash
# Sets up the environment, compile-checks the CUDA sources and runs the whole test suite.
# Extra arguments go to pytest (e.g. --full for the full parity grid).
set -euo pipefail
. "$(dirname "$0")/setup_env.sh" "test,triton,bench,lm"
if command -v nvcc >/dev/null 2>&1; then
    bash scripts/check_cuda_compile.sh
elif [ -n "${CI:-}" ]; then
    echo "nvcc not found: CI must compile-check the CUDA sources" >&2
    exit 1
else
    echo "nvcc not found: skipping the CUDA compile check"
fi
python -m fastbptt info
# Triton kernels run on CPU tensors through Triton's interpreter.
export TRITON_INTERPRET=1
# A fresh torch.compile cache per run: the on-disk cache has replayed graphs compiled against an
# older schema of fastbptt's ops after the schema changed.
if [ -z "${TORCHINDUCTOR_CACHE_DIR:-}" ]; then
    TORCHINDUCTOR_CACHE_DIR="$(mktemp -d)"
    export TORCHINDUCTOR_CACHE_DIR
    trap 'rm -rf "$TORCHINDUCTOR_CACHE_DIR"' EXIT
fi
python -m pytest -q -p no:cacheprovider "$@"
