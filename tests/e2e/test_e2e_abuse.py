"""Abusive clients: each gets a 4xx or a bounded answer, and the server stays healthy and its memory bounded.

One server for the module, with the product's default body limit (1 MiB) so that the JSON parser, not the
body limit, meets the deeply nested bodies. Its resident memory and open descriptors are taken once it has
served a few normal requests (`baseline`); the last test compares them with their level after the abuse.
Raw sockets play the clients that no HTTP library would be: slow, idle, half-sent, or not reading.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest

from .support import CLF_CONTEXT, CLF_NAME, LM_CONTEXT, LM_NAME, Launcher, Server, assert_openai_error, wait_until

BODY_LIMIT = 1 << 20  # STAR_MAX_BODY_BYTES of this module's server (the product default)
IDLE_TIMEOUT = 10  # STAR_CONNECTION_IDLE_TIMEOUT of this module's server (the product default)
RSS_GROWTH_MB = 200  # how much resident memory the whole abuse may leave behind
FD_GROWTH = 16  # open descriptors the abuse may leave behind (log files, pooled client connections)
QUICK = 5.0  # seconds within which a small request must be served while the abuse goes on
CHAT = [{"role": "user", "content": "hi"}]


@dataclass(frozen=True)
class Baseline:
    rss_mb: float
    fds: int


def rss_mb(server: Server) -> float:
    """The server process's resident memory (VmRSS), in MiB."""
    with open(f"/proc/{server.proc.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line")


def open_fds(server: Server) -> int:
    return len(os.listdir(f"/proc/{server.proc.pid}/fd"))


def queued_to(server: Server, client_port: int) -> int:
    """Bytes the server has written towards a client that the client has not taken (its socket's send queue)."""
    with open("/proc/net/tcp") as table:
        for line in list(table)[1:]:
            fields = line.split()
            local, remote = (int(address.split(":")[1], 16) for address in fields[1:3])
            if (local, remote) == (server.port, client_port):
                return int(fields[4].split(":")[0], 16)
    return 0


@pytest.fixture(scope="module")
def abuse_server(launch: Launcher) -> Iterator[Server]:
    server = launch(env={"STAR_ADAPTATION": "off", "STAR_MAX_BODY_BYTES": str(BODY_LIMIT)})
    yield server
    server.terminate()


def small_completion(server: Server) -> float:
    """A normal request; returns how long it took."""
    start = time.monotonic()
    response = server.http.post(
        "/v1/completions", json={"model": LM_NAME, "prompt": "Return the", "max_tokens": 4, "temperature": 0}
    )
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 4
    return time.monotonic() - start


@pytest.fixture(scope="module")
def baseline(abuse_server: Server) -> Baseline:
    """Memory and descriptors once the server has warmed up on normal traffic of every kind."""
    server = abuse_server
    for _ in range(3):
        small_completion(server)
    response = server.http.post(
        "/v1/chat/completions", json={"model": LM_NAME, "messages": CHAT, "max_tokens": 8, "n": 4, "stream": True}
    )
    assert response.status_code == 200 and response.text.rstrip().endswith("data: [DONE]")
    response = server.http.post("/v1/classify", json={"model": CLF_NAME, "input": ["one text", "another"]})
    assert response.status_code == 200, response.text
    return Baseline(rss_mb=rss_mb(server), fds=open_fds(server))


# --- raw HTTP/1.1 over a socket --------------------------------------------------------------------------------


