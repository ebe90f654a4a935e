#!/usr/bin/env bash
# Sets up everything (deploy/local/setup.sh) and runs the whole test suite. Extra args go to pytest.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$(bash "$REPO/deploy/local/setup.sh" | tail -n 1)"
cd "$REPO"
set +e
"$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure, not a pass" >&2
  exit 1
fi
exit "$status"
