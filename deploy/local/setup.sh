#!/usr/bin/env bash
# Sets up everything onpolicy needs on this machine, idempotently, from nothing:
#   - the main virtualenv (proxy, sink, learner, tests) under $ONPOLICY_HOME/venvs/, keyed by its inputs;
#   - s3rver (npm), the local S3 store behind the durable embedded broker;
#   - the vLLM (CPU) virtualenv, when deploy/local/setup_vllm.sh exists.
# Prints the main venv's path on the last line of stdout. Progress goes to stderr.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export ONPOLICY_HOME="${ONPOLICY_HOME:-$HOME/.onpolicy}"
PY="${ONPOLICY_PYTHON:-python3.11}"
mkdir -p "$ONPOLICY_HOME/venvs"

say() { echo "[setup] $*" >&2; }

# The venv is keyed by what goes into it: pyproject.toml, the Python, and this recipe's version
# (bump RECIPE when the install steps below change).
RECIPE="main-venv-2: torch==2.13.0 first, then -e .[learner,dev,hosted]"
key="$( (cat "$REPO/pyproject.toml"; "$PY" -V; echo "$RECIPE") | sha256sum | cut -c1-16)"
VENV="$ONPOLICY_HOME/venvs/main-$key"
if [ ! -f "$VENV/.complete" ]; then
  say "creating the main venv at $VENV (torch from the local CPU wheel first, so no CUDA build is pulled)"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade "pip==25.3" >&2
  "$VENV/bin/pip" install -q "torch==2.13.0" >&2
  "$VENV/bin/pip" install -q -e "$REPO[learner,dev,hosted]" >&2
  "$VENV/bin/pip" check >&2
  touch "$VENV/.complete"
else
  say "main venv up to date: $VENV"
fi
# Point the (cached) venv's editable install at this checkout; cheap, no dependency resolution.
"$VENV/bin/pip" install -q --no-deps --no-build-isolation -e "$REPO" >&2

NODE_DIR="$ONPOLICY_HOME/node"
if [ ! -f "$NODE_DIR/node_modules/s3rver/bin/s3rver.js" ]; then
  command -v npm >/dev/null || { say "npm is required (apt-get install -y nodejs npm)"; exit 1; }
  say "installing s3rver 3.7.1 (the broker's local S3 store) into $NODE_DIR"
  mkdir -p "$NODE_DIR"
  npm install --silent --no-audit --no-fund --prefix "$NODE_DIR" s3rver@3.7.1 >&2
fi

# Headless Chromium for the status page's browser test (Debian's package; never a downloaded browser).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing chromium (apt) for the status page test"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >&2
  else
    say "chromium is missing: sudo apt-get install -y chromium (the status page test needs it)"
  fi
fi

if [ -x "$REPO/deploy/local/setup_vllm.sh" ]; then
  "$REPO/deploy/local/setup_vllm.sh" >&2
fi
# The offline models (cached under $ONPOLICY_HOME/models by their inputs; a no-op when built).
"$VENV/bin/onpolicy" models build >&2
echo "$VENV"