def connect(server: Server, timeout: float = 30.0, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # before connect(), so that the TCP window starts small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", server.port))
    return sock


def request_head(path: str, headers: dict[str, str | int]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of one response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a complete response head: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (h.partition(":") for h in header_lines)}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(status_line.split()[1]), headers, body


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    return data


def assert_error_body(body: bytes) -> dict[str, Any]:
    parsed = json.loads(body)
    assert set(parsed) == {"error"}, parsed
    error = parsed["error"]
    assert isinstance(error, dict) and isinstance(error.get("message"), str), error
    return error


# --- oversized prompts and payloads ----------------------------------------------------------------------------

LONG_TEXT = "the quick brown fox jumps over the lazy dog " * 700  # ~31 KB, several times the LM's context


@pytest.mark.parametrize(
    "body",
    [
        {"model": LM_NAME, "prompt": LONG_TEXT, "max_tokens": 1},
        {"model": LM_NAME, "prompt": ["short", LONG_TEXT], "max_tokens": 1},
        {"model": LM_NAME, "prompt": "x " * 400_000, "max_tokens": 1},  # 800 KB: just under the body limit
        {"model": LM_NAME, "messages": [{"role": "user", "content": LONG_TEXT}], "max_tokens": 1},
        {"model": LM_NAME, "messages": [{"role": "user", "content": LONG_TEXT}]},  # max_tokens left to the server
    ],
    ids=["prompt", "prompt-list", "prompt-800KB", "chat", "chat-no-max-tokens"],
)
def test_prompt_beyond_the_context_is_400(abuse_server: Server, baseline: Baseline, body: dict[str, Any]) -> None:
    endpoint = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    error = assert_openai_error(abuse_server.http.post(endpoint, json=body), 400)
    assert "context" in error["message"], error


def test_classify_input_beyond_the_context_is_truncated(abuse_server: Server, baseline: Baseline) -> None:
    response = abuse_server.http.post("/v1/classify", json={"model": CLF_NAME, "input": [LONG_TEXT] * 8})
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["data"]) == 8
    assert body["usage"]["prompt_tokens"] <= 8 * CLF_CONTEXT  # bounded: each input cut at the context


def test_body_over_the_limit_is_413(abuse_server: Server, baseline: Baseline) -> None:
    body = {"model": LM_NAME, "prompt": "a" * (2 * BODY_LIMIT), "max_tokens": 1}
    error = assert_openai_error(abuse_server.http.post("/v1/completions", json=body), 413)
    assert str(BODY_LIMIT) in error["message"]


def test_announced_huge_body_is_refused_before_it_is_sent(abuse_server: Server, baseline: Baseline) -> None:
    """A Content-Length of a terabyte is answered at once, without waiting for (or reading) any body."""
    with connect(abuse_server, timeout=QUICK) as sock:
        sock.sendall(request_head("/v1/completions", {"Content-Length": 10**12}))
        status, _, body = read_response(sock)
    assert status == 413
    assert_error_body(body)


def test_chunked_body_over_the_limit_is_413(abuse_server: Server, baseline: Baseline) -> None:
    """Without a Content-Length the limit holds while reading: the 413 comes long before 16 MiB are sent."""
    total, chunk = 16 * BODY_LIMIT, b"a" * 16384
    sent = 0
    answer = b""
    with connect(abuse_server, timeout=QUICK) as sock:
        sock.sendall(request_head("/v1/completions", {"Transfer-Encoding": "chunked"}))
        opening = b'{"model": "tiny-lm", "max_tokens": 1, "prompt": "'
        sock.sendall(b"%x\r\n%s\r\n" % (len(opening), opening))
        sock.setblocking(False)
        deadline = time.monotonic() + 30
        while not answer and sent < total and time.monotonic() < deadline:
            with contextlib.suppress(BlockingIOError):
                answer = sock.recv(65536)
            try:
                sock.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
            except BlockingIOError:  # the server stopped reading: wait for its answer
                sock.settimeout(QUICK)
                answer = sock.recv(65536)
            except (BrokenPipeError, ConnectionResetError):
                break
        sock.settimeout(QUICK)
        if not answer:
            answer = sock.recv(65536)
        while b"\r\n\r\n" not in answer:
            more = sock.recv(65536)
            assert more, answer
            answer += more
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < total, "the whole 16 MiB went through before the server answered"


