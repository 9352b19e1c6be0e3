"""Locust scenarios for star-serve: many tenants of Zipf-like popularity sending a realistic mix of completions,
chat completions (streamed or not) and classifications.

Against a server that is already running (web UI on :8089, or add --headless -u 32 -r 8 -t 60s):

    locust -f load_tests/locustfile.py --host http://127.0.0.1:8000 --tenants 200 --tenant-skew 1.1

`python -m load_tests.run` starts a server of its own and runs this file headless.

Every request is named by its kind, so Locust's table has one row per kind. A streamed request is timed to
its last SSE event, not to its headers. Refusals (429 overloaded, 503 draining) are failures of their own
type, apart from errors (other 4xx and 5xx, connection errors, broken streams); the process exits 1 only
on errors. With --summary-file, the final figures per kind are written there as JSON when Locust quits:
requests, failures by type, req/s, generated tokens/s (from each response's `usage`) and the p50/p99
latency of the successful requests (Locust's own table and CSV also count failed requests' times).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import gevent
import requests
from locust import HttpUser, between, events, task
from locust.argument_parser import LocustArgumentParser
from locust.clients import ResponseContextManager
from locust.env import Environment

from star_serve.training.corpus import classifier_dataset, lm_corpus

COMPLETION = "completion"
COMPLETION_STREAM = "completion (stream)"
CHAT = "chat"
CHAT_STREAM = "chat (stream)"
CLASSIFY = "classify"
KINDS = (COMPLETION, COMPLETION_STREAM, CHAT, CHAT_STREAM, CLASSIFY)

MAX_TOKENS_CHOICES = ((16, 2), (32, 3), (64, 3), (128, 2), (256, 1))  # (max_tokens, weight): mostly short answers
GREEDY_SHARE = 0.3
SYSTEM_PROMPT = "You are a concise assistant for Python's standard library."
CHAT_OPENERS = ("Explain this:", "Summarise:", "What does this describe?", "Continue the documentation:")
REQUEST_TIMEOUT = 120.0


class Failure(StrEnum):
    """Why a request failed; the first two are refusals, which a loaded server may give by design."""

    REFUSED_429 = "refused (429)"
    REFUSED_503 = "refused (503)"
    SERVER_ERROR = "server error (5xx)"
    CLIENT_ERROR = "client error (4xx)"
    CONNECTION = "connection error"
    BAD_RESPONSE = "bad response"


REFUSALS = frozenset({Failure.REFUSED_429, Failure.REFUSED_503})


def failure_of_status(status: int) -> Failure | None:
    if status == 0:
        return Failure.CONNECTION  # locust's status for a request that got no response
    if status == 429:
        return Failure.REFUSED_429
    if status == 503:
        return Failure.REFUSED_503
    if status >= 500:
        return Failure.SERVER_ERROR
    if status >= 400:
        return Failure.CLIENT_ERROR
    return None


@dataclass
class Tally:
    """One request kind's outcomes: latency of the successful requests, their tokens, failures by type."""

    latencies_ms: list[float] = field(default_factory=list)
    tokens: int = 0
    failures: Counter[Failure] = field(default_factory=Counter)

    @property
    def requests(self) -> int:
        return len(self.latencies_ms) + sum(self.failures.values())

    def merge(self, other: Tally) -> Tally:
        return Tally(self.latencies_ms + other.latencies_ms, self.tokens + other.tokens, self.failures + other.failures)

    def figures(self, window_s: float) -> dict[str, Any]:
        latencies = sorted(self.latencies_ms)
        return {
            "requests": self.requests,
            "ok": len(latencies),
            "failures": {str(failure): n for failure, n in self.failures.items()},
            "rps": round(self.requests / window_s, 3),
            "tokens": self.tokens,
            "tokens_per_s": round(self.tokens / window_s, 1),
            "p50_ms": round(percentile(latencies, 0.50)),
            "p99_ms": round(percentile(latencies, 0.99)),
        }


def percentile(ordered: list[float], share: float) -> float:
    """Nearest-rank percentile of an ascending list (0 when it is empty)."""
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)] if ordered else 0.0


def zipf_cumulative_weights(n: int, skew: float) -> list[float]:
    """Cumulative weights of ranks 1..n with popularity proportional to 1 / rank**skew."""
    return list(itertools.accumulate(1.0 / rank**skew for rank in range(1, n + 1)))


