#!/usr/bin/env bash
# The GPU check in one command: CUDA-only tests, peak memory and step time of end-to-end,
# checkpointing, DGL and ContSup R1E (and end-to-end and R1E under run.compile), one short training; gpu_check.json and gpu_check.md.
# Without CUDA it says so in one line and exits 0. Options: see benchmarks/gpu_check.py --help.
set -euo pipefail
exec "${PYTHON:-python}" "$(dirname "$0")/gpu_check.py" "$@"
