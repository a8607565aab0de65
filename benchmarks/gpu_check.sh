#!/usr/bin/env bash
# The GPU check in one command (see benchmarks/gpu_check.py): prints one table; skips with one line without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" benchmarks/gpu_check.py "$@"
