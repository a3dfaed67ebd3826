# Sourced by scripts/main.sh and scripts/test.sh: creates .venv if needed, installs torch when it
# is absent (2.13.0: the CPU build this project is developed against), then builds and installs
# fastbptt in editable mode against that torch. Usage: . scripts/setup_env.sh "extra1,extra2"
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
EXTRAS=${1:-}
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
    echo "installing torch==2.13.0 ..."
    python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q ninja numpy "setuptools>=64" wheel
echo "building fastbptt (C++ extension) ..."
python -m pip install -q --no-build-isolation -e ".${EXTRAS:+[$EXTRAS]}"
