"""A language model's generation engine in a process of its own, as vLLM runs its engine core.

On a CPU a forward of a small model is thousands of short torch calls, each of which gives up the interpreter
lock and takes it back. In the serving process the HTTP loop takes it at many of them: at 32 streamed clients on
the demo LM a decode step took 6.3 ms served against 4.7 ms alone. Here the engine has a process, a lock and a
core of its own, and what crosses is small: a request's sequences and cancellations one way, one message a step
the other (every sequence's new text and finished outputs, the step's statistics and the engine's load).

    serving process                                          engine process (`main`)
    API ── submit / cancel ─► EngineProcess ── Submit, Cancel, Drain, Stop ──► main thread ──► GenerationEngine
    streams ◄── call_soon_threadsafe ◄── reader thread ◄── Step (pickled) ◄──────────────────── engine thread

It serves a model without adaptation. A model that adapts keeps its engine in the serving process, beside its
tenant bank, its adaptation and its live quality. The engine process dies with the serving process;
should it die alone, its sequences end with "error" and the engine reads as down (`/health`, `star_engine_up`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import pickle
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from ..adaptation import TenantBank
from ..lifetime import die_with_parent
from ..model import StarMoeForCausalLM
from ..model.loading import load_model
from .generation import (
    EngineConfig,
    GenerationEngine,
    GenerationStream,
    SequenceRequest,
    check_capacity,
    check_length,
    check_requests,
    deliver_to_loops,
)
from .types import EngineDraining, EngineOverloaded, EngineStats, GenerationOutput, StepStats

log = logging.getLogger(__name__)

START_TIMEOUT = 300.0  # seconds the engine process may take to load its model


@dataclass(frozen=True)
class EngineSetup:
    """What the engine process loads and runs."""

    name: str
    directory: Path
    device: torch.device
    dtype: torch.dtype
    config: EngineConfig
    threads: int  # torch's threads on a CPU
    packed: bool = False  # `pack_for_cpu`
    aligned: bool = True  # `align_linear_gates`


# -- messages: the serving process to the engine process -----------------------------------------------


@dataclass(frozen=True)
class Submit:
    keys: list[int]
    requests: list[SequenceRequest]


@dataclass(frozen=True)
class Cancel:
    key: int


@dataclass(frozen=True)
class Drain:
    draining: bool


@dataclass(frozen=True)
class Stop:
    pass


# -- and back ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    max_context: int


@dataclass(frozen=True)
class Failed:
    error: str


@dataclass(frozen=True)
class Step:
    """One engine step: its outputs by sequence key, its passes' statistics and the engine's load after it
    (the expert load as nested lists, which pickle faster than tensors)."""

    outputs: list[tuple[int, GenerationOutput]]
    passes: list[StepStats]
    stats: EngineStats
    expert_load: tuple[list[list[int]], list[list[float]]] | None  # (total, recent)


class EngineProcess:
    """The serving process's side: the engine's caller interface (`submit`, `stats`, `draining`, `alive`),
    each stream fed from the engine process's step messages."""

    def __init__(self, setup: EngineSetup, on_step: Callable[[StepStats], None] | None = None) -> None:
        self.setup, self.config, self.on_step = setup, setup.config, on_step
        self.max_context = 0  # the model's, once started
        self._keys = itertools.count()
        self._streams: dict[int, GenerationStream] = {}  # sequences submitted and not finished
        self._lock = threading.Lock()  # `_streams`, and the pipe to the engine process
        self._step: Step | None = None  # the latest step's, whose statistics `stats` reads
        self._draining = False
        self._process: multiprocessing.process.BaseProcess | None = None
        self._to_engine: Connection | None = None
        self._reader: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the engine process and waits until its model is loaded. Call it from the thread that lives as
        long as the server: the engine process dies with the thread that started it."""
        context = multiprocessing.get_context("spawn")
        requests, to_engine = context.Pipe(duplex=False)  # (its reading end, our writing end)
        from_engine, steps = context.Pipe(duplex=False)
        process = context.Process(
            target=main, args=(self.setup, requests, steps), name=f"star-engine-{self.setup.name}", daemon=True
        )
        process.start()
        requests.close()
        steps.close()
        if not from_engine.poll(START_TIMEOUT):
            process.kill()
            raise RuntimeError(f"the engine process of {self.setup.name} did not start in {START_TIMEOUT:.0f} s")
        try:
            first = from_engine.recv()
        except EOFError:
            process.join(5)
            first = Failed(f"it exited with code {process.exitcode}")
        if not isinstance(first, Ready):
            process.join(5)
            raise RuntimeError(f"the engine process of {self.setup.name} failed to start: {first.error}")
        self._process, self._to_engine, self.max_context = process, to_engine, first.max_context
        self._reader = threading.Thread(
            target=self._read, args=(from_engine,), name=f"engine-link-{self.setup.name}", daemon=True
        )
        self._reader.start()

    def stop(self) -> None:
        """Ends every sequence ("cancelled") and the engine process."""
        process = self._process
        if process is None:
            return
        self._send(Stop())
        if self._reader is not None:
            self._reader.join(timeout=30)  # until the engine process's last step is delivered
        process.join(timeout=10)
        if process.is_alive():
            process.kill()

    @property
    def alive(self) -> bool:
        process, reader = self._process, self._reader
        return process is not None and process.is_alive() and reader is not None and reader.is_alive()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def draining(self) -> bool:
        return self._draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self._draining = value
        self._send(Drain(value))

    def stats(self) -> EngineStats:
        """The engine's load after its latest step (the metrics read it at scrape time)."""
        step = self._step
        if step is None:
            return EngineStats()
        load = step.expert_load
        return replace(step.stats, expert_load=None if load is None else (torch.tensor(load[0]), torch.tensor(load[1])))

    def check_length(self, prompt_tokens: int, max_tokens: int) -> None:
        check_length(prompt_tokens, max_tokens, self.max_context)

    # -- the caller's side -------------------------------------------------------------------------

    def submit(self, requests: list[SequenceRequest]) -> list[GenerationStream]:
        """As `GenerationEngine.submit`. Admission is decided here, from the sequences this side has not seen
        finish: never fewer than the engine process holds, so that it never refuses what was admitted."""
        check_requests(requests, self.max_context)
        loop = asyncio.get_running_loop()
        config = self.config
        with self._lock:
            if self._draining or not self.alive:
                raise EngineDraining()
            check_capacity(len(requests), config)
            if len(self._streams) + len(requests) > config.max_waiting + config.max_running:
                raise EngineOverloaded(retry_after=1.0)
            keys = [next(self._keys) for _ in requests]
            streams = [GenerationStream(self, loop, key) for key in keys]
            self._streams.update(zip(keys, streams, strict=True))
            self._send_locked(Submit(keys, list(requests)))
        return streams

    def cancel(self, stream: GenerationStream) -> None:
        self._send(Cancel(stream.key))

    def _send(self, message: object) -> None:
        with self._lock:
            self._send_locked(message)

    def _send_locked(self, message: object) -> None:
        if self._to_engine is None:
            return
        try:
            self._to_engine.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError:  # the engine process is gone; the reader ends its sequences
            log.warning("the engine process of %s is gone", self.setup.name)

    # -- the reader thread -------------------------------------------------------------------------

    def _read(self, from_engine: Connection) -> None:
        """Hands each step's outputs to their streams' event loops; when the engine process ends, ends what it
        left unfinished with "error"."""
        while True:
            try:
                step: Step = pickle.loads(from_engine.recv_bytes())
            except (EOFError, OSError):
                break
            self._step = step
            if self.on_step is not None:
                for stats in step.passes:
                    self.on_step(stats)
            with self._lock:
                delivered = [(self._streams[key], output) for key, output in step.outputs if key in self._streams]
                for key, output in step.outputs:
                    if output.finish_reason is not None:
                        self._streams.pop(key, None)
            deliver_to_loops(delivered)
        from_engine.close()
        with self._lock:
            left, self._streams = list(self._streams.values()), {}
        if left:
            log.error("the engine process of %s ended with %d sequences unfinished", self.setup.name, len(left))
        deliver_to_loops([(stream, GenerationOutput(text="", token_ids=[], finish_reason="error")) for stream in left])


