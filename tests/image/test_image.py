"""The container image and the compose stack, built and run (`make image-test`; not in the default run).

The image: `scripts/image-base` makes a Debian base with debootstrap (cached in the engine's store), star-serve's
CPU image is built on it (torch's CPU wheel served from this machine, where the PyTorch index is out of reach),
run as its own non-root user with the demo models mounted read-only, asked for a completion and a
classification with the openai client, read for /metrics and its HEALTHCHECK, and stopped with SIGTERM while a
request is in flight: the request finishes and the container exits 0.

The stack: docker-compose.yml with deploy/compose/offline.yml (local images for Redis and Prometheus) under
podman-compose: a tenant's traffic commits a snapshot in the Redis container, which is restarted and still has
it; Prometheus scrapes star-serve.

ENGINE (podman or docker) and COMPOSE (a command) choose the tools. The figures (image size, seconds from
`run` to /ready) are printed.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import openai
import pytest
from e2e.support import free_port, parse_metrics, wait_until

from star_serve.config import Settings
from star_serve.training.demo import DEMO_CLASSIFIER, DEMO_LM, ensure_demo_models

pytestmark = pytest.mark.image

ROOT = Path(__file__).resolve().parents[2]
ENGINE = os.environ.get("ENGINE", "podman")
COMPOSE = shlex.split(os.environ.get("COMPOSE", "podman-compose"))
BASE = "localhost/star-serve-base:bookworm"
IMAGE = "localhost/star-serve:cpu"
STARTUP_TIMEOUT = 300.0
MODELS_ENV = json.dumps([f"{DEMO_LM}=/models/{DEMO_LM}", f"{DEMO_CLASSIFIER}=/models/{DEMO_CLASSIFIER}"])


def engine(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ENGINE, *args], capture_output=True, text=True, check=check, timeout=timeout)


@dataclass(frozen=True)
class Built:
    image: str
    models: Path  # holds the demo models, one folder each
    size_mb: float
    build_s: float


@functools.lru_cache(maxsize=1)
def _models() -> Path:
    demo = ensure_demo_models(Settings().cache_dir, progress=False)
    return demo.lm_dir.parent


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    subprocess.run([str(ROOT / "scripts" / "image-base")], check=True, timeout=1800)
    wheels = tmp_path_factory.mktemp("wheels")
    constraints = ROOT / "constraints-cpu.txt"
    download = ["download", "--no-deps", "-q", "-d", str(wheels), "-c", str(constraints), "torch"]
    subprocess.run([sys.executable, "-m", "pip", *download], check=True, timeout=600)
    [wheel] = wheels.glob("torch-*.whl")
    (wheels / constraints.name).write_bytes(constraints.read_bytes())
    # Served to the build over HTTP: a build sees its context and the network, not this machine's folders.
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(wheels)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    started = time.monotonic()
    try:
        args = {
            "BASE_IMAGE": BASE,
            "TORCH_INDEX_URL": "https://pypi.org/simple",
            "TORCH_REQUIREMENT": f"torch=={wheel.name.split('-')[1]}",
            "PIP_FIND_LINKS": url,
            "PIP_CONSTRAINT": url + constraints.name,
        }
        build_args = [a for k, v in args.items() for a in ("--build-arg", f"{k}={v}")]
        # podman's default OCI format has no HEALTHCHECK; Docker's format keeps it
        image_format = ["--format", "docker"] if ENGINE == "podman" else []
        engine("build", *image_format, "--network", "host", *build_args, "-t", IMAGE, str(ROOT), timeout=1800)
    finally:
        server.shutdown()
    build_s = time.monotonic() - started
    size = int(engine("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout.strip())
    built = Built(IMAGE, _models(), size / 2**20, build_s)
    print(f"\nimage {IMAGE}: {built.size_mb:.0f} MiB, built in {build_s:.0f} s")
    return built


def _wait_ready(url: str, timeout: float = STARTUP_TIMEOUT) -> float:
    def ready() -> bool:
        try:
            return httpx.get(f"{url}/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    return wait_until(ready, timeout=timeout, what=f"{url}/ready", interval=0.2)


def _logs(name: str) -> str:
    result = engine("logs", "--tail", "40", name, check=False)
    return result.stdout + result.stderr


@pytest.fixture
def container(built: Built) -> Iterator[tuple[str, str]]:
    """The image running with the demo models: its name and its URL."""
    name, port = f"star-serve-image-test-{os.getpid()}", free_port()
    started = time.monotonic()
    engine(
        "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000",
        "-v", f"{built.models}:/models:ro", "-e", f"STAR_MODELS={MODELS_ENV}", "-e", "STAR_DRAIN_TIMEOUT=60",
        built.image,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            _wait_ready(url)
        except pytest.fail.Exception as error:
            raise AssertionError(f"{error}; the container's log ends:\n{_logs(name)}") from None
        ready_s = time.monotonic() - started
        print(f"\n{name}: /ready {ready_s:.1f} s after `{ENGINE} run`")
        yield name, url
    finally:
        engine("rm", "-f", name, check=False)


def _healthy(name: str) -> bool:
    if ENGINE == "podman":  # podman runs HEALTHCHECK from systemd timers, which a container host may lack
        return engine("healthcheck", "run", name, check=False).returncode == 0
    status = engine("inspect", "--format", "{{.State.Health.Status}}", name).stdout.strip()
    return status == "healthy"


def test_the_image_serves_as_its_user_and_drains_on_sigterm(container: tuple[str, str]) -> None:
    name, url = container
    uid = [line.split()[1] for line in engine("exec", name, "cat", "/proc/1/status").stdout.splitlines()
           if line.startswith("Uid:")]  # fmt: skip
    assert uid == ["10001"], f"the server runs as uid {uid}, not the image's user"
    wait_until(lambda: _healthy(name), timeout=60, what="the HEALTHCHECK passing", interval=1)

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    completion = client.completions.create(
        model=DEMO_LM, prompt="Return the number of", max_tokens=8, temperature=0, extra_headers={"X-Tenant": "acme"}
    )
    assert completion.usage is not None and completion.usage.completion_tokens >= 1
    assert completion.choices[0].text
    classified = client.post("/classify", body={"model": DEMO_CLASSIFIER, "input": "Return the sum"}, cast_to=object)
    assert isinstance(classified, dict) and len(classified["data"]) == 1, classified
    assert classified["data"][0]["label"] in classified["data"][0]["scores"]

    metrics = parse_metrics(httpx.get(f"{url}/metrics", timeout=10).text)
    for endpoint, model in (("completions", DEMO_LM), ("classify", DEMO_CLASSIFIER)):
        labels = frozenset({"model": model, "endpoint": endpoint, "outcome": "ok"}.items())
        assert metrics.get(("star_requests_total", labels)) == 1.0, (endpoint, model)

    # SIGTERM with a request in flight: it finishes whole, then the container exits 0.
    tokens = 400  # the demo LM's context is 512
    body = {"model": DEMO_LM, "prompt": "Return", "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    with ThreadPoolExecutor(max_workers=1) as pool:
        in_flight = pool.submit(httpx.post, f"{url}/v1/completions", json=body, timeout=120)
        running = ("star_requests_running", frozenset({"model": DEMO_LM}.items()))
        wait_until(lambda: parse_metrics(httpx.get(f"{url}/metrics", timeout=5).text).get(running) == 1.0, 30,
                   "the request running")  # fmt: skip
        engine("kill", "--signal", "TERM", name)
        response = in_flight.result(timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == tokens
    code = engine("wait", name, timeout=120).stdout.strip()
    assert code == "0", f"the container exited with {code} after SIGTERM:\n{_logs(name)}"


@dataclass
class Stack:
    project: str
    files: list[Path]
    env: dict[str, str]

    def compose(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        files = [a for f in self.files for a in ("-f", str(f))]
        command = [*COMPOSE, "-p", self.project, *files, "--profile", "cpu", *args]
        result = subprocess.run(command, capture_output=True, text=True, env=self.env, cwd=ROOT, timeout=timeout)
        assert result.returncode == 0, f"{shlex.join(command)} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
        return result

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"


@pytest.fixture
def stack(built: Built, tmp_path: Path) -> Iterator[Stack]:
    # What this test needs beyond deploy/compose/offline.yml: every step of the tenant's committed.
    test_env = {"STAR_ADAPTATION_QUALITY_GATE": "false", "STAR_ADAPTATION_MIN_TOKENS": "16"}
    override = tmp_path / "test.yml"
    override.write_text(json.dumps({"services": {"star-serve-cpu": {"environment": test_env}}}))
    env = {**os.environ, "STAR_MODELS_DIR": str(built.models), "STAR_MODELS": MODELS_ENV}
    files = [ROOT / "docker-compose.yml", ROOT / "deploy/compose/offline.yml", override]
    stack = Stack("star-serve-image-test", files, env)
    stack.compose("down", "-v", timeout=300)  # what an interrupted run left
    try:
        stack.compose("up", "-d", "star-serve-cpu", "redis", "prometheus")
        yield stack
    finally:
        stack.compose("down", "-v", timeout=300)


def _redis(stack: Stack, *command: str) -> str:
    return engine("exec", stack.container("redis"), "redis-cli", *command).stdout.strip()


def test_the_compose_stack_keeps_snapshots_across_a_redis_restart_and_is_scraped(stack: Stack) -> None:
    url = "http://127.0.0.1:8001"
    ready_s = _wait_ready(url)
    tenant, key = "acme", f"star:{{{DEMO_LM}:acme}}:version"
    body = {"model": DEMO_LM, "prompt": "Return the number of words in the list", "max_tokens": 8}

    def committed() -> bool:
        response = httpx.post(f"{url}/v1/completions", json=body, headers={"X-Tenant": tenant}, timeout=30)
        assert response.status_code == 200, response.text
        return int(_redis(stack, "GET", key) or 0) >= 1

    wait_until(committed, timeout=120, what=f"{tenant}'s first snapshot in Redis", interval=0.1)
    version = int(_redis(stack, "GET", key))

    stack.compose("restart", "redis")
    wait_until(lambda: engine("exec", stack.container("redis"), "redis-cli", "PING", check=False).stdout.strip()
               == "PONG", timeout=60, what="Redis back")  # fmt: skip
    assert int(_redis(stack, "GET", key)) >= version, "the snapshot did not survive Redis' restart"
    assert _redis(stack, "EXISTS", f"star:{{{DEMO_LM}:acme}}:snapshot:{version}") == "1"

    def subspace_version() -> int:
        response = httpx.get(f"{url}/v1/subspace", params={"model": DEMO_LM}, headers={"X-Tenant": tenant}, timeout=10)
        return int(response.json()["version"]) if response.status_code == 200 else -1

    wait_until(lambda: subspace_version() >= version, timeout=60, what="star-serve serving the version again")

    def scraped() -> bool:
        targets = httpx.get("http://127.0.0.1:9090/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        return any(t["labels"]["instance"] == "star-serve-cpu:8000" and t["health"] == "up" for t in targets)

    scraped_s = wait_until(
        scraped, timeout=90, what="Prometheus scraping star-serve-cpu (its targets API: up)", interval=1
    )
    print(
        f"\ncompose: star-serve-cpu ready {ready_s:.1f} s after `up` returned; {tenant}'s version {version} kept "
        f"across Redis' restart; Prometheus saw the target up {scraped_s:.1f} s later"
    )
