"""Running the app under uvicorn with a graceful drain."""

from __future__ import annotations

import logging
import threading
import time
from types import FrameType

import uvicorn

from .state import AppState

log = logging.getLogger(__name__)


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
