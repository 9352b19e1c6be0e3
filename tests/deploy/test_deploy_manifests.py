"""Static checks of the deployment files: docker-compose.yml against the Compose Specification's JSON schema,
the Kubernetes manifests, the Dockerfile and the Prometheus config. Nothing is built, started or downloaded."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from star_serve.config import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
# compose-spec.json is schema/compose-spec.json of github.com/compose-spec/compose-spec, verbatim (Apache-2.0).
COMPOSE_SCHEMA = Path(__file__).with_name("compose-spec.json")

Doc = dict[str, Any]


# ---- helpers -------------------------------------------------------------------------------------------


def _yaml(path: Path) -> Doc:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), path
    return data


def _compose() -> Doc:
    return _yaml(ROOT / "docker-compose.yml")


def _compose_errors(compose: Doc) -> list[str]:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    return sorted(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose))


def _mounts(service: Doc) -> dict[str, tuple[str, str]]:
    """Container path -> (source, mode) of a service's short-syntax volumes; a source `${NAME:-default}` gives
    its default."""
    out = {}
    for spec in service.get("volumes", []):
        match = re.fullmatch(r"(\$\{[^}]*\}|[^:]+):([^:]+)(?::(\w+))?", spec)
        assert match, spec
        source, target, mode = match.groups()
        if source.startswith("${"):
            source = _interpolation_default(source)
        out[target] = (source, mode or "rw")
    return out


def _interpolation_default(value: str) -> str:
    """The default of a Compose `${NAME:-default}` value."""
    match = re.fullmatch(r"\$\{\w+:-(.*)\}", value)
    assert match, value
    return match.group(1)


def _k8s() -> dict[tuple[str, str], Doc]:
    """(kind, name) -> manifest, over every document of every file the kustomization lists."""
    out = {}
    for resource in _yaml(K8S / "kustomization.yaml")["resources"]:
        for doc in yaml.safe_load_all((K8S / resource).read_text()):
            if doc is not None:
                out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def _only(manifests: dict[tuple[str, str], Doc], kind: str) -> Doc:
    found = [doc for (k, _), doc in manifests.items() if k == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _container(workload: Doc, name: str) -> Doc:
    containers = {c["name"]: c for c in workload["spec"]["template"]["spec"]["containers"]}
    return containers[name]


def _env(container: Doc) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def _container_port(container: Doc, port: int | str) -> int:
    """A probe's or Service's port (a number or a port name) as the container port number."""
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p.get("name") == port)


def _sleep_seconds(pre_stop: Doc) -> float:
    """Seconds a preStop hook waits: the `sleep` action, or an exec of `sleep N` or `time.sleep(N)`."""
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = " ".join(pre_stop["exec"]["command"])
    match = re.search(r"(?:\bsleep\s+|time\.sleep\()(\d+(?:\.\d+)?)", command)
    assert match, f"no sleep in the preStop hook: {command!r}"
    return float(match.group(1))


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined and comments dropped."""
    instructions, current = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        keyword, _, rest = (current + stripped).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        current = ""
    return instructions


def _final_stage(instructions: list[tuple[str, str]]) -> tuple[str, list[tuple[str, str]]]:
    """The final stage's base image (global ARG defaults substituted) and its instructions."""
    global_args: dict[str, str] = {}
    for keyword, rest in instructions:
        if keyword == "FROM":
            break
        if keyword == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            global_args[name] = default.strip('"')
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    image = instructions[last_from][1].split()[0]
    image = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], image)
    return image, instructions[last_from + 1 :]


# ---- docker-compose.yml --------------------------------------------------------------------------------


def test_compose_file_validates_against_the_compose_specification() -> None:
    assert _compose_errors(_compose()) == []


def _unknown_service_key(compose: Doc) -> None:
    compose["services"]["redis"]["restart_policy"] = "always"  # a key of deploy:, not of a service


