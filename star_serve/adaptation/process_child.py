"""The adaptation process itself: the same `Adapter` as the embedded pipeline, with the same store and bus,
fed by the ring's forwards; its commits go back to the serving process's bank (`process.py` is the
serving process's side)."""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection

import torch

from ..lifetime import die_with_parent
from .backends import Backends
from .forwards import Forward, capture_batch
from .messages import (
    Call,
    Configure,
    Describe,
    EnsureLoaded,
    Publish,
    Ready,
    Reply,
    Report,
    ReportRequest,
    RingForward,
    Rollback,
    Stop,
)
from .observer import CapturePolicy
from .quality import GateModel, QualityGate, model_scorer
from .ring import SharedRing
from .worker import AdaptationConfig, Adapter

log = logging.getLogger(__name__)

REPORT_INTERVAL = 1.0  # seconds between reports unasked for (they bring the commits' lags)


@dataclass(frozen=True)
class Setup:
    """What the adaptation process is started with."""

    model: str
    trained: torch.Tensor  # (L, E, D) float32, on the host
    config: AdaptationConfig  # its capture counts whole forwards: the serving process samples them
    backends: Backends
    num_experts: int
    top_tenants: int
    policy: CapturePolicy = field(default_factory=CapturePolicy)
    gate: GateModel | None = None  # loaded here, on the CPU, to judge candidates


class _Link:
    """The adaptation process's bank: the versions it commits go to the serving process's bank."""

    def __init__(self, trained: torch.Tensor, send: Callable[[object], None]) -> None:
        self.trained: torch.Tensor | None = trained
        self._send = send

    def publish(self, tenant: str, bases: torch.Tensor | None, version: int) -> None:
        self._send(Publish(tenant, None if bases is None else bases.detach().cpu().clone(), version))

    def relabel(self, tenant: str, version: int) -> None:
        raise NotImplementedError("sync mode adapts in the serving process")

    def row(self, tenant: str) -> torch.Tensor | None:
        raise NotImplementedError("sync mode adapts in the serving process")


def main(setup: Setup, *, control: Connection, forwards: Connection, ring: SharedRing) -> None:
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the serving process stops this one, after its engine
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    torch.set_num_threads(1)
    os.nice(setup.config.niceness)  # background work: the serving process's engine and HTTP go first
    asyncio.run(_serve(setup, control, forwards, ring))


async def _serve(setup: Setup, control: Connection, forwards: Connection, ring: SharedRing) -> None:
    loop = asyncio.get_running_loop()
    send_lock = threading.Lock()  # taken after the adapter's lock, never before it
    lags: deque[float] = deque(maxlen=4096)  # of commits not yet reported

    def send(message: object) -> None:
        with send_lock:
            control.send(message)

    def report(key: int | None) -> None:
        current = adapter.report(setup.top_tenants)
        stats = replace(current.stats, lags=deque())  # the lags go separately, once each
        taken = [lags.popleft() for _ in range(len(lags))]
        send(Report(key, replace(current, stats=stats), taken))

    async def report_periodically() -> None:
        while True:
            await asyncio.sleep(REPORT_INTERVAL)
            report(None)

    store, bus = setup.backends.open(setup.model)
    gate = None
    if setup.gate is not None:
        scorer = model_scorer(await asyncio.to_thread(setup.gate.load))
        gate = QualityGate(scorer, setup.config.quality)
    adapter = Adapter(setup.model, setup.trained, _Link(setup.trained, send), store, setup.config, bus, gate)
    adapter.on_commit = lags.append
    adapter.start()
    capture = threading.Thread(
        target=_capture_forwards, args=(adapter, forwards, ring, setup), name="capture", daemon=True
    )
    capture.start()
    stopped = loop.create_future()

    async def answer(call: Call) -> None:
        value, error = None, None
        try:
            value = await _handle(adapter, call.request, capture)
        except Exception as exc:  # the caller re-raises it
            error = exc
        if isinstance(call.request, Stop):
            report(None)
        send(Reply(call.key, value, error))
        if isinstance(call.request, Stop):
            end()

    def end() -> None:
        if not stopped.done():
            stopped.set_result(None)

    def listen() -> None:
        while True:
            try:
                message = control.recv()
            except (EOFError, OSError):  # the serving process is gone
                loop.call_soon_threadsafe(end)
                return
            if isinstance(message, ReportRequest):  # on the loop, between its steps: counters that agree with the store
                loop.call_soon_threadsafe(report, message.key)
            elif isinstance(message, Call):
                asyncio.run_coroutine_threadsafe(answer(message), loop)

    threading.Thread(target=listen, name="control", daemon=True).start()
    reporting = loop.create_task(report_periodically())
    send(Ready())
    await stopped
    reporting.cancel()


async def _handle(adapter: Adapter, request: object, capture: threading.Thread) -> object:
    match request:
        case EnsureLoaded(tenant):  # asked only when the serving process's bank may lack the tenant's version
            await adapter.ensure_loaded(tenant, republish=True)
            return None  # the tenant's state stays here
        case Describe(tenant):
            return await adapter.describe(tenant)
        case Configure(tenant, frozen, learning_rate):
            await adapter.configure(tenant, frozen, learning_rate)
            return None
        case Rollback(tenant, version):
            return await adapter.rollback(tenant, version)
        case Stop():
            await asyncio.to_thread(capture.join, 30)  # the forwards submitted before the engine stopped
            await adapter.stop()
            return None
    raise TypeError(f"not a request: {request!r}")


def _capture_forwards(adapter: Adapter, forwards: Connection, ring: SharedRing, setup: Setup) -> None:
    """Takes forwards from the ring and captures them in batches, by the in-process observer's policy."""
    waiting: list[Forward] = []
    tokens, first, ended = 0, 0.0, False
    while not ended:
        timeout = None if not waiting else setup.policy.wait(first)
        try:
            data = forwards.recv_bytes() if forwards.poll(timeout) else b""
            message = pickle.loads(data) if data else ()
        except (EOFError, OSError):
            message = None
        if message is None:
            ended = True
        elif isinstance(message, RingForward):
            if not waiting:
                first = time.monotonic()
            forward = ring.take(message, len(data), adapter.hold_back)
            waiting.append(forward)
            tokens += len(forward.tenants)
        if waiting and (ended or setup.policy.due(tokens, first)):
            capture_batch(adapter, waiting, setup.num_experts, setup.config.capture)
            waiting, tokens = [], 0
