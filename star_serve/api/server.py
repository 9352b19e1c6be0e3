"""Running the app under uvicorn with a graceful drain."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from types import FrameType

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .state import AppState

log = logging.getLogger(__name__)


class HeadTimeoutProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, with its keep-alive timeout made a deadline for every request head: a
    connection that has not sent a complete request head `timeout_keep_alive` seconds after it opened (or after
    its previous response) is closed, however slowly it trickles bytes. uvicorn itself times out only the wait
    between a response and the next request, so a connection that never sends one would stay open for good."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_deadline = self.loop.time() + self.timeout_keep_alive
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # arms uvicorn's keep-alive timer, which `data_received` cancels
        self._head_deadline = self.loop.time() + self.timeout_keep_alive

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is None or self.cycle.response_complete:  # still waiting for a whole head
            self._arm()

    def _arm(self) -> None:
        if self.transport.is_closing():
            return
        self._unset_keepalive_if_required()
        delay = max(0.0, self._head_deadline - self.loop.time())
        self.timeout_keep_alive_task = self.loop.call_later(delay, self.timeout_keep_alive_handler)


class DrainingServer(uvicorn.Server):
    """On SIGTERM or SIGINT: readiness fails and new requests get 503 while in-flight requests finish (up to
    `drain_timeout`); then uvicorn shuts down as usual and the process exits 0. A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, state: AppState, drain_timeout: float) -> None:
        super().__init__(config)
        self.state, self.drain_timeout = state, drain_timeout
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining:  # a second signal: stop now
            self.should_exit = self.force_exit = True
            return
        self._draining = True
        self.state.begin_drain()
        log.info("draining: %d requests in flight", self.state.in_flight)
        threading.Thread(target=self._drain, name="drain", daemon=True).start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.drain_timeout
        while self.state.in_flight > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        # A finished drain is a clean exit: uvicorn would re-raise a captured SIGTERM and exit with -15.
        self.should_exit = True
