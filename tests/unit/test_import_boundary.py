"""The proxy and the streams contract must never pull in torch, transformers, peft or litellm."""

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "peft", "litellm")


@pytest.mark.parametrize("modules", [
    "streams, streams.events, streams.producer, streams.consumer, streams.sink, streams.warehouse, streams.embedded, streams.cli",
    "proxy",
    "deploy.cli",
])
def test_light_imports(modules):
    code = (
        f"import sys, importlib\n"
        f"for m in '{modules}'.split(', '):\n"
        f"    importlib.import_module(m)\n"
        f"for m in {HEAVY!r}:\n"
        f"    assert m not in sys.modules, m + ' was imported'\n"
        f"import proxy, pkgutil\n"
        f"for info in pkgutil.walk_packages(proxy.__path__, 'proxy.'):\n"
        f"    importlib.import_module(info.name)\n"
        f"bad = [m for m in {HEAVY!r} if m in sys.modules]\n"
        f"assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_no_unexpected_pth_files_in_site_packages():
    """litellm 1.82.7/1.82.8 shipped a credential-stealing .pth file; only known .pth files may exist."""
    import site

    allowed_prefixes = ("distutils-precedence", "__editable__", "_virtualenv", "easy-install", "setuptools",
                        "a1_coverage", "coverage", "matplotlib", "protobuf", "zope", "google", "sphinxcontrib",
                        "pywin32", "_onpolicy", "onpolicy")
    from pathlib import Path

    found = []
    for d in site.getsitepackages():
        for pth in Path(d).glob("*.pth"):
            if not pth.name.startswith(allowed_prefixes):
                found.append(pth.name)
    assert not found, f"unexpected .pth files (they run code at interpreter start): {found}"
