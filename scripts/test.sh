#!/usr/bin/env bash
# Set up .venv with the dev extras and run the whole test suite (CPU, offline): `bash scripts/test.sh [pytest args]`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh dev
# Two pytest-xdist workers of one thread each: half the suite is process start-ups and small models, which two
# one-thread workers get through in 0.7x the time of one two-thread run. `-n 0` runs serially, `-n 4` four workers.
HF_HUB_DISABLE_TELEMETRY=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" .venv/bin/python -m pytest -q -p no:cacheprovider -n 2 "$@"