# --- malformed bodies --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "tiny-lm", "max_tokens": 2, "prompt": "\xff\xfe"}',  # bytes that are never UTF-8
        b'{"model": "tiny-lm", "max_tokens": 2, "prompt": "\xc0\xaf"}',  # an overlong encoding of "/"
        b'{"model": "tiny-lm", "max_tokens": 2, "prompt": "\xe2\x82"}',  # a truncated sequence
        b'{"model": "tiny-lm", "max_tokens": 2, "prompt": "\xed\xa0\x80"}',  # a surrogate, UTF-8-encoded
    ],
    ids=["ff-fe", "overlong", "truncated", "encoded-surrogate"],
)
def test_invalid_utf8_bytes_are_400(abuse_server: Server, baseline: Baseline, raw: bytes) -> None:
    response = abuse_server.http.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    assert_openai_error(response, 400)


LONE_SURROGATE = "\\ud800"  # valid JSON (an escape), but not a Unicode scalar value: no UTF-8 text has it


@pytest.mark.parametrize(
    ("endpoint", "raw"),
    [
        ("/v1/completions", f'{{"model": "tiny-lm", "max_tokens": 2, "prompt": "a{LONE_SURROGATE}b"}}'),
        ("/v1/completions", f'{{"model": "tiny-lm", "max_tokens": 2, "prompt": ["ok", "{LONE_SURROGATE}"]}}'),
        (
            "/v1/chat/completions",
            f'{{"model": "tiny-lm", "max_tokens": 2, "messages": [{{"role": "user", "content": "{LONE_SURROGATE}"}}]}}',
        ),
        (
            "/v1/chat/completions",
            '{"model": "tiny-lm", "max_tokens": 2, "messages": [{"role": "user", "content": '
            f'[{{"type": "text", "text": "{LONE_SURROGATE}"}}]}}]}}',
        ),
        ("/v1/classify", f'{{"model": "tiny-clf", "input": "{LONE_SURROGATE}"}}'),
    ],
    ids=["prompt", "prompt-list", "chat", "chat-parts", "classify"],
)
def test_lone_surrogate_escapes_are_400(abuse_server: Server, baseline: Baseline, endpoint: str, raw: str) -> None:
    response = abuse_server.http.post(endpoint, content=raw.encode(), headers={"Content-Type": "application/json"})
    assert_openai_error(response, 400)


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000,
        b"[" * 1_000_000,  # just under the body limit
        b'{"a": ' * 100_000,
        b'{"model": "tiny-lm", "max_tokens": 1, "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ],
    ids=["100k-arrays", "1M-arrays", "100k-objects", "100k-in-prompt"],
)
def test_deeply_nested_json_is_400(abuse_server: Server, baseline: Baseline, raw: bytes) -> None:
    assert len(raw) <= BODY_LIMIT
    response = abuse_server.http.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    assert_openai_error(response, 400)


# --- out-of-range numbers ----------------------------------------------------------------------------------------

BAD_NUMBERS = [
    ("n", "1000000000"),
    ("n", "1" + "0" * 30),
    ("n", "17"),  # one over STAR_MAX_N (16, the default)
    ("n", "-1"),
    ("n", "0"),
    ("n", "2.5"),
    ("n", "1e9"),
    ("n", '"many"'),
    ("n", '"1e9"'),
    ("n", "null"),
    ("max_tokens", "1000000000"),
    ("max_tokens", "1" + "0" * 30),
    ("max_tokens", "-1"),
    ("max_tokens", "0"),
    ("max_tokens", "2.5"),
    ("max_tokens", "1e9"),
    ("max_tokens", "1e400"),  # infinity once parsed
    ("max_tokens", "NaN"),
    ("max_tokens", '"many"'),
    ("temperature", "NaN"),
    ("temperature", "Infinity"),
    ("temperature", "-Infinity"),
    ("top_p", "NaN"),
    ("seed", "1e300"),
    ("seed", str(2**64)),
]


@pytest.mark.parametrize(("field", "value"), BAD_NUMBERS, ids=[f"{f}={v}" for f, v in BAD_NUMBERS])
@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_out_of_range_numbers_are_400(
    abuse_server: Server, baseline: Baseline, endpoint: str, field: str, value: str
) -> None:
    fields: dict[str, Any] = {"model": LM_NAME, "max_tokens": 4}
    fields |= {"messages": CHAT} if "chat" in endpoint else {"prompt": "hello"}
    fields.pop(field, None)
    raw = json.dumps(fields)[:-1] + f', "{field}": {value}}}'  # as written: NaN, 1e400 and big ints included
    response = abuse_server.http.post(endpoint, content=raw.encode(), headers={"Content-Type": "application/json"})
    assert_openai_error(response, 400)