@dataclass
class Workload:
    """What the users share: the tenant pool, the prompt material and the tallies for the summary."""

    lm_model: str
    classifier_model: str
    tenants: list[str]
    tenant_weights: list[float]  # cumulative
    documents: list[str]  # LM prompts are their opening words
    paragraphs: list[str]  # classification inputs
    max_tokens: int
    rng: random.Random
    tallies: dict[str, Tally] = field(default_factory=lambda: {kind: Tally() for kind in KINDS})

    def tenant(self) -> str:
        return self.rng.choices(self.tenants, cum_weights=self.tenant_weights)[0]

    def prompt(self) -> str:
        words = self.rng.choice(self.documents).split()
        return " ".join(words[: self.rng.randint(6, 48)])

    def messages(self) -> list[dict[str, str]]:
        turns = [{"role": "user", "content": f"{self.rng.choice(CHAT_OPENERS)} {self.prompt()}"}]
        if self.rng.random() < 0.2:  # a follow-up in a conversation
            turns += [{"role": "assistant", "content": self.prompt()}, {"role": "user", "content": self.prompt()}]
        if self.rng.random() < 0.3:
            turns.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
        return turns

    def sampling(self) -> dict[str, Any]:
        sizes, weights = zip(*MAX_TOKENS_CHOICES, strict=True)
        max_tokens = min(self.rng.choices(sizes, weights)[0], self.max_tokens)
        temperature = 0.0 if self.rng.random() < GREEDY_SHARE else round(self.rng.uniform(0.6, 1.0), 2)
        return {"max_tokens": max_tokens, "temperature": temperature}

    def classify_input(self) -> str | list[str]:
        if self.rng.random() < 0.7:
            return self.rng.choice(self.paragraphs)
        return self.rng.sample(self.paragraphs, self.rng.randint(2, 8))


WORKLOAD: Workload | None = None  # built once by the init listener, before any user starts


@events.init_command_line_parser.add_listener
def _add_options(parser: LocustArgumentParser) -> None:
    group = parser.add_argument_group("star-serve workload")
    group.add_argument("--tenants", type=int, default=200, help="Size of the tenant pool.")
    group.add_argument("--tenant-skew", type=float, default=1.1, help="Zipf exponent of tenant popularity.")
    group.add_argument("--lm-model", default="star-demo-lm", help="Model of the generation requests.")
    group.add_argument("--classifier-model", default="star-demo-classifier", help="Model of the classifications.")
    group.add_argument("--max-tokens", type=int, default=256, help="Upper bound of a request's max_tokens.")
    group.add_argument("--workload-seed", type=int, default=0, help="Seed of the tenant and prompt draws.")
    group.add_argument("--summary-file", default="", help="Where to write the final figures as JSON.")


@events.init.add_listener
def _build_workload(environment: Environment, **_: Any) -> None:
    global WORKLOAD
    options = environment.parsed_options
    assert options is not None, "run this file with the locust command"
    heldout_docs = lm_corpus()[1]  # held-out stdlib docstrings: text the demo model has not trained on
    heldout_paragraphs = classifier_dataset()[1]
    WORKLOAD = Workload(
        lm_model=options.lm_model,
        classifier_model=options.classifier_model,
        tenants=[f"tenant-{rank:03d}" for rank in range(options.tenants)],
        tenant_weights=zipf_cumulative_weights(options.tenants, options.tenant_skew),
        documents=[doc for doc in heldout_docs if len(doc.split()) >= 6],
        paragraphs=[text for text, _ in heldout_paragraphs],
        max_tokens=options.max_tokens,
        rng=random.Random(options.workload_seed),
    )
    # gevent's loop caches its clock, and nothing has let it tick since this file was imported (torch, the
    # corpus): without this, the --run-time timer that Locust arms next ends the run that many seconds early.
    gevent.get_hub().loop.update_now()


