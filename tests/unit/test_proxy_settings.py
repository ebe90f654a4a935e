"""Settings: flags > env > one config file; validation errors say how to fix them; import boundary."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from proxy.settings import ProxySettings


def test_config_file_env_and_arguments_layer(tmp_path, monkeypatch):
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text("port: 9001\nupstream_url: http://vllm:8000/v1/\nmodel_list:\n"
                   "  - model_name: gpt-4o-mini\n    litellm_params:\n      model: openai/gpt-4o-mini\n"
                   "      api_key: os.environ/OPENAI_API_KEY\n")
    monkeypatch.setenv("ONPOLICY_PROXY_CONFIG", str(cfg))
    s = ProxySettings()
    assert s.port == 9001 and s.upstream_url == "http://vllm:8000/v1"
    assert s.model_list[0].model_name == "gpt-4o-mini"
    monkeypatch.setenv("ONPOLICY_PROXY_PORT", "9002")
    assert ProxySettings().port == 9002  # env over file
    assert ProxySettings(port=9003).port == 9003  # flags over env
    for ext, text in ((".json", json.dumps({"port": 9004})), (".toml", "port = 9004\n")):
        other = tmp_path / f"p{ext}"
        other.write_text(text)
        monkeypatch.delenv("ONPOLICY_PROXY_PORT")
        assert ProxySettings(config=other).port == 9004
        monkeypatch.setenv("ONPOLICY_PROXY_PORT", "9002")


@pytest.mark.parametrize("kwargs, message", [
    ({"upstream_url": "vllm:8000"}, "must start with http"),
    ({"upstream_url": "http://vllm:8000"}, "must end in /v1"),
    ({"redactor": "nocolon"}, "module:factory"),
    ({"model_list": [{"model_name": "a", "litellm_params": {"model": "gpt"}}]}, "provider/model"),
    ({"model_list": [{"model_name": "a", "litellm_params": {"model": "openai/x"}}] * 2}, "unique"),
    ({"max_body_bytes": 10}, "greater than or equal"),
    ({"config": "/nonexistent/proxy.yaml"}, "does not exist"),
    ({"bogus": 1}, "Extra inputs"),
])
def test_bad_settings_say_how_to_fix(kwargs, message):
    with pytest.raises((ValidationError, ValueError), match=message):
        ProxySettings(**kwargs)


def test_signing_key_from_file_is_created_once(tmp_path):
    s = ProxySettings(interaction_id_key_file=tmp_path / "k" / "key")
    k1 = s.signing_key()
    assert len(k1) == 64 and s.signing_key() == k1
    assert oct((tmp_path / "k" / "key").stat().st_mode)[-3:] == "600"
    with pytest.raises(ValueError, match="at least 16"):
        ProxySettings(interaction_id_key="short").signing_key()


def test_importing_the_proxy_pulls_no_heavy_packages():
    code = ("import sys, proxy.app, proxy.cli, proxy.capture_worker, proxy.hosted, proxy.testing; "
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'litellm') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.stdout.strip() == "[]"


def test_cli_registers_the_proxy_command():
    from deploy.cli import build_parser

    args = build_parser().parse_args(["proxy", "--port", "9100", "--upstream-url", "http://x:1/v1", "--no-capture"])
    from proxy.cli import _settings

    s = _settings(args)
    assert (s.port, s.upstream_url, s.capture) == (9100, "http://x:1/v1", False)


def test_litellm_if_installed_is_not_a_trojaned_release_and_left_no_pth():
    """litellm 1.82.7 and 1.82.8 shipped a credential-stealing .pth file (March 2026)."""
    import importlib.metadata
    import site

    try:
        version = importlib.metadata.version("litellm")
    except importlib.metadata.PackageNotFoundError:
        version = None
    assert version not in ("1.82.7", "1.82.8")
    for d in site.getsitepackages():
        for pth in __import__("pathlib").Path(d).glob("*.pth"):
            assert "litellm" not in pth.name.lower() and "litellm" not in pth.read_text(errors="replace").lower(), pth
