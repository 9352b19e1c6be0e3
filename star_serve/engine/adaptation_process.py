"""A served model's adaptation in a process of its own, so that the serving process keeps the engine.

On a CPU the engine's forward is thousands of small torch calls, each of which gives up the interpreter
lock and takes it back; any other thread that runs Python in the serving process (capture, guarded steps,
snapshot writes) makes the engine wait at some of them. In a process of its own the same work costs the
engine one copy of each forward's router inputs:

    serving process                                     adaptation process
    engine thread ── router inputs ─► shared ring ──┐
                  ── (tenants, versions) ─► pipe ───┴─► capture thread ─► Adapter: pending, bus,
    bank ◄────────────── committed versions ◄────────── guarded step, store commit
    API, metrics ◄──────── calls, reports ◄───────────► control thread

The adaptation process runs the same `Adapter` as the embedded pipeline, with the same store and bus (a
local directory or Redis). It dies with the serving process (a kill of one is a kill of both); should it
die alone, the serving process starts another and serves on meanwhile with the bases committed so far.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import logging
import multiprocessing
import pickle
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any

import torch

from ..adaptation import AdaptationConfig, Adapter, BankView, TenantBank
from ..adaptation.backends import Backends
from ..adaptation.capture import CaptureConfig
from ..adaptation.sync import SyncUpdate
from ..adaptation.worker import AdaptationReport, AdaptationStats
from .observe import CAPTURE_BATCH_TOKENS, CAPTURE_MAX_DELAY, Forward, ForwardSampler, capture_batch, per_token

log = logging.getLogger(__name__)

RING_TOKENS = 8192  # router inputs of this many tokens can wait for the adaptation process
PIPE_BYTES = 32768  # forwards' messages waiting at most: half a pipe's buffer, so that a send never blocks
CALL_TIMEOUT = 60.0  # seconds a call into the adaptation process may take
REPORT_TIMEOUT = 1.0  # seconds a scrape waits for a fresh report before using the last one
REPORT_INTERVAL = 1.0  # seconds between reports unasked for (they bring the commits' lags)
RESTART_DELAY = 3.0  # seconds before starting again an adaptation process that died soon after its start


@dataclass(frozen=True)
class SharedRing:
    """Shared between the two processes: the router inputs (L, C, D) and experts (L, C, k) of waiting
    tokens, and how far the adaptation process has read: [tokens, message bytes], written by it alone."""

    inputs: torch.Tensor
    experts: torch.Tensor
    read: torch.Tensor

    @classmethod
    def create(cls, layers: int, dim: int, top_k: int, tokens: int = RING_TOKENS) -> SharedRing:
        return cls(
            torch.zeros(layers, tokens, dim).share_memory_(),
            torch.zeros(layers, tokens, top_k, dtype=torch.long).share_memory_(),
            torch.zeros(2, dtype=torch.long).share_memory_(),
        )


class ProcessObserver:
    """The engine's side: copies each captured forward's real tokens into the ring and names them in the
    pipe. It never waits: a forward that finds the ring full, or no adaptation process, is dropped and
    counted."""

    def __init__(self, sample_rate: float, seed: int | None = None) -> None:
        self._sampler = ForwardSampler(sample_rate, seed)
        self._lock = threading.Lock()  # an attach (a restarted process) against the engine's submits
        self._ring: SharedRing | None = None
        self._pipe: Connection | None = None
        self._written = 0  # tokens written, counting the ring's end skipped when a forward does not fit
        self._sent = 0  # bytes of messages sent
        self.dropped_tokens = 0

    def attach(self, ring: SharedRing, pipe: Connection) -> None:
        """Sends forwards to a (new) adaptation process from now on."""
        with self._lock:
            if self._pipe is not None:
                self._pipe.close()
            self._ring, self._pipe, self._written, self._sent = ring, pipe, 0, 0

    def submit(
        self, tenants: list[str], lengths: list[int], view: BankView, out: Any, update: SyncUpdate | None = None
    ) -> None:
        if view.bank is None or not self._sampler.keep():
            return
        with self._lock:
            self._send(Forward(tenants, lengths, view.versions, out.router_inputs, out.expert_indices))

    def _send(self, forward: Forward) -> None:
        tenants, lengths, versions = forward.tenants, forward.lengths, forward.versions
        n = sum(lengths)
        if self._ring is None or self._pipe is None or self._pipe.closed:
            self.dropped_tokens += n
            return
        capacity = self._ring.inputs.shape[1]
        at = self._written % capacity
        skip = capacity - at if at + n > capacity else 0  # a forward is contiguous in the ring
        start, end = (at + skip) % capacity, self._written + skip + n
        message = pickle.dumps((start, n, end, tenants, lengths, versions))
        read_tokens, read_bytes = self._ring.read.tolist()
        if end - read_tokens > capacity or self._sent + len(message) - read_bytes > PIPE_BYTES:
            self.dropped_tokens += n
            return
        inputs, experts = torch.stack(forward.router_inputs), torch.stack(forward.expert_indices)  # (L, B, S, ...)
        if inputs.shape[2] == 1:
            real_inputs, real_experts = inputs[:, :, 0], experts[:, :, 0]
        else:
            real = forward.real()  # (B, S)
            real_inputs, real_experts = inputs[:, real.to(inputs.device)], experts[:, real.to(experts.device)]
        self._ring.inputs[:, start : start + n] = real_inputs
        self._ring.experts[:, start : start + n] = real_experts
        try:
            self._pipe.send_bytes(message)
        except OSError:  # the adaptation process is gone; serving goes on
            self._pipe.close()
            self.dropped_tokens += n
            return
        self._written, self._sent = end, self._sent + len(message)

    def close(self) -> None:
        """Tells the adaptation process that no more forwards come; it captures what is waiting."""
        with self._lock:
            if self._pipe is not None and not self._pipe.closed:
                with contextlib.suppress(OSError):  # the adaptation process may be gone
                    self._pipe.send(None)
                self._pipe.close()


class _Link:
    """The adaptation process's bank: the versions it commits go to the serving process's bank."""

    def __init__(self, trained: torch.Tensor, send: Callable[[tuple[Any, ...]], None]) -> None:
        self.trained: torch.Tensor | None = trained
        self._send = send

    def publish(self, tenant: str, bases: torch.Tensor | None, version: int) -> None:
        self._send(("publish", tenant, None if bases is None else bases.detach().cpu().clone(), version))

    def relabel(self, tenant: str, version: int) -> None:
        raise NotImplementedError("sync mode adapts in the serving process")

    def row(self, tenant: str) -> torch.Tensor | None:
        raise NotImplementedError("sync mode adapts in the serving process")


class AdaptationProcess:
    """The serving process's side: starts the adaptation process, applies the versions it commits to the
    bank, and answers for it to the API and the metrics (the methods of `Adapter` that they use)."""

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
    ) -> None:
        if config.mode not in ("async", "shadow"):
            raise ValueError("only async and shadow adaptation run in a process of its own")
        self.model, self.bank, self.config, self.backends = model, bank, config, backends
        self.syncing = False
        self.on_commit: Callable[[float], None] | None = None
        layers, _, dim = trained.shape
        self._layout = (layers, dim, top_k)
        capture = ForwardSampler.whole(config.capture)  # the serving process samples forwards
        trained = trained.detach().float().cpu()
        self._setup = _Setup(model, trained, replace(config, capture=capture), backends, num_experts, top_tenants)
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
        self._report = AdaptationReport(AdaptationStats(), 0, True, [])
        self._ready = threading.Event()
        self._stopping = False
        self._loaded: set[str] = set()

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the adaptation process, from the event loop's thread: the process dies with the thread
        that started it, and is started again from there if it dies before the server stops."""
        self._loop = asyncio.get_running_loop()
        context = multiprocessing.get_context("spawn")
        ring = SharedRing.create(*self._layout)
        control, child_control = context.Pipe()
        forwards_in, forwards_out = context.Pipe(duplex=False)
        process = context.Process(
            target=_main,
            args=(self._setup,),
            kwargs={"control": child_control, "forwards": forwards_in, "ring": ring},
            name=f"star-adaptation-{self.model}",
            daemon=True,
        )
        process.start()
        child_control.close()
        forwards_in.close()
        self._ready.clear()
        self._loaded.clear()  # the new process loads each tenant again on its next request
        self._process, self._control, self._started = process, control, time.monotonic()
        self.observer.attach(ring, forwards_out)
        threading.Thread(
            target=self._read, args=(process, control), name=f"adaptation-link-{self.model}", daemon=True
        ).start()

    def _restart(self) -> None:
        if not self._stopping:
            self.restarts += 1
            self.start()

    async def wait_ready(self, timeout: float = 120.0) -> None:
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
                await self._call("stop")
            except (ConnectionError, TimeoutError):
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
        described: dict[str, object] = await self._call("describe", tenant)
        return described

    async def configure(self, tenant: str, frozen: bool | None, learning_rate: float | None) -> None:
        await self._call("configure", tenant, frozen, learning_rate)

    async def rollback(self, tenant: str, version: int | None) -> int:
        restored: int = await self._call("rollback", tenant, version)
        return restored

    async def reset(self, tenant: str) -> int:
        restored: int = await self._call("reset", tenant)
        return restored

    async def ensure_loaded(self, tenant: str) -> None:
        """Loads the tenant's latest version into the bank before its first request is served."""
        if tenant not in self._loaded:
            await self._call("ensure_loaded", tenant)
            self._loaded.add(tenant)

    @property
    def store_ok(self) -> bool:
        return self._report.store_ok and self.alive

    def report(self, top: int) -> AdaptationReport:
        """A fresh report from the adaptation process (the last one if it does not answer in time), with
        the forwards that the ring had no room for counted as dropped tokens."""
        done = threading.Event()
        key = next(self._ids)
        self._reports[key] = done
        try:
            self._send(("report", key))
            done.wait(REPORT_TIMEOUT)
        except OSError:
            pass
        finally:
            self._reports.pop(key, None)
        report = self._report
        return replace(report, dropped_tokens=report.dropped_tokens + self.observer.dropped_tokens)

    # -- the link ------------------------------------------------------------------------------------

    def _send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            if self._control is None:
                raise OSError("the adaptation process has not started")
            self._control.send(message)

    async def _call(self, method: str, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        key = next(self._ids)
        future: asyncio.Future[Any] = loop.create_future()
        self._calls[key] = (loop, future)
        try:
            try:
                self._send(("call", key, method, args))
            except OSError as exc:
                raise ConnectionError(f"the adaptation process of {self.model} is gone") from exc
            return await asyncio.wait_for(future, CALL_TIMEOUT)
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
            kind = message[0]
            if kind == "publish":
                _, tenant, bases, version = message
                self.bank.publish(tenant, bases, version)
            elif kind == "report":
                _, key, report, lags = message
                self._report = report
                if self.on_commit is not None:
                    for lag in lags:
                        self.on_commit(lag)
                if key in self._reports:
                    self._reports[key].set()
            elif kind == "reply":
                _, key, value, error = message
                if key in self._calls:
                    loop, future = self._calls[key]
                    loop.call_soon_threadsafe(_settle, future, value, error)
            elif kind == "ready":
                self._ready.set()
        for loop, future in list(self._calls.values()):
            loop.call_soon_threadsafe(_settle, future, None, ConnectionError("the adaptation process is gone"))
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


# -- the adaptation process -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Setup:
    """What the adaptation process is started with."""

    model: str
    trained: torch.Tensor  # (L, E, D) float32, on the host
    config: AdaptationConfig  # its capture counts whole forwards: the serving process samples them
    backends: Backends
    num_experts: int
    top_tenants: int


def _main(setup: _Setup, *, control: Connection, forwards: Connection, ring: SharedRing) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the serving process stops this one, after its engine
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    torch.set_num_threads(1)
    asyncio.run(_serve(setup, control, forwards, ring))


def _die_with_parent() -> None:
    """On Linux, have the kernel kill this process when the serving process dies, however it dies."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL))


async def _serve(setup: _Setup, control: Connection, forwards: Connection, ring: SharedRing) -> None:
    loop = asyncio.get_running_loop()
    send_lock = threading.Lock()  # taken after the adapter's lock, never before it
    lags: deque[float] = deque(maxlen=4096)  # of commits not yet reported

    def send(message: tuple[Any, ...]) -> None:
        with send_lock:
            control.send(message)

    def report(key: int | None) -> None:
        current = adapter.report(setup.top_tenants)
        stats = replace(current.stats, lags=deque())  # the lags go separately, once each
        taken = [lags.popleft() for _ in range(len(lags))]
        send(("report", key, replace(current, stats=stats), taken))

    async def report_periodically() -> None:
        while True:
            await asyncio.sleep(REPORT_INTERVAL)
            report(None)

    store, bus = setup.backends.open(setup.model)
    link = _Link(setup.trained, send)
    adapter = Adapter(setup.model, setup.trained, link, store, setup.config, bus)
    adapter.on_commit = lags.append
    adapter.start()
    capture = threading.Thread(
        target=_capture_forwards,
        args=(adapter, forwards, ring, setup.num_experts, setup.config.capture),
        name="capture",
        daemon=True,
    )
    capture.start()
    stopped = loop.create_future()

    async def call(key: int, method: str, args: tuple[Any, ...]) -> None:
        value, error = None, None
        try:
            if method == "stop":
                await asyncio.to_thread(capture.join, 30)  # the forwards submitted before the engine stopped
                await adapter.stop()
            else:
                value = await getattr(adapter, method)(*args)
                if method == "ensure_loaded":
                    value = None  # the tenant's state stays here
        except Exception as exc:  # the caller re-raises it
            error = exc
        if method == "stop":
            report(None)
        send(("reply", key, value, error))
        if method == "stop":
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
            if message[0] == "report":  # on the loop, between its steps: counters that agree with the store
                loop.call_soon_threadsafe(report, message[1])
            elif message[0] == "call":
                _, key, method, args = message
                asyncio.run_coroutine_threadsafe(call(key, method, args), loop)

    threading.Thread(target=listen, name="control", daemon=True).start()
    reporting = loop.create_task(report_periodically())
    send(("ready",))
    await stopped
    reporting.cancel()


def _capture_forwards(
    adapter: Adapter, forwards: Connection, ring: SharedRing, num_experts: int, config: CaptureConfig
) -> None:
    """Takes forwards from the ring and captures them in batches, as the in-process observer does: once
    `CAPTURE_BATCH_TOKENS` are waiting, or the first has waited `CAPTURE_MAX_DELAY` seconds."""
    waiting: list[Forward] = []
    tokens, first, ended = 0, 0.0, False
    while not ended:
        timeout = None if not waiting else max(0.0, first + CAPTURE_MAX_DELAY - time.monotonic())
        try:
            data = forwards.recv_bytes() if forwards.poll(timeout) else b""
            message = pickle.loads(data) if data else ()
        except (EOFError, OSError):
            message = None
        if message is None:
            ended = True
        elif message:
            forward = _forward_of(ring, *message)
            ring.read[1] += len(data)
            if not waiting:
                first = time.monotonic()
            waiting.append(forward)
            tokens += len(forward.tenants)
        if waiting and (ended or tokens >= CAPTURE_BATCH_TOKENS or time.monotonic() - first >= CAPTURE_MAX_DELAY):
            capture_batch(adapter, waiting, num_experts, config)
            waiting, tokens = [], 0


def _forward_of(
    ring: SharedRing, start: int, n: int, written: int, tenants: list[str], lengths: list[int], versions: list[int]
) -> Forward:
    """A forward's real tokens out of the ring, each as a one-token sequence of its sequence's tenant (as
    the in-process observer merges forwards of different lengths); its place in the ring is then free."""
    inputs = ring.inputs[:, start : start + n].clone()  # (L, n, D)
    experts = ring.experts[:, start : start + n].clone()  # (L, n, k)
    ring.read[0] = written
    return per_token(tenants, lengths, versions, list(inputs), list(experts))