class ServingUser(HttpUser):
    """One client of one application: closed loop, a short think time between requests."""

    wait_time = between(0.05, 0.5)

    @property
    def workload(self) -> Workload:
        assert WORKLOAD is not None
        return WORKLOAD

    @task(2)
    def completion(self) -> None:
        body = {"model": self.workload.lm_model, "prompt": self.workload.prompt(), **self.workload.sampling()}
        self._post(COMPLETION, "/v1/completions", body)

    @task(3)
    def completion_stream(self) -> None:
        body = {"model": self.workload.lm_model, "prompt": self.workload.prompt(), **self.workload.sampling()}
        self._post(COMPLETION_STREAM, "/v1/completions", body, stream=True)

    @task(2)
    def chat(self) -> None:
        body = {"model": self.workload.lm_model, "messages": self.workload.messages(), **self.workload.sampling()}
        self._post(CHAT, "/v1/chat/completions", body)

    @task(5)
    def chat_stream(self) -> None:
        body = {"model": self.workload.lm_model, "messages": self.workload.messages(), **self.workload.sampling()}
        self._post(CHAT_STREAM, "/v1/chat/completions", body, stream=True)

    @task(3)
    def classify(self) -> None:
        body = {"model": self.workload.classifier_model, "input": self.workload.classify_input()}
        self._post(CLASSIFY, "/v1/classify", body)

    def _post(self, kind: str, path: str, body: dict[str, Any], stream: bool = False) -> None:
        if stream:
            body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        headers = {"X-Tenant": self.workload.tenant()}
        start = time.perf_counter()
        with self.client.post(
            path, json=body, headers=headers, name=kind, stream=stream, timeout=REQUEST_TIMEOUT, catch_response=True
        ) as response:
            failure, detail, tokens = _read(response, stream)
            elapsed_ms = (time.perf_counter() - start) * 1000
            if stream:
                # With stream=True locust stops its clock at the headers; the request ends with its last event.
                response.request_meta["response_time"] = elapsed_ms  # type: ignore[index]
            tally = self.workload.tallies[kind]
            if failure is None:
                response.success()
                tally.latencies_ms.append(elapsed_ms)
                tally.tokens += tokens
            else:
                response.failure(f"{failure}: {detail}" if detail else str(failure))
                tally.failures[failure] += 1


def _read(response: ResponseContextManager, stream: bool) -> tuple[Failure | None, str, int]:
    """Reads the whole body: (failure or None, a short detail for Locust's failure table, generated tokens)."""
    failure = failure_of_status(response.status_code)
    if failure is Failure.CONNECTION:
        return failure, type(response.error).__name__, 0
    if failure is not None:
        _ = response.content  # drains a streamed error body, so that the connection can be reused
        return failure, "" if failure in REFUSALS else f"HTTP {response.status_code}", 0
    try:
        return _read_events(response) if stream else (None, "", _usage_tokens(response.json()))
    except requests.RequestException as error:  # the connection broke while the body was read
        return Failure.CONNECTION, type(error).__name__, 0
    except (ValueError, KeyError, TypeError) as error:
        return Failure.BAD_RESPONSE, type(error).__name__, 0


def _read_events(response: ResponseContextManager) -> tuple[Failure | None, str, int]:
    """Consumes an SSE body to its end, which must be `data: [DONE]`; the tokens come from the usage chunk."""
    tokens, done, failed = 0, False, False
    for line in response.iter_lines():
        if not line.startswith(b"data: "):
            continue
        data = line.removeprefix(b"data: ")
        if data == b"[DONE]":
            done = True
            continue
        event = json.loads(data)
        failed = failed or "error" in event
        tokens = _usage_tokens(event) if event.get("usage") else tokens
    if failed:
        return Failure.SERVER_ERROR, "error event in stream", tokens
    if not done:
        return Failure.BAD_RESPONSE, "stream ended before [DONE]", tokens
    return None, "", tokens


def _usage_tokens(body: dict[str, Any]) -> int:
    return int(body["usage"].get("completion_tokens", 0))  # classifications generate none


@events.quitting.add_listener
def _summarise(environment: Environment, **_: Any) -> None:
    """Writes the summary file and sets the exit code: 1 on any error, refusals alone are no failure."""
    assert WORKLOAD is not None
    stats = environment.stats
    window_s = max((stats.last_request_timestamp or stats.start_time) - stats.start_time, 1e-9)
    tallies = {kind: tally for kind, tally in WORKLOAD.tallies.items() if tally.requests}
    total = functools.reduce(Tally.merge, tallies.values(), Tally())
    errors = sum(n for failure, n in total.failures.items() if failure not in REFUSALS)
    crashed = environment.runner is not None and bool(environment.runner.exceptions)
    environment.process_exit_code = 1 if errors or crashed else 0
    options = environment.parsed_options
    if options is not None and options.summary_file:
        summary = {
            "window_s": round(window_s, 3),
            "kinds": {kind: tally.figures(window_s) for kind, tally in tallies.items()},
            "total": total.figures(window_s),
        }
        Path(options.summary_file).write_text(json.dumps(summary, indent=2) + "\n")