def test_more_sequences_than_can_ever_run_is_400(abuse_server: Server, baseline: Baseline) -> None:
    """64 prompts x n=16 is more than the running batch and the waiting queue together: refused up front."""
    body = {"model": LM_NAME, "prompt": ["hello"] * 64, "n": 16, "max_tokens": 1}
    assert_openai_error(abuse_server.http.post("/v1/completions", json=body), 400)
    assert abuse_server.running() == 0 and abuse_server.waiting() == 0


# --- slow, idle and non-reading clients --------------------------------------------------------------------------


def test_slow_body_does_not_hold_up_other_clients(abuse_server: Server, baseline: Baseline) -> None:
    """Headers, then the body one byte a second: others are served meanwhile, and the slow request completes."""
    body = json.dumps({"model": LM_NAME, "prompt": "hi", "max_tokens": 2}).encode()
    slow_bytes = 3
    with connect(abuse_server) as sock:
        sock.sendall(request_head("/v1/completions", {"Content-Length": len(body)}))
        for i in range(slow_bytes):
            sock.sendall(body[i : i + 1])
            assert small_completion(abuse_server) < QUICK
            time.sleep(1.0)  # the client's pace: this is the abuse, not a wait for the server
        sock.sendall(body[slow_bytes:])
        status, _, answer = read_response(sock)
    assert status == 200, answer
    assert json.loads(answer)["usage"]["completion_tokens"] == 2


def test_idle_connections_are_closed_and_do_not_hold_up_other_clients(abuse_server: Server, baseline: Baseline) -> None:
    """Hundreds of connections that send nothing, or half a request head, leave the server serving others; the
    server closes each of them once the idle timeout (the product default, 5 s) has passed, and every
    descriptor comes back."""
    idle = 300
    opened = time.monotonic()
    sockets = [connect(abuse_server, timeout=IDLE_TIMEOUT + 10) for _ in range(idle)]
    try:
        for sock in sockets[::3]:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: applic")
        wait_until(
            lambda: open_fds(abuse_server) >= baseline.fds + idle, timeout=10, what="the server to accept them all"
        )
        start = time.monotonic()
        assert abuse_server.http.get("/health").status_code == 200
        assert small_completion(abuse_server) < QUICK
        response = abuse_server.http.post("/v1/classify", json={"model": CLF_NAME, "input": "still serving?"})
        assert response.status_code == 200, response.text
        assert time.monotonic() - start < 3 * QUICK
        for sock in sockets:  # the server's end of the connection, not ours: each read ends at its close
            assert sock.recv(1) == b""
        assert time.monotonic() - opened >= IDLE_TIMEOUT - 1  # not before the timeout
        assert small_completion(abuse_server) < QUICK
    finally:
        for sock in sockets:
            sock.close()
    wait_until(
        lambda: open_fds(abuse_server) <= baseline.fds + FD_GROWTH,
        timeout=10,
        what="the server to close the idle connections",
    )


