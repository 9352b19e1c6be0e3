"""A local `star-serve serve` process for the load and soak runs: the demo models on a free port, with a state
directory of its own, stopped by SIGTERM (the drain path) at the end; plus reading its /metrics and memory."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import httpx
from prometheus_client.parser import text_string_to_metric_families

from star_serve.bench.report import free_port

READY_TIMEOUT = 180.0  # the first start on a fresh machine also loads the demo models from disk
# SIGTERM drains in-flight requests for up to STAR_DRAIN_TIMEOUT (30 s by default) before the process exits.
STOP_TIMEOUT = 60.0

Sample = tuple[str, dict[str, str], float]  # (name, labels, value)


class LocalServer:
    """Starts on `__enter__`, waits until `GET /ready` answers 200 (bounded), and stops on `__exit__`.

    The server inherits the environment's STAR_* settings (so that `STAR_MAX_RUNNING=64` applies) except
    STAR_ADMIN_KEY: these runs name tenants by X-Tenant, which needs auth off."""

    def __init__(self, log_path: Path, env: dict[str, str] | None = None, ready_timeout: float = READY_TIMEOUT) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._env = env or {}
        self._ready_timeout = ready_timeout
        self._state = tempfile.TemporaryDirectory(prefix="star-serve-load-")
        self._process: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None, "the server is not started"
        return self._process.pid

    def __enter__(self) -> LocalServer:
        inherited = {k: v for k, v in os.environ.items() if k != "STAR_ADMIN_KEY"}
        env = {
            **inherited,
            "STAR_STATE_DIR": self._state.name,
            "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false",
            **self._env,
        }
        command = [sys.executable, "-m", "star_serve.cli", "serve", "--port", str(self.port)]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self._ready_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"the server exited with {self._process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/ready", timeout=2.0).status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"the server was not ready within {self._ready_timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; the exit code (None when it had to be killed)."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
                return None
        if self._process is not None:
            self.exit_code = self._process.returncode
        self._state.cleanup()
        return self.exit_code

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "<no log>"

    def metrics(self) -> list[Sample]:
        response = httpx.get(f"{self.url}/metrics", timeout=10.0)
        response.raise_for_status()
        return parse_metrics(response.text)

    def rss_bytes(self) -> int:
        """The server's resident memory, from /proc (Linux)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024  # reported in kB
        raise RuntimeError("no VmRSS in /proc/<pid>/status")


def parse_metrics(text: str) -> list[Sample]:
    """Prometheus text -> every sample as (name, labels, value)."""
    return [
        (sample.name, dict(sample.labels), float(sample.value))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def metric_sum(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when there are none)."""
    wanted = labels.items()
    return sum(value for n, ls, value in samples if n == name and wanted <= ls.items())
