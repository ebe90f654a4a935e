"""onpolicy add-ons installed into the vLLM venv (not into the main venv)."""