def test_a_body_over_the_limit_reaches_clients_that_send_it_whole_as_413(
    abuse_server: Server, baseline: Baseline
) -> None:
    """urllib and the openai client send the whole body before they read: they get the 413, not a reset."""
    body = json.dumps({"model": LM_NAME, "prompt": "a" * (2 * BODY_LIMIT), "max_tokens": 1}).encode()
    request = urllib.request.Request(
        f"{abuse_server.base_url}/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 413
    assert str(BODY_LIMIT) in assert_error_body(refused.value.read())["message"]
    with pytest.raises(openai.APIStatusError) as too_big:
        abuse_server.openai().completions.create(model=LM_NAME, prompt="a" * (2 * BODY_LIMIT), max_tokens=1)
    assert too_big.value.status_code == 413
    assert small_completion(abuse_server) < QUICK


def test_connections_beyond_the_cap_get_503_until_idle_ones_are_closed(launch: Launcher) -> None:
    cap, timeout = 20, 2
    server = launch(env={"STAR_MAX_CONNECTIONS": str(cap), "STAR_CONNECTION_IDLE_TIMEOUT": str(timeout)})
    try:
        # Connections are accepted in the order they arrive: by the time the server reads the cap-th one's
        # request, it holds the others (counting descriptors would not do: its readiness probe's connection
        # closes at the idle timeout meanwhile).
        sockets = [connect(server, timeout=timeout + 10) for _ in range(cap - 1)]
        with connect(server, timeout=QUICK) as sock:  # the cap-th connection
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            status, _, _ = read_response(sock)
        assert status == 503
        for idle in sockets:
            assert idle.recv(1) == b""  # closed by the server after its idle timeout
            idle.close()
        assert server.http.get("/health").status_code == 200
    finally:
        server.terminate()


def seconds_per_token(server: Server) -> float:
    """A solo greedy generation's time per token: a lower bound on what a long batched request costs."""
    tokens = 200
    start = time.monotonic()
    response = server.http.post(
        "/v1/completions", json={"model": LM_NAME, "prompt": "Return", "max_tokens": tokens, "temperature": 0}
    )
    assert response.status_code == 200, response.text
    return (time.monotonic() - start) / tokens


def test_stream_reader_that_stops_reading(abuse_server: Server, baseline: Baseline) -> None:
    """A client that starts a long stream and then reads nothing: the engine keeps serving others, memory stays
    bounded, and when the client finally hangs up its sequences leave the batch at once."""
    server = abuse_server
    n, max_tokens = 8, LM_CONTEXT - 64
    full_duration = seconds_per_token(server) * max_tokens
    wait_until(lambda: server.running() == 0, timeout=10, what="an idle engine")
    body = json.dumps(
        {"model": LM_NAME, "prompt": "Return", "max_tokens": max_tokens, "n": n, "stream": True, "ignore_eos": True}
    ).encode()
    sock = connect(server, rcvbuf=4096)
    try:
        sock.sendall(request_head("/v1/completions", {"Content-Length": len(body)}) + body)
        assert recv_exactly(sock, 12) == b"HTTP/1.1 200"  # and nothing more is read from here on
        client_port = sock.getsockname()[1]
        wait_until(lambda: server.running() == n, timeout=10, what="the stalled stream's sequences to run")
        wait_until(
            lambda: queued_to(server, client_port) > 256 * 1024,
            timeout=max(5.0, full_duration),
            what="the server's unread events to pile up",
        )
        assert server.running() == n, "the stream ended before the test could stall it"
        assert small_completion(server) < QUICK
        assert rss_mb(server) < baseline.rss_mb + RSS_GROWTH_MB
    finally:
        sock.close()
    closed_at = time.monotonic()
    wait_until(lambda: server.running() == 0, timeout=max(5.0, full_duration), what="the stalled stream to end")
    assert time.monotonic() - closed_at < max(2.0, full_duration / 2), (
        "the stalled stream's sequences ran on after the client left"
    )


# --- afterwards --------------------------------------------------------------------------------------------------


def test_healthy_and_bounded_after_the_abuse(abuse_server: Server, baseline: Baseline) -> None:
    """Runs last (file order): the server answers, nothing failed inside it, memory and descriptors are bounded."""
    server = abuse_server
    assert server.http.get("/health").status_code == 200
    assert server.http.get("/ready").status_code == 200
    assert small_completion(server) < QUICK
    assert server.metric("star_engine_up", model=LM_NAME) == 1
    assert server.metric("star_engine_up", model=CLF_NAME) == 1
    grown = rss_mb(server) - baseline.rss_mb
    assert grown < RSS_GROWTH_MB, f"resident memory grew by {grown:.0f} MiB (bound {RSS_GROWTH_MB})"
    wait_until(lambda: open_fds(server) <= baseline.fds + FD_GROWTH, timeout=10, what="descriptors back to baseline")
    assert server.metric("star_errors_total", type="internal_error") == 0, server.log()
