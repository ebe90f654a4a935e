#!/usr/bin/env bash
# Sets up everything (deploy/local/setup.sh) and runs the main job on embedded defaults.
# Extra args go to `onpolicy demo` (e.g. --duration 600). `onpolicy up` is the same stack without simulated users.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$(bash "$REPO/deploy/local/setup.sh" | tail -n 1)"
exec "$VENV/bin/onpolicy" demo "$@"
