"""deploy/compose.yaml and deploy/k8s/, checked without a Docker engine or a cluster.

- compose.yaml validates against the Compose Specification schema (vendored in deploy/schemas/, with
  compose's own duration format checked), and every Kubernetes object in deploy/k8s/ validates strictly
  (unknown fields rejected) against the schemas bundled in ``kubernetes-validate``;
- mutated copies are rejected, so a validator that accepts anything fails here;
- every ONPOLICY_* variable a container sets is a real setting of the component it runs: the test builds
  that component's settings classes from exactly the container's environment and checks that each value
  lands in the field its name points at (a misspelt name, or one the component ignores, fails);
- every container's argument list parses with the real ``onpolicy`` CLI;
- vLLM runs with learner/serving.py's ``server_args`` / ``server_env`` (GPU), serves the model the learner
  trains, and accepts the trainer's LoRA rank;
- the docs name only metrics the code exports;
- the cross-file promises the comments make: spool on a per-replica volume larger than the spool budget,
  grace periods that cover the proxy's drain, the adapter volume at one path everywhere, GPUs where they
  belong, placeholder-only secrets, images that are the Dockerfile's targets.
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import hashlib
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel, SecretStr

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_SCHEMA = DEPLOY / "schemas" / "compose-spec.json"
# deploy/schemas/README.md says where the file came from; an edit to it must be deliberate.
COMPOSE_SCHEMA_SHA256 = "0dc04bd346dcfee1b1419628fff79937bbf076925f298f272a2b490e2b112bac"
# The oldest Kubernetes minor we promise to run on (persistentVolumeClaimRetentionPolicy is GA in 1.32).
K8S_VERSION = "1.32"
# The onpolicy containers: compose services and Kubernetes workloads that run `onpolicy <command>`.
APP_SERVICES = ("proxy", "sink", "status", "learner")
APP_WORKLOADS = (("StatefulSet", "onpolicy-proxy"), ("Deployment", "onpolicy-sink"), ("Deployment", "onpolicy-status"),
                 ("Deployment", "onpolicy-learner"))
# What the compose file's ${...} interpolation needs; the values are arbitrary.
COMPOSE_ENV = {"CLICKHOUSE_PASSWORD": "test-password"}
# Environment variables that are not pydantic settings but are read by the code, with how to read back
# the value the code would use.
NON_SETTING_ENV = {"ONPOLICY_HOME": lambda: str(__import__("streams.settings").settings.default_home())}
# How long the proxy waits for its capture worker at shutdown, read from proxy/app.py
# (``worker.close(timeout_s=...)``) so a change there reaches the grace-period check.
CAPTURE_WORKER_CLOSE_S = float(re.search(r"worker\.close\(timeout_s=([0-9.]+)\)",
                                         (ROOT / "proxy" / "app.py").read_text()).group(1))
# Spool directories per proxy, each bounded by the producer's disk budget: the capture spool and the
# feedback/admin APIs' "<spool>-api" (proxy/apis.py).
SPOOLS_PER_PROXY = 2


# --- loading -----------------------------------------------------------------------------------------

def _interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error} and $$, as `docker compose` applies
    them before validating."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1), m.group(2), m.group(3)
        current = env.get(name)
        if op in (":-", "-"):
            return current if current or (op == "-" and current is not None) else arg
        if op in (":?", "?"):
            if not current:
                raise ValueError(f"compose requires {name}: {arg}")
            return current
        if current is None:
            raise ValueError(f"{name} is unset (compose would substitute an empty string)")
        return current

    return re.sub(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}", sub, value)


@functools.cache
def _compose_raw() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _compose(env: dict[str, str] | None = None) -> dict:
    """The compose file as `docker compose` sees it after interpolation (a fresh copy each call)."""
    return _interpolate(_compose_raw(), COMPOSE_ENV if env is None else env)


@functools.cache
def _k8s_docs() -> tuple[tuple[str, dict], ...]:
    """Every YAML document in deploy/k8s/, parsed once; callers that mutate one copy it first."""
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return tuple(docs)


def _k8s_objects() -> list[tuple[str, dict]]:
    return [(name, doc) for name, doc in _k8s_docs() if doc["kind"] != "Kustomization"]


def _k8s(kind: str, name: str) -> dict:
    found = [d for _, d in _k8s_objects() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name} in deploy/k8s/, found {len(found)}"
    return found[0]


@functools.cache
def _compose_validator() -> jsonschema.protocols.Validator:
    schema = yaml.safe_load(COMPOSE_SCHEMA.read_text())
    # The schema declares draft 2019-09 (with a trailing '#' that jsonschema does not look up by itself).
    assert schema["$schema"].startswith("http://json-schema.org/draft/2019-09/schema")
    # Compose durations are Go durations ("10s", "1m30s"), not ISO 8601: check them as compose would.
    formats = jsonschema.FormatChecker(formats=())
    formats.checks("duration")(lambda v: not isinstance(v, str) or re.fullmatch(
        r"(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+", v) is not None)
    return jsonschema.Draft201909Validator(schema, format_checker=formats)


def _compose_errors(doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _compose_validator().iter_errors(doc)]


def _k8s_error(doc: dict, version: str = K8S_VERSION) -> str | None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return f"{'.'.join(map(str, exc.path))}: {exc.message}"
    return None


# --- schema validation -------------------------------------------------------------------------------

def test_vendored_compose_schema_is_the_recorded_one():
    assert hashlib.sha256(COMPOSE_SCHEMA.read_bytes()).hexdigest() == COMPOSE_SCHEMA_SHA256


def test_compose_file_matches_the_compose_specification():
    assert _compose_errors(_compose()) == []


def test_compose_refuses_to_start_without_its_required_secret_values():
    with pytest.raises(ValueError, match="CLICKHOUSE_PASSWORD"):
        _compose(env={})


def _set(doc: dict, path: tuple, value: Any) -> dict:
    doc = copy.deepcopy(doc)
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


def _rename(doc: dict, path: tuple, new_key: str) -> dict:
    doc = copy.deepcopy(doc)
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[new_key] = node.pop(path[-1])
    return doc


@pytest.mark.parametrize("mutate,reason", [
    pytest.param(lambda c: _rename(c, ("services", "proxy", "healthcheck"), "healthchek"), "services/proxy: 'healthchek'",
                 id="misspelt-service-key"),
    pytest.param(lambda c: _set(c, ("services", "kafka", "healthcheck", "interval"), "10 seconds"),
                 "interval: '10 seconds' is not a 'duration'", id="bad-duration"),
    pytest.param(lambda c: _set(c, ("services", "vllm", "deploy", "resources", "reservations", "devices", 0, "count"), [1]),
                 "devices/0/count", id="wrong-type-gpu-count"),
    pytest.param(lambda c: _set(c, ("services", "sink", "depends_on", "kafka", "condition"), "service_ready"),
                 "services/sink/depends_on", id="unknown-depends-on-condition"),
    pytest.param(lambda c: _set(c, ("volumes", "proxy-spool"), {"driver": "local", "size": "4Gi"}),
                 "volumes/proxy-spool: 'size'", id="unknown-volume-key"),
])
def test_compose_schema_rejects_a_broken_file(mutate, reason):
    errors = _compose_errors(mutate(_compose()))
    # Exactly the mutation is reported: the rest of the file stays valid.
    assert len(errors) == 1 and reason in errors[0], errors


@pytest.mark.parametrize("where,doc", _k8s_objects(), ids=lambda x: x if isinstance(x, str) else
                         f"{x['kind']}/{x['metadata']['name']}")
def test_k8s_object_matches_the_kubernetes_schema(where, doc):
    # The oldest version we support and the newest the validator knows (an API removed since fails there).
    # SchemaNotFoundError (an unknown kind or apiVersion) propagates and fails the test.
    for version in (K8S_VERSION, kubernetes_validate.utils.latest_version()):
        assert _k8s_error(doc, version) is None, version


def _proxy_container(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("mutate,reason", [
    pytest.param(lambda d: _rename(d, ("spec", "template", "spec", "containers", 0, "readinessProbe"), "readinesProbe"),
                 "'readinesProbe' was unexpected", id="misspelt-container-field"),
    pytest.param(lambda d: _set(d, ("spec", "replicas"), "three"), "spec.replicas:", id="wrong-type-replicas"),
    pytest.param(lambda d: _set(d, ("spec", "template", "spec", "containers", 0, "readinessProbe", "httpGet", "port"), 8.5),
                 "readinessProbe.httpGet.port:", id="wrong-type-probe-port"),
    pytest.param(lambda d: (lambda x: (x["spec"]["template"]["spec"]["containers"][0].pop("name"), x)[1])(copy.deepcopy(d)),
                 "'name' is a required property", id="container-without-name"),
])
def test_kubernetes_schema_rejects_a_broken_manifest(mutate, reason):
    error = _k8s_error(mutate(_k8s("StatefulSet", "onpolicy-proxy")))
    assert error is not None and reason in error, error


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)


# --- environment variables are real settings ---------------------------------------------------------

def _component_settings(command: str) -> list[tuple[str, BaseModel]]:
    """(env prefix, settings object) roots for what ``onpolicy <command>`` builds, read from os.environ now."""
    from streams.settings import KafkaSettings, SinkSettings, WarehouseSettings

    if command == "proxy":
        from proxy.settings import ProxySettings

        s = ProxySettings()
        # The nested objects are also read from their own prefixes by their default factories.
        return [("ONPOLICY_PROXY_", s), ("ONPOLICY_KAFKA_", s.kafka), ("ONPOLICY_PRODUCER_", s.producer)]
    if command == "sink":
        return [("ONPOLICY_KAFKA_", KafkaSettings()), ("ONPOLICY_SINK_", SinkSettings()),
                ("ONPOLICY_WAREHOUSE_", WarehouseSettings())]
    if command == "status-page":
        return [("ONPOLICY_WAREHOUSE_", WarehouseSettings())]
    if command == "learner":
        # learner/loop_cli.py reads the warehouse settings only (and ONPOLICY_HOME); when the publisher is
        # wired in, its settings join this list.
        return [("ONPOLICY_WAREHOUSE_", WarehouseSettings())]
    raise AssertionError(f"no settings known for `onpolicy {command}`")


def _same(env_value: str, value: Any) -> bool:
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, bool):
        return env_value.strip().lower() in ("1", "true", "yes", "on") if value else env_value.strip().lower() in ("0", "false", "no", "off")
    if isinstance(value, (int, float)):
        return float(env_value) == float(value)
    if isinstance(value, Path):
        return Path(env_value) == value
    return env_value == value


def _check_env(command: str, env: dict[str, str], monkeypatch) -> list[str]:
    """Problems with the ONPOLICY_* variables in ``env`` for ``onpolicy <command>``; empty when all are real."""
    for name in [n for n in os.environ if n.startswith("ONPOLICY_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    roots = _component_settings(command)
    problems = []
    for name, env_value in env.items():
        if not name.startswith("ONPOLICY_"):
            continue
        if name in NON_SETTING_ENV:
            if NON_SETTING_ENV[name]() != env_value:
                problems.append(f"{name}={env_value!r} does not reach the code")
            continue
        root = next(((p, s) for p, s in roots if name.startswith(p)), None)
        if root is None:
            problems.append(f"{name}: `onpolicy {command}` reads no settings with this prefix")
            continue
        node: Any = root[1]
        for part in name[len(root[0]):].lower().split("__"):
            if not isinstance(node, BaseModel) or part not in type(node).model_fields:
                problems.append(f"{name}: {part!r} is not a field of {type(node).__name__}")
                break
            node = getattr(node, part)
        else:
            if not _same(env_value, node):
                problems.append(f"{name}={env_value!r} is ignored by `onpolicy {command}` (it uses {node!r})")
    return problems


def _compose_app_services() -> dict[str, dict]:
    return {n: s for n, s in _compose()["services"].items() if n in APP_SERVICES}


@pytest.mark.parametrize("service", APP_SERVICES)
def test_compose_env_vars_are_real_settings(service, monkeypatch):
    svc = _compose_app_services()[service]
    assert _check_env(svc["command"][0], svc["environment"], monkeypatch) == []


def _k8s_container_env(workload: dict) -> tuple[str, dict[str, str]]:
    """(command, resolved environment) of a workload's first container, with ConfigMap/Secret refs resolved."""
    container = workload["spec"]["template"]["spec"]["containers"][0]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(_k8s("ConfigMap", source["configMapRef"]["name"])["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "secretKeyRef" in item.get("valueFrom", {}):
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = _k8s("Secret", ref["name"])["stringData"][ref["key"]]
        else:
            ref = item["valueFrom"]["configMapKeyRef"]
            env[item["name"]] = _k8s("ConfigMap", ref["name"])["data"][ref["key"]]
    return container["args"][0], env


@pytest.mark.parametrize("kind,name", APP_WORKLOADS)
def test_k8s_env_vars_are_real_settings(kind, name, monkeypatch):
    command, env = _k8s_container_env(_k8s(kind, name))
    assert _check_env(command, env, monkeypatch) == []


@pytest.mark.parametrize("extra,expected", [
    # Loses to the nested ONPOLICY_PROXY_PRODUCER__SPOOL_DIR the manifest also sets.
    ({"ONPOLICY_PRODUCER_SPOOL_DIR": "/var/lib/onpolicy/elsewhere"}, "is ignored"),
    ({"ONPOLICY_PROXY_UPSTREAM_URI": "http://vllm:8000/v1"}, "not a field"),
    ({"ONPOLICY_LEARNER_TYPO": "1"}, "no settings with this prefix"),
])
def test_env_check_rejects_settings_the_code_does_not_have(extra, expected, monkeypatch):
    command, env = _k8s_container_env(_k8s("StatefulSet", "onpolicy-proxy"))
    problems = _check_env(command, {**env, **extra}, monkeypatch)
    assert len(problems) == 1 and expected in problems[0], problems


def test_env_check_catches_the_flat_producer_spool_dir_on_the_proxy(monkeypatch):
    """The trap the manifests avoid: on its own, ONPOLICY_PRODUCER_SPOOL_DIR does not move the proxy's spool
    (ProxySettings builds its producer with a spool path of its own; the flat variable applies only when
    some ONPOLICY_PROXY_PRODUCER__* variable is also set). The spool would land off the volume."""
    command, env = _k8s_container_env(_k8s("StatefulSet", "onpolicy-proxy"))
    flat = {k: v for k, v in env.items() if not k.startswith("ONPOLICY_PROXY_PRODUCER__")}
    flat["ONPOLICY_PRODUCER_SPOOL_DIR"] = env["ONPOLICY_PROXY_PRODUCER__SPOOL_DIR"]
    problems = _check_env(command, flat, monkeypatch)
    assert len(problems) == 1 and problems[0].startswith("ONPOLICY_PRODUCER_SPOOL_DIR=") and "is ignored" in problems[0], problems


def test_every_container_command_parses_as_onpolicy_arguments(capsys):
    """The containers run `onpolicy <args>` (the Dockerfile's ENTRYPOINT): each argument list must parse,
    subcommand and flags, with the real CLI."""
    from deploy.cli import build_parser

    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert dockerfile.count('ENTRYPOINT ["onpolicy"]') == 2
    argvs = [s["command"] for s in _compose_app_services().values()]
    argvs += [_k8s(k, n)["spec"]["template"]["spec"]["containers"][0]["args"] for k, n in APP_WORKLOADS]
    for argv in argvs:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"`onpolicy {' '.join(argv)}` does not parse: {capsys.readouterr().err.strip()}")
        assert getattr(args, "func", None) is not None, argv
    with pytest.raises(SystemExit):  # the check itself can fail
        build_parser().parse_args(["learner", "run", "--modle", "x"])


# --- vLLM: the exact flags of learner/serving.py -----------------------------------------------------

def _expected_vllm(monkeypatch, model: str) -> tuple[list[str], dict[str, str]]:
    """vLLM's arguments and environment as learner/serving.py builds them (ServingSettings defaults)."""
    from learner.serving import ServingSettings, server_args, server_env

    for name in [n for n in os.environ if n.startswith("ONPOLICY_")]:
        monkeypatch.delenv(name)
    settings = ServingSettings()
    return (server_args(f"/models/{model}", model, settings, host="0.0.0.0", port=8000),
            server_env(settings, cpu=False))


def _flag(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_compose_vllm_runs_serving_flags(monkeypatch):
    services = _compose()["services"]
    vllm = services["vllm"]
    args, env = _expected_vllm(monkeypatch, "smollm2-135m-instruct")
    assert vllm["entrypoint"] == ["vllm", "serve"]
    assert vllm["command"] == args
    assert {k: str(v) for k, v in vllm["environment"].items()} == env
    assert vllm["image"].startswith("vllm/vllm-openai:")


def test_k8s_vllm_runs_serving_flags(monkeypatch):
    container = _k8s("StatefulSet", "vllm")["spec"]["template"]["spec"]["containers"][0]
    args, env = _expected_vllm(monkeypatch, "smollm2-135m-instruct")
    assert container["command"] == ["vllm", "serve"]
    assert container["args"] == args
    assert {e["name"]: e["value"] for e in container["env"]} == env


def test_learner_trains_what_vllm_serves_within_its_lora_limits():
    """The learner's --model is vLLM's served model, and the trainer's LoRA rank fits --max-lora-rank
    (vLLM answers 500 to a load above it; the publisher refuses it first)."""
    services = _compose()["services"]
    learner_args = _k8s("Deployment", "onpolicy-learner")["spec"]["template"]["spec"]["containers"][0]["args"]
    vllm_args = _k8s("StatefulSet", "vllm")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert _flag(services["learner"]["command"], "--model") == _flag(services["vllm"]["command"], "--served-model-name")
    assert _flag(learner_args, "--model") == _flag(vllm_args, "--served-model-name")
    lora_r = _trainer_default("lora_r")
    for vllm in (services["vllm"]["command"], vllm_args):
        assert lora_r <= int(_flag(vllm, "--max-lora-rank"))


def _trainer_default(field: str) -> Any:
    """A TrainerSettings default read from learner/trainer.py's source: importing it imports torch (seconds)."""
    import ast

    tree = ast.parse((ROOT / "learner" / "trainer.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TrainerSettings")
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == field:
            return ast.literal_eval(node.value)
    raise AssertionError(f"TrainerSettings has no field {field!r}")


def test_vllm_reaches_adapters_at_the_learners_path_read_only():
    services = _compose()["services"]

    def mounts(svc: dict) -> dict[str, dict]:
        out = {}
        for v in svc["volumes"]:
            if isinstance(v, str):
                source, target = v.split(":")[:2]
                v = {"source": source, "target": target, "read_only": v.endswith(":ro")}
            out[v["source"]] = v
        return out

    vllm, learner = mounts(services["vllm"])["adapters"], mounts(services["learner"])["adapters"]
    assert vllm["target"] == learner["target"] and vllm.get("read_only") and not learner.get("read_only")

    def k8s_mount(kind: str, name: str) -> dict:
        pod = _k8s(kind, name)["spec"]["template"]["spec"]
        volume = next(v["name"] for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == "onpolicy-adapters")
        return next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume)

    vllm, learner = k8s_mount("StatefulSet", "vllm"), k8s_mount("Deployment", "onpolicy-learner")
    assert vllm["mountPath"] == learner["mountPath"] == services["vllm"]["volumes"][1]["target"]
    assert vllm.get("readOnly") and not learner.get("readOnly")
    assert _k8s("PersistentVolumeClaim", "onpolicy-adapters")["spec"]["accessModes"] == ["ReadWriteMany"]


def test_gpus_for_vllm_and_learner_only():
    services = _compose()["services"]
    for name, svc in services.items():
        devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        assert (name in ("vllm", "learner")) == any("gpu" in d.get("capabilities", []) for d in devices), name
    for kind, name in (("StatefulSet", "vllm"), ("Deployment", "onpolicy-learner")):
        res = _k8s(kind, name)["spec"]["template"]["spec"]["containers"][0]["resources"]
        assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "1"
    for kind, name in (("StatefulSet", "onpolicy-proxy"), ("Deployment", "onpolicy-sink")):
        res = _k8s(kind, name)["spec"]["template"]["spec"]["containers"][0]["resources"]
        assert "nvidia.com/gpu" not in {**res.get("requests", {}), **res.get("limits", {})}


# --- the proxy's spool, probes and drain --------------------------------------------------------------

_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def _bytes(quantity: str) -> int:
    m = re.fullmatch(r"(\d+)([KMGT]i?|k)?", quantity)
    assert m, f"unsupported quantity {quantity!r}"
    return int(m.group(1)) * _UNITS.get(m.group(2) or "", 1)


def _proxy_settings(env: dict[str, str], monkeypatch):
    for name in [n for n in os.environ if n.startswith("ONPOLICY_")]:
        monkeypatch.delenv(name)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    from proxy.settings import ProxySettings

    return ProxySettings()


def test_k8s_proxy_spool_is_on_its_own_volume_larger_than_the_budget(monkeypatch):
    sts = _k8s("StatefulSet", "onpolicy-proxy")
    _, env = _k8s_container_env(sts)
    settings = _proxy_settings(env, monkeypatch)
    templates = {t["metadata"]["name"]: t for t in sts["spec"]["volumeClaimTemplates"]}
    mount = next(m for m in _proxy_container(sts)["volumeMounts"] if m["name"] in templates)
    spool = PurePosixPath(str(settings.producer.spool_dir))
    # <spool>.capture-stats.json and the APIs' <spool>-api sit beside the spool: the mount is its parent.
    assert spool.parent == PurePosixPath(mount["mountPath"])
    claim = templates[mount["name"]]["spec"]
    assert claim["accessModes"] == ["ReadWriteOnce"]
    # Segments are written before the budget check trims them: keep at least a quarter of headroom.
    assert _bytes(claim["resources"]["requests"]["storage"]) >= 1.25 * SPOOLS_PER_PROXY * settings.producer.disk_budget_bytes
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == "Retain"


def test_compose_proxy_spool_is_on_a_named_volume(monkeypatch):
    proxy = _compose()["services"]["proxy"]
    settings = _proxy_settings(proxy["environment"], monkeypatch)
    source, target = proxy["volumes"][0].split(":")
    assert source in _compose()["volumes"]
    assert PurePosixPath(str(settings.producer.spool_dir)).parent == PurePosixPath(target)


def test_proxy_probes_hit_routes_the_proxy_serves(tmp_path):
    from proxy.app import create_app
    from proxy.settings import ProxySettings

    app = create_app(ProxySettings(capture=False, follow_control=False, interaction_id_key="k" * 32,
                                   interaction_id_key_file=tmp_path / "unused"))
    served = {r.resource.canonical for r in app.router.routes() if r.method == "GET"}
    container = _proxy_container(_k8s("StatefulSet", "onpolicy-proxy"))
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz" and "/readyz" in served
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz" and "/healthz" in served
    assert "/readyz" in " ".join(_compose()["services"]["proxy"]["healthcheck"]["test"])


def test_grace_periods_cover_the_proxy_drain(monkeypatch):
    sts = _k8s("StatefulSet", "onpolicy-proxy")
    _, env = _k8s_container_env(sts)
    settings = _proxy_settings(env, monkeypatch)
    pre_stop = int(_proxy_container(sts)["lifecycle"]["preStop"]["exec"]["command"][-1])
    needed = pre_stop + settings.shutdown_grace_s + CAPTURE_WORKER_CLOSE_S
    assert sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= needed
    compose_proxy = _compose()["services"]["proxy"]
    compose_settings = _proxy_settings(compose_proxy["environment"], monkeypatch)
    assert int(compose_proxy["stop_grace_period"].rstrip("s")) >= compose_settings.shutdown_grace_s + CAPTURE_WORKER_CLOSE_S


def test_every_long_running_container_has_probes_and_resources():
    for kind, name in (("StatefulSet", "onpolicy-proxy"), ("Deployment", "onpolicy-sink"), ("StatefulSet", "vllm"),
                       ("Deployment", "onpolicy-status")):
        container = _k8s(kind, name)["spec"]["template"]["spec"]["containers"][0]
        assert "readinessProbe" in container and "livenessProbe" in container, name
    for _, doc in _k8s_objects():
        if doc["kind"] in ("Deployment", "StatefulSet"):
            for container in doc["spec"]["template"]["spec"]["containers"]:
                res = container["resources"]
                assert {"cpu", "memory"} <= set(res["requests"]) and "memory" in res["limits"], doc["metadata"]["name"]
    for name in ("kafka", "clickhouse", "vllm", "proxy", "sink", "status"):
        assert "healthcheck" in _compose()["services"][name], name


# --- secrets and images --------------------------------------------------------------------------------

def test_secrets_are_placeholders_only():
    for _, doc in _k8s_objects():
        if doc["kind"] == "Secret":
            assert "data" not in doc, "base64 `data` hides what is committed: use stringData placeholders"
            for key, value in doc["stringData"].items():
                assert "REPLACE_ME" in value, f"Secret {doc['metadata']['name']}/{key} holds a value, not a placeholder"
    compose = _compose()
    for name, secret in compose["secrets"].items():
        assert set(secret) == {"file"} and secret["file"].startswith("./secrets/"), name
    # Keys and tokens reach the proxy as files, never as values in the manifest.
    for value_var in ("ONPOLICY_PROXY_INTERACTION_ID_KEY", "ONPOLICY_PROXY_ADMIN_TOKEN", "ONPOLICY_PROXY_API_KEYS"):
        assert value_var not in compose["services"]["proxy"]["environment"], value_var
    assert compose["services"]["proxy"]["environment"]["ONPOLICY_PROXY_INTERACTION_ID_KEY_FILE"] == "/run/secrets/interaction_id_key"


def test_secret_files_the_proxy_reads_are_mounted():
    """Each ONPOLICY_PROXY_*_FILE names a file that the manifest actually mounts from a secret."""
    proxy = _compose()["services"]["proxy"]
    file_vars = {k: v for k, v in proxy["environment"].items() if k.endswith("_FILE")}
    assert set(file_vars) == {"ONPOLICY_PROXY_INTERACTION_ID_KEY_FILE", "ONPOLICY_PROXY_ADMIN_TOKEN_FILE",
                              "ONPOLICY_PROXY_API_KEYS_FILE"}
    for name, path in file_vars.items():
        assert PurePosixPath(path).parent == PurePosixPath("/run/secrets"), name
        assert PurePosixPath(path).name in proxy["secrets"], f"{name}: secret {PurePosixPath(path).name} is not given to the proxy"

    sts = _k8s("StatefulSet", "onpolicy-proxy")
    _, env = _k8s_container_env(sts)
    pod = sts["spec"]["template"]["spec"]
    secret_volumes = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    mounts = {m["mountPath"]: secret_volumes[m["name"]] for m in _proxy_container(sts)["volumeMounts"]
              if m["name"] in secret_volumes}
    k8s_file_vars = {k: v for k, v in env.items() if k.endswith("_FILE")}
    assert set(k8s_file_vars) == set(file_vars)
    for name, path in k8s_file_vars.items():
        volume = mounts.get(str(PurePosixPath(path).parent))
        assert volume is not None, f"{name}: nothing is mounted at {PurePosixPath(path).parent}"
        item = next((i for i in volume["items"] if i["path"] == PurePosixPath(path).name), None)
        assert item is not None, f"{name}: {PurePosixPath(path).name} is not an item of the mounted secret"
        assert item["key"] in _k8s("Secret", volume["secretName"])["stringData"], name


def test_images_are_the_dockerfile_targets():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    targets = set(re.findall(r"^FROM \S+ AS (\S+)$", dockerfile, re.M))
    services = _compose()["services"]
    images = {}
    for name in APP_SERVICES:
        build = services[name]["build"]
        assert build["dockerfile"] == "deploy/Dockerfile" and build["target"] in targets, name
        images[build["target"]] = services[name]["image"]
    assert services["proxy"]["build"]["target"] == services["sink"]["build"]["target"] == services["status"]["build"]["target"] == "app"
    for kind, name, target in (("StatefulSet", "onpolicy-proxy", "app"), ("Deployment", "onpolicy-sink", "app"),
                               ("Deployment", "onpolicy-status", "app"), ("Deployment", "onpolicy-learner", "learner")):
        assert _k8s(kind, name)["spec"]["template"]["spec"]["containers"][0]["image"] == images[target], name
    # The proxy/sink image installs the base dependencies (`pip install .`): none of them may pull the
    # training stack. (Resolving `pip install --dry-run .` in a fresh venv listed 38 packages, no torch.)
    import tomllib

    base = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    heavy = [d for d in base if re.split(r"[\[=<>!~ ;]", d, maxsplit=1)[0].lower() in ("torch", "transformers", "peft", "litellm", "vllm")]
    assert not heavy, f"base dependencies pull the training/hosted stack into the proxy image: {heavy}"
    # The proxy/sink image carries no torch; only the learner target installs it, pinned.
    app_stage = dockerfile.split("AS app")[1].split("FROM ")[0]
    app_commands = [line for line in app_stage.splitlines() if not line.lstrip().startswith("#")]
    assert "torch" not in "\n".join(app_commands).replace('! python -c "import torch"', "")
    assert "torch==2.13.0" in dockerfile.split("AS learner")[1]


# --- docs name only metrics the code exports ------------------------------------------------------------

def _exported_metric_names() -> set[str]:
    """Every metric name the proxy (with its feedback/admin APIs), the producer, the sink and the publisher expose, as Prometheus shows it
    (counters with ``_total``), collected from the real collectors over stand-in state."""
    from types import SimpleNamespace as NS

    from prometheus_client import REGISTRY, CollectorRegistry

    import learner.metrics  # noqa: F401  (the learner's loop, gate, shadow and canary metrics)
    import learner.publisher  # noqa: F401  (registers the publisher's metrics in the default registry)
    from proxy.apis import ApiMetrics
    from proxy.metrics import CaptureCollector, ProxyMetrics
    from streams.producer import ProducerCollector
    from streams.reconcile import ReconcileCollector, Reconciliation
    from streams.sink import SinkCollector

    proxy = ProxyMetrics()
    capture = NS(emitted=0, dropped=0, failed=0, queue_bytes=0, restarts=0, lost_bytes=0, redactor=None,
                 worker_stats=lambda: {"connected": True})
    proxy.registry.register(CaptureCollector(capture, NS(table=NS(routes={}, offset=-1), bad_events=0)))
    ApiMetrics(proxy.registry)
    others = CollectorRegistry()
    stats = dict.fromkeys(("accepted", "sent", "spooled", "replayed", "overflowed", "dropped", "send_failures",
                           "corrupt_records", "spool_bytes", "backlog_bytes"), 0)
    others.register(ProducerCollector(NS(stats=lambda: stats, connected=True)))
    now = dt.datetime.now(dt.timezone.utc)
    others.register(ReconcileCollector(NS(last=Reconciliation(start=now, end=now, latest_tally=now), lookback_s=900.0,
                                          settle_s=120.0, last_success_ts=0.0, failures=0)))
    others.register(SinkCollector(NS(landed={}, dead_letters=0, consumer=NS(failures=0, failing=False), last_batch_s=0.0)))
    names = set()
    for registry in (proxy.registry, others, REGISTRY):
        for family in registry.collect():
            names.add(family.name + "_total" if family.type == "counter" else family.name)
    return {n for n in names if n.startswith("onpolicy_")}


@pytest.mark.parametrize("doc", ["docs/operations.md", "docs/scaling.md"])
def test_docs_name_only_metrics_the_code_exports(doc):
    exported = _exported_metric_names()
    assert {"onpolicy_proxy_capture_dropped_total", "onpolicy_sink_failing", "onpolicy_producer_spool_bytes"} <= exported
    text = (ROOT / doc).read_text()
    # operations.md also names Docker volumes (onpolicy_models): read its metrics section only.
    text = text[text.index("## Metrics"):] if "## Metrics" in text else text
    named = set(re.findall(r"\bonpolicy_[a-z0-9_]+", text))
    unknown = sorted(n for n in named if not (n in exported or (n.endswith("_") and any(e.startswith(n) for e in exported))))
    assert not unknown, f"{doc} names metrics the code does not export: {unknown}"
