#!/usr/bin/env bash
# The GPU check: prove every kernel on this machine's GPU and bring back figures, in one run of at
# most six minutes; results under $OUT (else gpu-check-out/). --dry-run: no GPU needed (CI).
# What it runs and writes: scripts/gpu_check.py.
set -uo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
command -v "$python" >/dev/null 2>&1 || python=python
exec "$python" scripts/gpu_check.py "$@"