# -- the engine process -------------------------------------------------------------------------------


@dataclass
class _Remote:
    """A sequence that the engine process runs for the serving process, known there by `key`."""

    key: int
    sequence: Any = None


def main(setup: EngineSetup, requests: Connection, steps: Connection) -> None:
    die_with_parent()
    for stopping in (signal.SIGINT, signal.SIGTERM):  # the serving process stops this one, after its drain
        signal.signal(stopping, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        child = _Child(setup, steps)
    except Exception:
        steps.send(Failed(traceback.format_exc()))
        return
    child.serve(requests)


class _Child:
    """The engine process: the engine, and the sequences it runs for the serving process by key."""

    def __init__(self, setup: EngineSetup, steps: Connection) -> None:
        torch.set_num_threads(setup.threads)
        model, tokenizer = load_model(setup.directory, "generate", setup.device, setup.dtype)
        assert isinstance(model, StarMoeForCausalLM)
        model.align_linear_gates(setup.aligned)
        if setup.packed:
            model.pack_for_cpu()
        self.steps, self._send_lock = steps, threading.Lock()
        self.remotes: dict[int, _Remote] = {}
        self.passes: list[StepStats] = []
        bank = TenantBank.serving(model)
        self.engine = GenerationEngine(model, tokenizer, bank, setup.config, self.passes.append, deliver=self.deliver)

    def serve(self, requests: Connection) -> None:
        """Runs the engine and follows the serving process's messages until Stop or its end."""
        engine = self.engine
        engine.start()
        self.steps.send(Ready(engine.max_context))
        while True:
            try:
                message = pickle.loads(requests.recv_bytes())
            except (EOFError, OSError):  # the serving process is gone
                break
            if isinstance(message, Submit):
                handles = [_Remote(key) for key in message.keys]
                self.remotes.update((h.key, h) for h in handles)
                try:
                    engine.enqueue(message.requests, handles)
                except Exception:  # the serving process admitted them, so this is not expected: they end
                    log.exception("sequences refused")
                    failed = GenerationOutput(text="", token_ids=[], finish_reason="error")
                    self._send_step([(h, failed) for h in handles], [])
            elif isinstance(message, Cancel):
                remote = self.remotes.get(message.key)
                if remote is not None:
                    engine.cancel(remote)
            elif isinstance(message, Drain):
                engine.draining = message.draining
            elif isinstance(message, Stop):
                break
        engine.stop()  # its last step, every sequence left ended "cancelled", is delivered before this returns
        self.steps.close()

    def deliver(self, outputs: list[tuple[_Remote, GenerationOutput]]) -> None:
        """The engine thread's step outputs, sent as one message with the step's statistics."""
        passes, self.passes[:] = self.passes[:], []
        self._send_step(outputs, passes)

    def _send_step(self, outputs: list[tuple[_Remote, GenerationOutput]], passes: list[StepStats]) -> None:
        for remote, output in outputs:
            if output.finish_reason is not None:
                self.remotes.pop(remote.key, None)
        stats = self.engine.stats()
        load = stats.expert_load
        step = Step(
            [(remote.key, output) for remote, output in outputs],
            passes,
            replace(stats, expert_load=None),
            None if load is None else (load[0].tolist(), load[1].tolist()),
        )
        data = pickle.dumps(step, protocol=pickle.HIGHEST_PROTOCOL)
        with self._send_lock:
            self.steps.send_bytes(data)
