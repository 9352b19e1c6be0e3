"""A real Prometheus scrapes a real server under mixed-tenant traffic: every PromQL expression of the Grafana
dashboard and of the alert rules returns data, the rule and config files pass promtool, every metric they
name is one the server exports, and 2,000 tenants of traffic keep the server's series bounded."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from .support import CLF_NAME, LM_NAME, Launcher, Server, free_port, wait_until

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "star-serve.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
THRESHOLD = re.compile(r"^(?P<measure>.*\S)\s*(?:>|<|>=|<=|==|!=)\s*[-+0-9.e]+\s*$", re.DOTALL)
TOP_TENANTS = 5


def _dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"].replace("$model", ".*") for p in panels for t in p.get("targets", [])]


def _alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def _exported(server: Server) -> set[str]:
    """The metric names of the server's /metrics, as PromQL sees them (counters with `_total`)."""
    names = set()
    for family in text_string_to_metric_families(server.http.get("/metrics").text):
        names |= {sample.name for sample in family.samples}
    return names


class Prometheus:
    def __init__(self, workdir: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        shutil.copy(ALERTS, workdir / "alerts.yml")
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["alerts.yml"],
            "scrape_configs": [{"job_name": "star-serve", "static_configs": [{"targets": [target]}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (workdir / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_until(self._ready, timeout=60, what="prometheus ready")

    def _ready(self) -> bool:
        assert self.proc.poll() is None, "prometheus exited"
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        return list(body["data"]["result"])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture
def prometheus_and_server(launch: Launcher, tmp_path: Path) -> Iterator[tuple[Prometheus, Server]]:
    env = {
        "STAR_ADAPTATION": "async",
        "STAR_ADAPTATION_QUALITY_GATE": "false",  # commits every step: this tests the pipeline
        "STAR_ADAPTATION_MIN_TOKENS": "16",
        "STAR_METRICS_TOP_TENANTS": str(TOP_TENANTS),
    }
    server = launch(env=env)
    prometheus = Prometheus(tmp_path, f"127.0.0.1:{server.port}")
    yield prometheus, server
    prometheus.stop()


async def _mixed_traffic(server: Server, tenants: int) -> None:
    """Completions (streamed and not) and classifications from `tenants` tenants, and one bad request."""

    async def one(http: httpx.AsyncClient, i: int) -> None:
        headers = {"X-Tenant": f"tenant-{i % tenants}"}
        if i % 3 == 2:
            body = {"model": CLF_NAME, "input": [f"sample {i} of the routing test", "a second input"]}
            response = await http.post("/v1/classify", json=body, headers=headers)
        else:
            body = {"model": LM_NAME, "prompt": f"request {i} reads", "max_tokens": 12, "stream": i % 3 == 1}
            response = await http.post("/v1/completions", json=body, headers=headers)
        assert response.status_code == 200, response.text

    async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as http:
        for start in range(0, 4 * tenants, 8):
            await asyncio.gather(*(one(http, i) for i in range(start, min(start + 8, 4 * tenants))))
        bad = await http.post("/v1/completions", json={"model": LM_NAME, "prompt": "x", "max_tokens": -1})
        assert bad.status_code == 400


def test_dashboard_and_alert_queries_return_data(prometheus_and_server: tuple[Prometheus, Server]) -> None:
    prometheus, server = prometheus_and_server
    asyncio.run(_mixed_traffic(server, tenants=TOP_TENANTS + 3))
    queries = _dashboard_queries()
    measures = [THRESHOLD.match(rule["expr"].strip()) for rule in _alert_rules()]
    assert all(measures), "every alert expression is `<measure> <op> <threshold>`"
    queries += [m["measure"] for m in measures if m]

    # a rate needs two scrapes of a series: poll until every expression has data, or name those without
    empty, deadline = queries, time.monotonic() + 45
    while empty and time.monotonic() < deadline:
        empty = [expr for expr in empty if not prometheus.query(expr)]
        time.sleep(0.5 if empty else 0)
    assert not empty, f"these return no data: {empty}"

    # the tenants beyond the busiest appear only as "other"
    tenants = {r["metric"]["tenant"] for r in prometheus.query(f'star_tenant_drift{{model="{LM_NAME}"}}')}
    assert "other" in tenants and len(tenants) == TOP_TENANTS + 1
    # a layer of the LM routes its recent tokens with fractions that sum to one
    shares = prometheus.query(f'sum by (layer) (star_expert_load_fraction{{model="{LM_NAME}"}})')
    assert shares and all(float(r["value"][1]) == pytest.approx(1.0, abs=1e-6) for r in shares)
    assert prometheus.query("star_errors_total > 0"), "the bad request was counted"


def test_every_metric_named_by_the_dashboard_and_alerts_is_exported(launch: Launcher) -> None:
    server = launch(
        env={"STAR_ADAPTATION": "async", "STAR_ADAPTATION_QUALITY_GATE": "false", "STAR_ADAPTATION_MIN_TOKENS": "16"}
    )
    asyncio.run(_mixed_traffic(server, tenants=2))
    named = set(re.findall(r"\bstar_[a-z_]+", DASHBOARD.read_text() + ALERTS.read_text()))
    missing, deadline = named, time.monotonic() + 15
    while missing and time.monotonic() < deadline:  # capture is asynchronous: per-tenant gauges follow
        missing = named - _exported(server)
        time.sleep(0.1 if missing else 0)
    assert not missing, f"named but not exported: {sorted(missing)}"
    assert len(named) >= 20


def test_promtool_accepts_the_rules_and_the_config() -> None:
    for args in (["check", "rules", str(ALERTS)], ["check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")]):
        done = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_two_thousand_tenants_keep_the_series_bounded(launch: Launcher) -> None:
    server = launch(env={"STAR_METRICS_TOP_TENANTS": str(TOP_TENANTS)})

    def series() -> int:
        return sum(len(f.samples) for f in text_string_to_metric_families(server.http.get("/metrics").text))

    asyncio.run(_classify_as(server, range(10)))
    few = series()

    asyncio.run(_classify_as(server, range(2000)))
    families = list(text_string_to_metric_families(server.http.get("/metrics").text))
    tenants = {s.labels["tenant"] for f in families for s in f.samples if "tenant" in s.labels}
    assert len(tenants) == TOP_TENANTS + 1 and "other" in tenants
    assert series() <= few + 2 * (TOP_TENANTS + 1), "per-tenant series grow with the number of tenants"


async def _classify_as(server: Server, tenants: range) -> None:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as http:

        async def one(i: int) -> None:
            body = {"model": CLF_NAME, "input": f"tenant {i} sends one short text"}
            response = await http.post("/v1/classify", json=body, headers={"X-Tenant": f"t-{i}"})
            assert response.status_code == 200, response.text

        for start in range(tenants.start, tenants.stop, 32):
            await asyncio.gather(*(one(i) for i in range(start, min(start + 32, tenants.stop))))
