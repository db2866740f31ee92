#!/usr/bin/env bash
# Set up .venv with the dev extras and run the whole test suite (CPU, offline): `bash scripts/test.sh [pytest args]`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh dev
HF_HUB_DISABLE_TELEMETRY=1 .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
