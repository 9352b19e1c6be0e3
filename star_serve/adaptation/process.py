"""A served model's adaptation in a process of its own, so that the serving process keeps the engine.

On a CPU the engine's forward is thousands of small torch calls, each of which gives up the interpreter
lock and takes it back; any other thread that runs Python in the serving process (capture, guarded steps,
snapshot writes) makes the engine wait at some of them. In a process of its own the same work costs the
engine one copy of each forward's router inputs:

    serving process                                     adaptation process (process_child.py)
    engine thread ── router inputs ─► shared ring ──┐
                  ── RingForward ───► pipe ─────────┴─► capture thread ─► Adapter: pending, bus,
    bank ◄────────────── Publish ◄───────────────────── guarded step, store commit
    API, metrics ◄─── Call / Reply, Report ◄──────────► control thread

It dies with the serving process (a kill of one is a kill of both); should it die alone, the serving
process starts another and serves on meanwhile with the bases committed so far. This is the process
implementation of `AdaptationHandle`; `local.py` is the in-process one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import Any

import torch

from .backends import Backends
from .bank import TenantBank
from .errors import AdaptationUnavailable
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
    Request,
    Rollback,
    Stop,
)
from .observer import ForwardSampler
from .process_child import Setup, main
from .quality import GateModel
from .ring import ProcessObserver, SharedRing
from .worker import AdaptationConfig, AdaptationReport, AdaptationStats

log = logging.getLogger(__name__)

CALL_TIMEOUT = 60.0  # seconds a call into the adaptation process may take
REPORT_TIMEOUT = 1.0  # seconds a scrape waits for a fresh report before using the last one
RESTART_DELAY = 3.0  # seconds before starting again an adaptation process that died soon after its start
START_TIMEOUT = 120.0  # seconds the adaptation process may take to start


class AdaptationProcess:
    """The serving process's side: starts the adaptation process, applies the versions it commits to the
    bank, and answers for it to the API and the metrics."""

    def __init__(
        self,
        model: str,
        trained: torch.Tensor,  # (L, E, D)
        bank: TenantBank,
        config: AdaptationConfig,
        backends: Backends,
        num_experts: int,
        top_k: int,
        top_tenants: int = 10,  # tenants whose health the reports name (the rest as "other")
        gate: GateModel | None = None,  # the model that the process loads to judge candidates; None: no gate
    ) -> None:
        if config.mode not in ("async", "shadow"):
            raise ValueError("only async and shadow adaptation run in a process of its own")
        self.model, self.bank, self.config, self.backends = model, bank, config, backends
        self.on_commit: Callable[[float], None] | None = None
        layers, _, dim = trained.shape
        self._layout = (layers, dim, top_k)
        capture = ForwardSampler.whole(config.capture)  # the serving process samples forwards
        trained = trained.detach().float().cpu()
        self._setup = Setup(
            model, trained, replace(config, capture=capture), backends, num_experts, top_tenants, gate=gate
        )
        self.observer = ProcessObserver(config.capture.sample_rate)
        self.restarts = 0
        self._process: multiprocessing.process.BaseProcess | None = None
        self._control: Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = 0.0
        self._send_lock = threading.Lock()
        self._calls: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[Any]]] = {}
        self._ids = itertools.count()
        self._reports: dict[int, threading.Event] = {}
        self._report = AdaptationReport(AdaptationStats(), 0, 0, True, [])
        self._ready = threading.Event()
        self._stopping = False
        # Tenants whose latest version the adaptation process was asked for (and published to the bank), the
        # least recently used first, as many as it keeps states for; a tenant whose row the bank gives away
        # for room is forgotten, so that its next request has its version published again.
        self._loaded: OrderedDict[str, None] = OrderedDict()
        self._loaded_lock = threading.Lock()
        bank.on_evict(self._forget)

    @property
    def sink(self) -> ProcessObserver:
        return self.observer

    @property
    def routing(self) -> TenantBank:
        return self.bank

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Starts the adaptation process and waits until it serves. Call it from the event loop's thread:
        the process dies with the thread that started it, and is started again from there if it dies before
        the server stops."""
        self._launch()
        await self.wait_ready()

    def _launch(self) -> None:
        self._loop = asyncio.get_running_loop()
        context = multiprocessing.get_context("spawn")
        ring = SharedRing.create(*self._layout)
        control, child_control = context.Pipe()
        forwards_in, forwards_out = context.Pipe(duplex=False)
        process = context.Process(
            target=main,
            args=(self._setup,),
            kwargs={"control": child_control, "forwards": forwards_in, "ring": ring},
            name=f"star-adaptation-{self.model}",
            daemon=True,
        )
        process.start()
        child_control.close()
        forwards_in.close()
        self._ready.clear()
        with self._loaded_lock:
            self._loaded.clear()  # the new process loads each tenant again on its next request
        self._process, self._control, self._started = process, control, time.monotonic()
        self.observer.attach(ring, forwards_out)
        threading.Thread(
            target=self._read, args=(process, control), name=f"adaptation-link-{self.model}", daemon=True
        ).start()

    def _restart(self) -> None:
        if not self._stopping:
            self.restarts += 1
            self._launch()

    async def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        if not await asyncio.to_thread(self._ready.wait, timeout):
            raise RuntimeError(f"the adaptation process of {self.model} did not start in {timeout:.0f} s")

    async def stop(self) -> None:
        """After the engine has stopped: the process captures what was submitted, hands pending statistics
        over as `Adapter.stop` does, and exits."""
        self._stopping = True
        self.observer.close()
        process, control = self._process, self._control
        if process is None or control is None:
            return
        if process.is_alive():
            try:
                await self._call(Stop())
            except AdaptationUnavailable:
                log.warning("the adaptation process of %s did not stop cleanly", self.model, exc_info=True)
        await asyncio.to_thread(process.join, 30)
        if process.is_alive():
            process.kill()
        control.close()

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    # -- what the API and the metrics ask ------------------------------------------------------------

    async def describe(self, tenant: str) -> dict[str, object]:
        described: dict[str, object] = await self._call(Describe(tenant))
        return described

    async def configure(self, tenant: str, frozen: bool | None, learning_rate: float | None) -> None:
        await self._call(Configure(tenant, frozen, learning_rate))

    async def rollback(self, tenant: str, version: int | None) -> int:
        restored: int = await self._call(Rollback(tenant, version))
        return restored

    async def reset(self, tenant: str) -> int:
        return await self.rollback(tenant, 0)

    async def ensure_loaded(self, tenant: str) -> None:
        """Loads the tenant's latest version into the bank before its first request is served. While the
        adaptation process is away, serving goes on with what the bank holds (as the in-process adapter
        does while its store is down), and the next request tries again."""
        with self._loaded_lock:
            if tenant in self._loaded:
                self._loaded.move_to_end(tenant)
                return
        try:
            await self._call(EnsureLoaded(tenant))
        except AdaptationUnavailable:
            log.warning("serving %s of %s with its cached bases: %s", tenant, self.model, "adaptation unavailable")
            return
        with self._loaded_lock:
            self._loaded[tenant] = None
            while len(self._loaded) > self.config.max_tenants:
                self._loaded.popitem(last=False)

    def _forget(self, tenant: str) -> None:
        with self._loaded_lock:
            self._loaded.pop(tenant, None)

    @property
    def store_ok(self) -> bool:
        """The store reached, as the adaptation process last reported, and that process up and serving: one
        started again after a crash counts only once it is ready."""
        return self._report.store_ok and self.alive and self._ready.is_set()

    def report(self, top: int) -> AdaptationReport:
        """A fresh report from the adaptation process (the last one if it does not answer in time), with
        the forwards that the ring had no room for counted as dropped tokens."""
        done = threading.Event()
        key = next(self._ids)
        self._reports[key] = done
        try:
            self._send(ReportRequest(key))
            done.wait(REPORT_TIMEOUT)
        except OSError:
            pass
        finally:
            self._reports.pop(key, None)
        report = self._report
        return replace(report, dropped_tokens=report.dropped_tokens + self.observer.dropped_tokens)

    # -- the link ------------------------------------------------------------------------------------

    def _send(self, message: object) -> None:
        with self._send_lock:
            if self._control is None:
                raise OSError("the adaptation process has not started")
            self._control.send(message)

    async def _call(self, request: Request) -> Any:
        loop = asyncio.get_running_loop()
        key = next(self._ids)
        future: asyncio.Future[Any] = loop.create_future()
        self._calls[key] = (loop, future)
        try:
            try:
                self._send(Call(key, request))
            except OSError as exc:
                raise AdaptationUnavailable(f"the adaptation process of {self.model} is restarting") from exc
            try:
                return await asyncio.wait_for(future, CALL_TIMEOUT)
            except TimeoutError as exc:
                raise AdaptationUnavailable(f"the adaptation of {self.model} did not answer in time", 5.0) from exc
        finally:
            self._calls.pop(key, None)

    def _read(self, process: multiprocessing.process.BaseProcess, control: Connection) -> None:
        """Applies what the adaptation process sends, until it is gone; then starts another unless the
        server is stopping (at once if it ran a while, after RESTART_DELAY if it died young)."""
        while True:
            try:
                message = control.recv()
            except (EOFError, OSError):
                break
            if isinstance(message, Publish):
                self.bank.publish(message.tenant, message.bases, message.version)
            elif isinstance(message, Report):
                self._report = message.report
                if self.on_commit is not None:
                    for lag in message.lags:
                        self.on_commit(lag)
                if message.key in self._reports:
                    self._reports[message.key].set()
            elif isinstance(message, Reply):
                if message.key in self._calls:
                    loop, future = self._calls[message.key]
                    loop.call_soon_threadsafe(_settle, future, message.value, message.error)
            elif isinstance(message, Ready):
                self._ready.set()
        gone = AdaptationUnavailable(f"the adaptation process of {self.model} exited; a new one is starting")
        for loop, future in list(self._calls.values()):
            loop.call_soon_threadsafe(_settle, future, None, gone)
        if self._stopping or self._loop is None or self._loop.is_closed():
            return
        process.join(5)
        delay = 0.0 if time.monotonic() - self._started > RESTART_DELAY * 10 else RESTART_DELAY
        log.error(
            "the adaptation process of %s exited (code %s); serving goes on with the bases it committed, and "
            "a new one starts in %.0f s",
            self.model,
            process.exitcode,
            delay,
        )
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            self._loop.call_soon_threadsafe(self._loop.call_later, delay, self._restart)


def _settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
