"""What the end-to-end tests share (and tests/api reuses): the tiny checkpoints, a running server, assertions."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from star_serve.bench.report import free_port as free_port  # re-exported for the e2e tests

LM_NAME = "tiny-lm"
CLF_NAME = "tiny-clf"
LABELS = ("alpha", "beta", "gamma")
NUM_LAYERS = 2
NUM_EXPERTS = 4
LM_CONTEXT = 2048
CLF_CONTEXT = 256
LOGIT_SCALE = 35.0
READY_TIMEOUT = 90.0
STOP_TIMEOUT = 30.0


@dataclass(frozen=True)
class Checkpoints:
    lm_dir: Path
    clf_dir: Path
    tokenizer: Any  # PreTrainedTokenizerFast

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


Launcher = Callable[..., "Server"]


def build_checkpoints(root: Path) -> Checkpoints:
    """A tiny LM (`root/lm`) and classifier (`root/clf`): random (untrained) STAR MoE models on a byte-level
    BPE tokenizer trained on a few hundred stdlib docstrings, so nothing is downloaded and nothing is trained
    beyond the tokenizer (a few seconds). Used by the e2e servers and by tests/api's in-process apps.

    Three changes make a random LM usable for generation tests:
    - the lm_head row of the end-of-text token is zeroed, so its logit is exactly 0 for every hidden state, and
    - every other lm_head row is scaled up (x `LOGIT_SCALE`), so the other logits spread over several units
      and the largest one sits far above 0. Greedy decoding then does not pick EOS and runs to `max_tokens`,
      seeded sampling practically never draws it (a seeded draw is deterministic anyway, so no test flakes on
      it), and the wider logit gaps keep greedy choices stable under batched vs. solo float differences.
    - the LM's context is `LM_CONTEXT` (more than the 256 of a toy config) so that a single request can run
      for a few seconds: long enough to observe it in flight (disconnect, drain, overload) without sleeping.
    """
    import torch

    from star_serve.model import StarMoeConfig, StarMoeForCausalLM, StarMoeForSequenceClassification
    from star_serve.training.corpus import lm_corpus
    from star_serve.training.presets import tiny_config
    from star_serve.training.tokenizer import train_tokenizer

    tok = train_tokenizer(lm_corpus()[0][:300], vocab_size=512, model_max_length=CLF_CONTEXT)

    def config(context: int, **extra: Any) -> StarMoeConfig:
        return tiny_config(
            vocab_size=len(tok),
            max_position_embeddings=context,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=tok.bos_token_id,
            **extra,
        )

    torch.manual_seed(0)
    lm = StarMoeForCausalLM(config(LM_CONTEXT)).eval()
    with torch.no_grad():
        lm.lm_head.weight.mul_(LOGIT_SCALE)
        lm.lm_head.weight[tok.eos_token_id] = 0.0  # EOS logit is always 0, far below the top logits
    lm_dir = root / "lm"
    lm.save_pretrained(lm_dir)
    tok.model_max_length = LM_CONTEXT
    tok.save_pretrained(lm_dir)

    torch.manual_seed(0)
    id2label = dict(enumerate(LABELS))
    clf = StarMoeForSequenceClassification(
        config(CLF_CONTEXT, num_labels=len(LABELS), id2label=id2label, label2id={v: k for k, v in id2label.items()})
    ).eval()
    clf_dir = root / "clf"
    clf.save_pretrained(clf_dir)
    tok.model_max_length = CLF_CONTEXT
    tok.save_pretrained(clf_dir)
    tok.model_max_length = LM_CONTEXT  # the tests count tokens of long LM prompts with it
    return Checkpoints(lm_dir=lm_dir, clf_dir=clf_dir, tokenizer=tok)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus text -> {(name, labels): value}."""
    samples = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if not match:
            continue
        name, raw_labels, value = match.groups()
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', raw_labels or ""))
        samples[(name, labels)] = float(value)
    return samples


@dataclass
class Server:
    """A running `star-serve serve` process and clients for it."""

    proc: subprocess.Popen[bytes]
    port: int
    state_dir: Path
    log_path: Path
    env: dict[str, str]
    admin_key: str | None = None
    _http: httpx.Client | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def http(self) -> httpx.Client:
        """An httpx client on the server (no auth header unless given per request)."""
        if self._http is None:
            self._http = httpx.Client(base_url=self.base_url, timeout=60.0)
        return self._http

    def openai(self, api_key: str | None = None, **kwargs: Any) -> openai.OpenAI:
        """The official client; no retries, so that 429s and 503s are seen as they are."""
        key = api_key or self.admin_key or "unused"
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=key, max_retries=0, timeout=60.0, **kwargs)

    def async_openai(self, api_key: str | None = None, **kwargs: Any) -> openai.AsyncOpenAI:
        key = api_key or self.admin_key or "unused"
        return openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key=key, max_retries=0, timeout=60.0, **kwargs)

    def admin_headers(self) -> dict[str, str]:
        assert self.admin_key is not None
        return {"Authorization": f"Bearer {self.admin_key}"}

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return "<no log>"

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        response = self.http.get("/metrics")
        assert response.status_code == 200, response.text
        return parse_metrics(response.text)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels` (0 when there are none)."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.metrics().items() if n == name and wanted <= ls)

    def running(self, model: str = LM_NAME) -> float:
        return self.metric("star_requests_running", model=model)

    def waiting(self, model: str = LM_NAME) -> float:
        return self.metric("star_requests_waiting", model=model)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"star-serve exited with {self.proc.returncode} before it was ready:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/ready", timeout=2.0).status_code == 200:
                    return
            time.sleep(0.1)
        self.kill()
        pytest.fail(f"star-serve was not ready within {timeout:.0f} s:\n{self.log()}")

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code (None if it had to be killed)."""
        if self._http is not None:
            self._http.close()
            self._http = None
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def wait_until(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> float:
    """Polls `condition` until it holds; returns the seconds it took, fails after `timeout`."""
    start = time.monotonic()
    while True:
        if condition():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def star_of(response: Any) -> dict[str, Any]:
    """The `star` object of an openai response or chunk (an extra field), or of a JSON dict."""
    data = response if isinstance(response, dict) else response.model_dump()
    assert "star" in data, f"no 'star' object in {data}"
    star = data["star"]
    assert isinstance(star, dict)
    return star


def assert_openai_error(response: httpx.Response, *statuses: int) -> dict[str, Any]:
    """The response has one of `statuses` and an OpenAI-style error body; returns the error object."""
    assert response.status_code in statuses, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error.get("message"), str) and error["message"], error
    assert isinstance(error.get("type"), str) and error["type"], error
    assert "param" in error and "code" in error, error
    return error


class RedisProcess:
    """A redis-server with an append-only file, so that a restart keeps what was committed."""

    def __init__(self, workdir: Path) -> None:
        self.port, self.workdir = free_port(), workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        command += ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.workdir)]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_until(up, timeout=20, what="redis-server accepting connections")
        client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