def _gpu_reservation_without_capabilities(compose: Doc) -> None:
    del compose["services"]["star-serve"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"]


def _unknown_depends_on_condition(compose: Doc) -> None:
    compose["services"]["star-serve"]["depends_on"]["redis"]["condition"] = "healthy"


@pytest.mark.parametrize(
    "breakage", [_unknown_service_key, _gpu_reservation_without_capabilities, _unknown_depends_on_condition]
)
def test_compose_validation_rejects_a_broken_copy(breakage: Callable[[Doc], None]) -> None:
    broken = copy.deepcopy(_compose())
    breakage(broken)
    assert _compose_errors(broken), f"{breakage.__name__} passed validation"


def test_compose_star_serve_reserves_an_nvidia_gpu_and_waits_for_a_healthy_redis() -> None:
    service = _compose()["services"]["star-serve"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d["capabilities"] for d in devices), devices
    assert "profiles" not in service  # started by a plain `docker compose up`
    assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert service["environment"]["STAR_REDIS_URL"] == "redis://redis:6379/0"
    assert service["environment"]["STAR_HOST"] == "0.0.0.0"
    assert _mounts(service)["/models"] == ("./models", "ro")


def test_compose_cpu_service_is_a_profile_built_with_the_cpu_torch_index() -> None:
    services = _compose()["services"]
    cpu = services["star-serve-cpu"]
    assert cpu["profiles"] == ["cpu"]
    assert cpu["build"]["args"]["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert cpu["environment"]["STAR_DEVICE"] == "cpu"
    assert "deploy" not in cpu  # no GPU reservation
    assert cpu["depends_on"]["redis"]["condition"] == "service_healthy"
    assert _mounts(cpu)["/models"] == ("./models", "ro")
    published = {p.split(":")[0] for s in services.values() for p in s.get("ports", [])}
    assert len(published) == sum(len(s.get("ports", [])) for s in services.values()), "a host port used twice"


def test_compose_defaults_are_accepted_by_the_server_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The values the server sees when the shell sets nothing: STAR_MODELS must parse (an empty string would
    not), and Docker must wait longer than the drain before it kills the process."""
    for service in ("star-serve", "star-serve-cpu"):
        environment = _compose()["services"][service]["environment"]
        for name in ("STAR_MODELS", "STAR_DRAIN_TIMEOUT"):
            monkeypatch.setenv(name, _interpolation_default(environment[name]))
        settings = Settings()
        assert settings.models == []
        grace = _compose()["services"][service]["stop_grace_period"]
        assert float(grace.removesuffix("s")) > settings.drain_timeout


def test_compose_redis_persists_with_aof_and_has_a_ping_healthcheck() -> None:
    compose = _compose()
    redis = compose["services"]["redis"]
    command = redis["command"] if isinstance(redis["command"], list) else redis["command"].split()
    assert command[command.index("--appendonly") + 1] == "yes"
    source, _ = _mounts(redis)["/data"]
    assert source in compose["volumes"], "Redis data must be on a named volume"
    assert redis["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]


def test_compose_prometheus_mounts_the_scrape_config_and_the_rules() -> None:
    prometheus = _compose()["services"]["prometheus"]
    source, mode = _mounts(prometheus)["/etc/prometheus"]
    assert (source, mode) == ("./deploy/prometheus", "ro")
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    rules = _yaml(ROOT / "deploy" / "prometheus" / "prometheus.yml")["rule_files"]
    assert "alerts.yml" in rules  # relative to the config file, so inside the same mount


def test_compose_grafana_mounts_provisioning_and_dashboards() -> None:
    grafana = _compose()["services"]["grafana"]
    mounts = _mounts(grafana)
    assert mounts["/etc/grafana/provisioning"] == ("./deploy/grafana/provisioning", "ro")
    provisioning = ROOT / "deploy" / "grafana" / "provisioning"

    datasources = _yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    (default,) = [d for d in datasources if d.get("isDefault")]
    assert (default["type"], default["uid"], default["url"]) == ("prometheus", "prometheus", "http://prometheus:9090")

    (provider,) = _yaml(provisioning / "dashboards" / "star-serve.yml")["providers"]
    assert provider["type"] == "file"
    assert mounts[provider["options"]["path"]] == ("./deploy/grafana/dashboards", "ro")


def test_compose_bind_mounts_of_deploy_files_exist() -> None:
    for name, service in _compose()["services"].items():
        for source, _ in _mounts(service).values():
            if source.startswith("./deploy/"):
                assert (ROOT / source).is_dir(), f"{name} mounts {source}, which does not exist"


# ---- Kubernetes ----------------------------------------------------------------------------------------


def test_k8s_manifests_parse_and_the_kustomization_lists_them_all() -> None:
    listed = set(_yaml(K8S / "kustomization.yaml")["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    kinds = {kind for kind, _ in _k8s()}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "StatefulSet", "PersistentVolumeClaim"} <= kinds
    for doc in _k8s().values():
        assert doc["apiVersion"] and doc["metadata"]["name"]


def test_deployment_probes_check_ready_and_health_on_the_serving_port() -> None:
    deployment = _k8s()[("Deployment", "star-serve")]
    container = _container(deployment, "star-serve")
    assert [p["containerPort"] for p in container["ports"]] == [8000]
    paths = {}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        http = container[probe]["httpGet"]
        assert _container_port(container, http["port"]) == 8000, probe
        paths[probe] = http["path"]
    assert paths == {"startupProbe": "/ready", "readinessProbe": "/ready", "livenessProbe": "/health"}
    startup = container["startupProbe"]
    assert startup["failureThreshold"] * startup.get("periodSeconds", 10) >= 600, "model loading takes minutes"


def test_deployment_requests_and_limits_cpu_memory_and_one_gpu() -> None:
    container = _container(_k8s()[("Deployment", "star-serve")], "star-serve")
    resources = container["resources"]
    for section in ("requests", "limits"):
        assert {"cpu", "memory", "nvidia.com/gpu"} <= resources[section].keys(), section
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1


def test_deployment_grace_period_outlasts_the_pre_stop_hook_and_the_drain() -> None:
    deployment = _k8s()[("Deployment", "star-serve")]
    pod = deployment["spec"]["template"]["spec"]
    container = _container(deployment, "star-serve")
    pre_stop = _sleep_seconds(container["lifecycle"]["preStop"])
    drain = float(_env(container)["STAR_DRAIN_TIMEOUT"])
    assert pre_stop > 0
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain


def test_deployment_runs_two_replicas_against_the_redis_service_with_read_only_models() -> None:
    manifests = _k8s()
    deployment = manifests[("Deployment", "star-serve")]
    pod = deployment["spec"]["template"]
    container = _container(deployment, "star-serve")
    env = _env(container)
    assert deployment["spec"]["replicas"] == 2
    assert env["STAR_HOST"] == "0.0.0.0"

    redis_url = urlsplit(env["STAR_REDIS_URL"])
    redis_service = manifests[("Service", redis_url.hostname or "")]
    assert redis_url.scheme == "redis"
    assert redis_url.port in [p["port"] for p in redis_service["spec"]["ports"]]

    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    (models,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/models"]
    assert models["readOnly"] is True
    claim = volumes[models["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim == "star-models"
    assert ("PersistentVolumeClaim", claim) in manifests

    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8000"


def test_deployment_runs_as_the_image_user() -> None:
    pod = _k8s()[("Deployment", "star-serve")]["spec"]["template"]["spec"]
    _, stage = _final_stage(_dockerfile())
    user = [rest for keyword, rest in stage if keyword == "USER"][-1]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == user.split(":")[0]


def test_hpa_scales_the_deployment() -> None:
    manifests = _k8s()
    hpa = _only(manifests, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
    assert ("Deployment", target["name"]) in manifests
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert "star_requests_waiting" in (K8S / "hpa.yaml").read_text()  # the documented alternative


def test_service_selects_the_deployment_pods_on_the_serving_port() -> None:
    manifests = _k8s()
    deployment = manifests[("Deployment", "star-serve")]
    service = manifests[("Service", "star-serve")]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = service["spec"]["selector"]
    assert selector.items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    (port,) = service["spec"]["ports"]
    assert port["port"] == 8000
    assert _container_port(_container(deployment, "star-serve"), port["targetPort"]) == 8000


def test_redis_is_a_stateful_set_with_aof_on_a_claimed_volume() -> None:
    manifests = _k8s()
    redis = manifests[("StatefulSet", "redis")]
    container = _container(redis, "redis")
    argv = container.get("command", []) + container.get("args", [])
    assert argv[argv.index("--appendonly") + 1] == "yes"
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in container["volumeMounts"]
    service = manifests[("Service", "redis")]
    assert service["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()


# ---- Dockerfile ----------------------------------------------------------------------------------------


def test_dockerfile_runs_star_serve_as_a_non_root_user_on_a_cuda_base() -> None:
    instructions = _dockerfile()
    base, stage = _final_stage(instructions)
    assert base.startswith("nvidia/cuda:") and "-runtime-" in base, base
    last = {keyword: rest for keyword, rest in stage}  # the last of each instruction in the final stage
    user = last["USER"].split(":")[0]
    assert user not in ("root", "0"), user
    assert json.loads(last["ENTRYPOINT"]) + json.loads(last["CMD"]) == ["star-serve", "serve"]
    assert "8000" in last["EXPOSE"].split()
    env = " ".join(rest for keyword, rest in stage if keyword == "ENV")
    assert "STAR_HOST=0.0.0.0" in env
    assert any(keyword == "VOLUME" and "/models" in rest for keyword, rest in stage)


def test_dockerfile_healthcheck_hits_health_with_python() -> None:
    _, stage = _final_stage(_dockerfile())
    (healthcheck,) = [rest for keyword, rest in stage if keyword == "HEALTHCHECK"]
    assert " CMD " in f" {healthcheck} "
    assert "/health" in healthcheck and "urllib" in healthcheck
    assert "curl" not in healthcheck and "wget" not in healthcheck


def test_dockerfile_installs_torch_from_a_configurable_pytorch_index() -> None:
    instructions = _dockerfile()
    args = {}
    for keyword, rest in instructions:
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default.strip('"')
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", args["TORCH_INDEX_URL"])
    runs = [rest for keyword, rest in instructions if keyword == "RUN"]
    assert args["TORCH_REQUIREMENT"].startswith("torch")
    assert any(re.search(r"pip install --index-url \"?\$\{TORCH_INDEX_URL\}", run) for run in runs)
    assert any(re.search(r"pip install \.(\s|$)", run) for run in runs)


def test_dockerignore_keeps_what_the_image_copies() -> None:
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()}
    copied = [rest for keyword, rest in _dockerfile() if keyword == "COPY" and not rest.startswith("--")]
    sources = [source for rest in copied for source in rest.split()[:-1]]
    assert sources, "no COPY from the build context"
    for source in sources:
        assert source not in ignored and (ROOT / source).exists(), source


# ---- Prometheus ----------------------------------------------------------------------------------------


def test_prometheus_loads_the_alert_rules_and_scrapes_port_8000() -> None:
    config = _yaml(ROOT / "deploy" / "prometheus" / "prometheus.yml")
    assert config["global"]["scrape_interval"] == config["global"]["evaluation_interval"] == "15s"
    assert "alerts.yml" in config["rule_files"]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "star-serve"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for static in job["static_configs"] for t in static["targets"]]
    assert set(targets) == {"star-serve:8000", "star-serve-cpu:8000"}
    assert set(t.split(":")[0] for t in targets) <= _compose()["services"].keys()


def test_the_gateway_example_picks_pods_by_metrics_star_serve_exports() -> None:
    gateway = K8S / "gateway"
    docs = {}
    for resource in _yaml(gateway / "kustomization.yaml")["resources"]:
        for doc in yaml.safe_load_all((gateway / resource).read_text()):
            docs[(doc["kind"], doc["metadata"]["name"])] = doc
    assert {p.name for p in gateway.glob("*.yaml")} - {"kustomization.yaml"} == set(
        _yaml(gateway / "kustomization.yaml")["resources"]
    )
    pool = docs[("InferencePool", "star-serve")]["spec"]
    server = _k8s()[("Deployment", "star-serve")]["spec"]["template"]["metadata"]["labels"]
    assert pool["selector"]["matchLabels"].items() <= server.items()
    assert pool["targetPorts"] == [{"number": 8000}]
    picker = _container(docs[("Deployment", "star-serve-epp")], "epp")
    flags = dict(arg.removeprefix("--").split("=", 1) for arg in picker["args"])
    assert flags["pool-name"] == "star-serve" and pool["endpointPickerRef"]["name"] == "star-serve-epp"
    exported = (ROOT / "star_serve" / "metrics.py").read_text()
    for flag in (
        "total-queued-requests-metric",
        "total-running-requests-metric",
        "kv-cache-usage-percentage-metric",
        "lora-info-metric",
    ):
        assert f'"{flags[flag]}"' in exported, f"{flag}: star-serve exports no {flags[flag]}"
    [rule] = docs[("HTTPRoute", "star-serve")]["spec"]["rules"]
    assert rule["backendRefs"][0]["kind"] == "InferencePool" and rule["backendRefs"][0]["name"] == "star-serve"


def _dropped_by_grafana_schema(dashboard: Doc) -> list[str]:
    """The fields of `dashboard` that Grafana's dashboard schema (the Grafana foundation SDK's types) does not
    keep, or keeps with another value, when it reads the dashboard and writes it back."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    written = json.loads(json.dumps(Dashboard.from_json(copy.deepcopy(dashboard)), cls=JSONEncoder))
    lost: list[str] = []

    def compare(ours: Any, theirs: Any, path: str) -> None:
        if isinstance(ours, dict) and isinstance(theirs, dict):
            for key, value in ours.items():
                if key in theirs:
                    compare(value, theirs[key], f"{path}/{key}")
                else:
                    lost.append(f"{path}/{key}")
        elif isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
            for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
                compare(a, b, f"{path}[{i}]")
        elif ours != theirs:
            lost.append(f"{path}: {ours!r} read as {theirs!r}")

    compare(dashboard, written, "")
    return lost


def test_the_dashboard_is_what_grafanas_dashboard_schema_reads() -> None:
    """Grafana cannot be installed here; its schema's types read the dashboard and write back every field."""
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/star-serve.json").read_text())
    assert len(dashboard["panels"]) >= 10
    assert _dropped_by_grafana_schema(dashboard) == []


def test_the_dashboard_schema_check_notices_a_misnamed_field() -> None:
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/star-serve.json").read_text())
    dashboard["panels"][0]["gridPosition"] = dashboard["panels"][0].pop("gridPos")
    dashboard["refersh"] = dashboard.pop("refresh")
    assert _dropped_by_grafana_schema(dashboard) == ["/panels[0]/gridPosition", "/refersh"]
