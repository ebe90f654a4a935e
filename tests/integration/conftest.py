# TEMPORARY dev override (not committed): reuse an already running vLLM.
import pytest, types
@pytest.fixture(scope="session")
def vllm_server():
    url, model = open("/tmp/vllm_dev.url").read().split()
    return types.SimpleNamespace(base_url=url, model=model, port=int(url.rsplit(":",1)[1].split("/")[0]))
