"""Continuous batching for generation.

One engine thread owns the model. At every iteration it drops finished, cancelled and timed-out
sequences, admits waiting ones into free KV-cache slots, and runs one forward over the newcomers' prompts and
every running sequence's next token together, whatever their tenants: each sequence routes with its own
tenant's bases through the tenant bank. Callers `submit` sequences and read each one's `GenerationStream`.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase

from ..adaptation.bank import BatchRouter, RoutingPlan
from ..adaptation.live import LiveQuality
from ..adaptation.observer import ForwardSink
from ..model import StarMoeForCausalLM
from ..model.inputs import pad_right
from ..model.modeling import Batch, StarMoeModelOutput
from .kv_cache import SlotBinding, SlotKVCache
from .live import PrefillMeter
from .load import ExpertLoad
from .prefix_cache import TRAINED_BASES, PrefixCache
from .sampling import make_generator, process, sample, token_logprobs
from .types import (
    EngineDraining,
    EngineOverloaded,
    EngineStats,
    GenerationOutput,
    RequestTooLong,
    SamplingParams,
    StepStats,
    TokenLogprob,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_running: int = 32  # KV-cache slots: sequences decoded together
    max_waiting: int = 128  # admission queue; beyond it, requests are refused (429)
    max_prefill_batch: int = 16  # newcomers prefilled in one forward
    logprob_chunk: int = 256  # prompt positions put through the LM head at once for prompt log-probabilities
    request_timeout: float = 300.0  # seconds from submission to the last token
    prefix_blocks: int = 256  # prompt blocks whose keys and values are kept for later prompts; 0: none
    prefix_block_size: int = 16  # tokens per block


@dataclass
class _Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    tenant: str
    stream: SequenceHandle
    return_routing: bool
    deadline: float
    generator: torch.Generator | None
    ends: tuple[int, ...]  # the tokens that end it
    slot: int = -1
    version: int = 0
    generated: list[int] = field(default_factory=list)
    detokenizer: DecodeStream | None = None  # follows the text token by token, where the tokenizer allows
    text: str = ""  # the text of `generated` so far, where a detokenizer follows it
    emitted_chars: int = 0
    cancelled: bool = False
    routing: torch.Tensor | None = None  # (L, E) tokens routed to each expert
    prefix_digests: list[bytes] = field(default_factory=list)  # its prompt's blocks in the prefix cache
    incremental: bool = True
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of `generated`, where asked
    logprobs_sent: int = 0
    prompt_logprobs: list[TokenLogprob] | None = None  # until the first event carries them
    submitted_at: float = field(default_factory=time.monotonic)
    queue_seconds: float | None = None
    first_token_seconds: float | None = None

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.generated)


@dataclass(frozen=True)
class SequenceRequest:
    """One sequence to generate: choice `i` of a request with `n` choices seeds its sampler with seed + i."""

    prompt_ids: list[int]
    params: SamplingParams
    tenant: str
    return_routing: bool = False
    choice: int = 0
    incremental: bool = True  # stream text as it is generated; False: all of it in the final output


class Cancels(Protocol):
    """What a stream's `cancel` tells: the engine, or the serving process's end of an engine in a process of
    its own (`process.py`)."""

    def cancel(self, stream: GenerationStream) -> None: ...


class SequenceHandle(Protocol):
    """What the engine knows a sequence's caller by: a `GenerationStream`, or a sequence that a process of its
    own runs for another (`process.py`)."""

    sequence: _Sequence | None


Deliver = Callable[[list[tuple[Any, GenerationOutput]]], None]  # a step's (handle, output) pairs


class GenerationStream:
    """The caller's end of one sequence: an async iterator of outputs; `cancel` (or not reading it to the
    end and calling `cancel`) frees the sequence's slot at the engine's next iteration."""

    def __init__(self, engine: Cancels, loop: asyncio.AbstractEventLoop, key: int = 0) -> None:
        self._engine, self.loop, self.key = engine, loop, key
        self._queue: asyncio.Queue[GenerationOutput] = asyncio.Queue()
        self.sequence: _Sequence | None = None
        self.finished = False

    @staticmethod
    def deliver(outputs: list[tuple[GenerationStream, GenerationOutput]]) -> None:
        """Runs on the event loop: hands one engine step's outputs to their streams."""
        for stream, output in outputs:
            stream._queue.put_nowait(output)

    def __aiter__(self) -> AsyncIterator[GenerationOutput]:
        return self._outputs()

    async def _outputs(self) -> AsyncIterator[GenerationOutput]:
        while not self.finished:
            output = await self._queue.get()
            self.finished = output.finish_reason is not None
            yield output

    def cancel(self) -> None:
        if not self.finished:
            self._engine.cancel(self)


@dataclass
class _Pass:
    """One batch of a step's forward: the newcomers' prefills, or the running sequences' next tokens."""

    batch: list[_Sequence]
    prefill: bool
    plan: RoutingPlan
    ids: torch.Tensor  # (B, S), right-padded
    starts: torch.Tensor  # (B,) the first new position of each
    last: torch.Tensor  # (B,) the index of each one's last real token in `ids`
    real: torch.Tensor  # (B, S) bool
    lengths: list[int]  # real tokens of each
    binding: SlotBinding


class GenerationEngine:
    def __init__(
        self,
        model: StarMoeForCausalLM,
        tokenizer: PreTrainedTokenizerBase,
        routing: BatchRouter,  # how each batch routes: the tenant bank, or sync mode's update of it
        config: EngineConfig = EngineConfig(),
        on_step: Callable[[StepStats], None] | None = None,
        sink: ForwardSink | None = None,  # where each forward goes for adaptation, if anywhere
        live: LiveQuality | None = None,  # where the loss of sampled prompts goes, if anywhere
        deliver: Deliver | None = None,  # where a step's outputs go; default: to their streams' event loops
    ) -> None:
        self.model, self.tokenizer, self.routing, self.config = model, tokenizer, routing, config
        self.on_step, self._sink = on_step, sink
        self._deliver: Deliver = deliver or deliver_to_loops
        self.device = next(model.parameters()).device
        self.expert_load = ExpertLoad(model.config.num_hidden_layers, model.config.num_local_experts, self.device)
        self.backbone, self.lm_head = model.base_model, model.get_output_embeddings()
        self._meter = None if live is None else PrefillMeter(live, self.backbone, self.lm_head, self.device)
        self.max_context = model.config.max_position_embeddings
        self._eos: int | None = tokenizer.eos_token_id
        # A fast tokenizer decodes a streamed sequence one token at a time, rather than all of its tokens again
        # at every step, where that gives the same text (no clean-up of spaces before punctuation).
        backend = getattr(tokenizer, "_tokenizer", None)
        tidies = getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self._backend = backend if isinstance(backend, Tokenizer) and not tidies else None
        dtype = next(model.parameters()).dtype
        self.cache = SlotKVCache(model.config, config.max_running, self.max_context, self.device, dtype)
        self.prefixes = (
            PrefixCache(model.config, config.prefix_blocks, config.prefix_block_size, self.device, dtype)
            if config.prefix_blocks
            else None
        )
        self._free_slots = list(range(config.max_running))  # a heap: the lowest free slot is taken first
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._wakeup = threading.Condition()
        self._stopping = False
        self.draining = False
        self._outbox: list[tuple[SequenceHandle, GenerationOutput]] = []
        self._thread = threading.Thread(target=self._loop, name="generation-engine", daemon=True)

    # -- the caller's side -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if self._sink is not None:
            self._sink.close()  # the last forwards' statistics reach the adaptation

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stats(self) -> EngineStats:
        running = list(self._running)
        held = sum(s.length for s in running)
        usage = held / (self.config.max_running * self.max_context)
        stats = EngineStats(len(running), len(self._waiting), usage, expert_load=self.expert_load.snapshot())
        if self.prefixes is None:
            return stats
        prefixes = self.prefixes
        return replace(
            stats,
            prefix_cache_queries=prefixes.queried_tokens,
            prefix_cache_hits=prefixes.hit_tokens,
            prefix_cache_usage=len(prefixes) / prefixes.capacity,
        )

    def check_length(self, prompt_tokens: int, max_tokens: int) -> None:
        check_length(prompt_tokens, max_tokens, self.max_context)

    def submit(self, requests: list[SequenceRequest]) -> list[GenerationStream]:
        """Queues sequences all together or not at all (EngineOverloaded, EngineDraining).

        Must be called on the event loop that will consume the returned streams.
        """
        streams = [GenerationStream(self, asyncio.get_running_loop()) for _ in requests]
        self.enqueue(requests, streams)
        return streams

    def enqueue(self, requests: Sequence[SequenceRequest], streams: Sequence[SequenceHandle]) -> None:
        """Queues sequences all together or not at all, each known by its handle in the step's outputs."""
        check_requests(requests, self.max_context)
        seqs = [
            _Sequence(
                prompt_ids=list(r.prompt_ids),
                params=r.params,
                tenant=r.tenant,
                stream=stream,
                return_routing=r.return_routing,
                deadline=time.monotonic() + self.config.request_timeout,
                generator=make_generator(r.params, r.choice),
                ends=self._ends(r.params),
                incremental=r.incremental,
            )
            for r, stream in zip(requests, streams, strict=True)
        ]
        with self._wakeup:
            if self.draining or self._stopping:
                raise EngineDraining()
            check_capacity(len(seqs), self.config)
            if len(self._waiting) + len(seqs) > self.config.max_waiting + len(self._free_slots):
                raise EngineOverloaded(retry_after=1.0)
            self._waiting.extend(seqs)
            self._wakeup.notify()
        for stream, seq in zip(streams, seqs, strict=True):
            stream.sequence = seq

    def cancel(self, stream: SequenceHandle) -> None:
        """Ends `stream`'s sequence at the next iteration, as "cancelled"."""
        if stream.sequence is not None:
            stream.sequence.cancelled = True
            self.wake()

    def wake(self) -> None:
        with self._wakeup:
            self._wakeup.notify()

    # -- the engine thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wakeup:
                while not (self._stopping or self._waiting or self._running):
                    self._wakeup.wait(timeout=1.0)
                if self._stopping:
                    break
            try:
                self.step()
            except Exception:  # a failed step must not kill the engine; its sequences end with "error"
                log.exception("generation step failed")
                for seq in [*self._running]:
                    self._finish(seq, "error")
                self._flush()
        for seq in [*self._running, *self._waiting]:
            self._finish(seq, "cancelled")
        self._flush()

    @torch.inference_mode()
    def step(self) -> None:
        """One iteration: reap, admit and prefill newcomers, decode everyone else by one token."""
        try:
            self._step()
        finally:
            self._flush()

    def _step(self) -> None:
        now = time.monotonic()
        for seq in [*self._running]:
            if seq.cancelled:
                self._finish(seq, "cancelled")
            elif now > seq.deadline:
                self._finish(seq, "timeout")
        self._drop_abandoned()
        # In slot order, so that attention reads a run of consecutive slots in place (`SlotKVCache`).
        decoding = sorted(self._running, key=lambda s: s.slot)
        newcomers = sorted(self._admit(), key=lambda s: s.slot)
        passes = [self._prepare(newcomers, prefill=True)] if newcomers else []
        if decoding:
            passes.append(self._prepare(decoding, prefill=False))
        if len(passes) > 1 and passes[0].plan.routing.update is not None:
            # sync adaptation: the prefills' forward moves the bases that the decodes then route with
            for one in passes:
                self._forward([one])
        elif passes:
            self._forward(passes)

    def _drop_abandoned(self) -> None:
        """Ends queued sequences that were cancelled or expired, so they stop holding queue places."""
        now = time.monotonic()
        with self._wakeup:
            abandoned = [s for s in self._waiting if s.cancelled or now > s.deadline]
            for seq in abandoned:
                self._waiting.remove(seq)
        for seq in abandoned:
            self._finish(seq, "cancelled" if seq.cancelled else "timeout")

    def _admit(self) -> list[_Sequence]:
        admitted: list[_Sequence] = []
        with self._wakeup:
            while self._waiting and self._free_slots and len(admitted) < self.config.max_prefill_batch:
                seq = self._waiting.popleft()
                if seq.cancelled or time.monotonic() > seq.deadline:
                    self._finish(seq, "cancelled" if seq.cancelled else "timeout")
                    continue
                seq.slot = heapq.heappop(self._free_slots)
                seq.queue_seconds = time.monotonic() - seq.submitted_at
                admitted.append(seq)
        self._running.extend(admitted)
        return admitted

    def _prepare(self, batch: list[_Sequence], prefill: bool) -> _Pass:
        """A batch's inputs to the step's forward: newcomers' prompts (less what the prefix cache holds), or
        each running sequence's newest token."""
        tenants = [s.tenant for s in batch]
        plan = self.routing.plan(tenants, [len(s.prompt_ids) if prefill else 1 for s in batch])
        if prefill:
            for s, version in zip(batch, plan.versions, strict=True):
                s.version = version
            cached = self._reuse_prefixes(batch, plan)  # prompt tokens whose keys and values are already in
            ids, real = pad_right(
                [s.prompt_ids[c:] for s, c in zip(batch, cached, strict=True)], self.tokenizer.pad_token_id or 0
            )
            starts = torch.tensor(cached, dtype=torch.long)
            last = torch.tensor([len(s.prompt_ids) - c - 1 for s, c in zip(batch, cached, strict=True)])
            lengths = [len(s.prompt_ids) - c for s, c in zip(batch, cached, strict=True)]  # real tokens in this forward
        else:
            ids = torch.tensor([[s.generated[-1]] for s in batch])
            starts = torch.tensor([s.length - 1 for s in batch])
            last = torch.zeros(len(batch), dtype=torch.long)
            real = torch.ones(len(batch), 1, dtype=torch.bool)
            lengths = [1] * len(batch)
        binding = self.cache.binding(torch.tensor([s.slot for s in batch]), starts, ids.shape[1])
        return _Pass(batch, prefill, plan, ids, starts, last, real, lengths, binding)

    def _forward(self, passes: list[_Pass]) -> None:
        """One forward of the model over every pass, then each pass's tokens sampled. A step's prefills and
        decodes share it: at a small model's size a forward costs its operations' dispatch, at a large one its
        reads of the weights, whatever its number of tokens."""
        outs = self.backbone.forward_batches(
            [
                Batch(p.ids.to(self.device), p.binding.positions, p.binding.mask, p.binding, p.plan.routing)
                for p in passes
            ]
        )
        last = [
            out.last_hidden_state[torch.arange(len(p.batch), device=self.device), p.last.to(self.device)]
            for p, out in zip(passes, outs, strict=True)
        ]  # (B, D) each: the last positions only go through the LM head
        logits = self.lm_head(last[0] if len(last) == 1 else torch.cat(last)).split([len(p.batch) for p in passes])
        for p, out, next_logits in zip(passes, outs, logits, strict=True):
            self._consume(p, out, next_logits)

    def _consume(self, p: _Pass, out: StarMoeModelOutput, next_logits: torch.Tensor) -> None:
        """What a pass's forward feeds besides its next tokens, then those tokens."""
        batch, prefill = p.batch, p.prefill
        tenants = [s.tenant for s in batch]
        hidden, experts = out.last_hidden_state, out.expert_indices
        assert hidden is not None and experts is not None
        if self.on_step is not None:
            phase = "prefill" if prefill else "decode"
            self.on_step(StepStats(phase, len(batch), int(p.ids.numel())))
        self.expert_load.add(experts, p.real)
        if any(s.return_routing for s in batch):
            self._count_routing(batch, experts, p.lengths)
        if self._sink is not None:
            self._sink.submit(tenants, p.lengths, p.plan, out, p.ids)
        if prefill and self.prefixes is not None:
            for seq in batch:
                self.prefixes.store(seq.prefix_digests, self.cache, seq.slot)
        if prefill and self._meter is not None:
            whole = [c == 0 for c in p.starts.tolist()]  # a prompt's loss is measured from its first token
            self._meter(tenants, p.plan.versions, p.ids, p.real, hidden, whole)
        if prefill and any(s.params.prompt_logprobs is not None for s in batch):
            self._score_prompts(batch, hidden)
        scored = [s for s in batch if s.params.max_tokens == 0]  # prompt scoring only: nothing to generate
        for seq in scored:
            self._finish(seq, "length")
        if scored:
            keep = [i for i, s in enumerate(batch) if s.params.max_tokens > 0]
            batch, next_logits = [batch[i] for i in keep], next_logits[keep]
        self._sample(batch, next_logits)

    def _reuse_prefixes(self, batch: list[_Sequence], plan: RoutingPlan) -> list[int]:
        """Copies each newcomer's cached prompt blocks into its slot; returns how many prompt tokens each has there.

        A block is reused only under the bases the sequence routes with now (`prefix_cache`). Not in sync mode,
        where the forward itself moves the bases, and not for a sequence that needs every prompt position
        computed (prompt log-probabilities, routing counts)."""
        if self.prefixes is None or plan.routing.update is not None:
            return [0] * len(batch)
        cached = []
        for seq, row, version in zip(batch, plan.rows, plan.versions, strict=True):
            seq.prefix_digests = self.prefixes.digests(
                TRAINED_BASES if row == 0 else (seq.tenant, version), seq.prompt_ids
            )
            if seq.params.prompt_logprobs is not None or seq.return_routing:
                cached.append(0)
                continue
            blocks = self.prefixes.match(seq.prefix_digests, len(seq.prompt_ids))
            self.prefixes.load(blocks, self.cache, seq.slot)
            cached.append(len(blocks) * self.prefixes.block_size)
        return cached

    def _sample(self, batch: list[_Sequence], logits: torch.Tensor) -> None:
        """Draws each sequence's next token from its shaped logits; log-probabilities from the raw ones."""
        logits = logits.float().cpu()
        shaped = logits
        if any(s.params.processes_logits for s in batch):
            shaped = logits.clone()
            for i, s in enumerate(batch):
                if s.params.processes_logits:
                    shaped[i] = process(logits[i], s.params, s.prompt_ids, s.generated, s.ends)
        tokens = sample(shaped, [s.params for s in batch], [s.generator for s in batch])
        wanted = [i for i, s in enumerate(batch) if s.params.logprobs is not None]
        if wanted:
            top = max(batch[i].params.logprobs or 0 for i in wanted)
            entries = token_logprobs(logits[wanted], torch.tensor([tokens[i] for i in wanted]), top)
            for i, entry in zip(wanted, entries, strict=True):
                n = batch[i].params.logprobs or 0
                batch[i].logprobs.append(TokenLogprob(entry.token, entry.logprob, entry.top[:n]))
        for seq, token in zip(batch, tokens, strict=True):
            if not seq.generated:
                seq.first_token_seconds = time.monotonic() - seq.submitted_at
            seq.generated.append(token)
            self._emit_progress(seq)

    def _score_prompts(self, batch: list[_Sequence], hidden: torch.Tensor) -> None:
        """Each asking sequence's prompt tokens 2..n under the distribution of the position before them,
        from the prefill's hidden states, a chunk of positions at a time through the LM head."""
        chunk = self.config.logprob_chunk
        for i, seq in enumerate(batch):
            top = seq.params.prompt_logprobs
            if top is None:
                continue
            targets = torch.tensor(seq.prompt_ids[1:], dtype=torch.long)
            entries: list[TokenLogprob] = []
            for start in range(0, len(targets), chunk):
                logits = self.lm_head(hidden[i, start : start + min(chunk, len(targets) - start)])
                entries += token_logprobs(logits, targets[start : start + chunk], top)
            seq.prompt_logprobs = entries

    def _ends(self, params: SamplingParams) -> tuple[int, ...]:
        """The tokens that end a sequence: end-of-text (unless ignored) and its `stop_token_ids`."""
        own = params.stop_token_ids
        return own if self._eos is None or params.ignore_eos else (self._eos, *own)

    def _count_routing(self, batch: list[_Sequence], experts: tuple[torch.Tensor, ...], lengths: list[int]) -> None:
        num_experts = self.model.config.num_local_experts
        for i, seq in enumerate(batch):
            if not seq.return_routing:
                continue
            counts = torch.stack(
                [torch.bincount(layer[i, : lengths[i]].reshape(-1).cpu(), minlength=num_experts) for layer in experts]
            )  # (L, E)
            seq.routing = counts if seq.routing is None else seq.routing + counts

    def _emit_progress(self, seq: _Sequence) -> None:
        """Emits the text that became final with the newest token, and finishes the sequence if done.

        Text is decoded only when someone needs it: a streaming caller, a stop string to look for, or
        the end of the sequence.
        """
        early = len(seq.generated) <= seq.params.min_tokens  # the ending tokens were masked until now
        eos = seq.generated[-1] in seq.ends and not early
        out_of_room = len(seq.generated) >= seq.params.max_tokens or seq.length >= self.max_context
        if not (eos or out_of_room or seq.incremental or seq.params.stop):
            return
        text = self._text(seq, eos, final=eos or out_of_room)
        found = [text.find(stop, max(0, seq.emitted_chars - len(stop))) for stop in seq.params.stop]
        if len(seq.generated) < seq.params.min_tokens:
            found = []
        if any(at != -1 for at in found):  # cut at the earliest stop string, whichever it is
            self._send(seq, text[: min(at for at in found if at != -1)], final=True)
            self._finish(seq, "stop")
            return
        if eos or out_of_room:
            self._send(seq, text, final=True)
            self._finish(seq, "stop" if eos else "length")
        elif seq.incremental:
            self._send(seq, text[: len(text) - _held_back(text, seq.params.stop)])

    def _text(self, seq: _Sequence, eos: bool, final: bool) -> str:
        """The text of the generated tokens, but an ending one: followed token by token where the sequence
        needs it at every step (streamed, or with stop strings) and the tokenizer can, else decoded whole. The
        last text is decoded whole, so that it has the replacement characters of an unfinished UTF-8 character
        that the token-by-token text withholds."""
        followed = seq.incremental or seq.params.stop
        if self._backend is None or not followed or final:
            return self.tokenizer.decode(seq.generated[:-1] if eos else seq.generated, skip_special_tokens=True)
        if seq.detokenizer is None:
            seq.detokenizer = DecodeStream(skip_special_tokens=True)
        seq.text += seq.detokenizer.step(self._backend, seq.generated[-1]) or ""  # not an ending token: final
        return seq.text

    def _send(self, seq: _Sequence, text: str, final: bool = False) -> None:
        if (seq.incremental or final) and len(text) > seq.emitted_chars:
            output = GenerationOutput(text=text[seq.emitted_chars :], token_ids=[], subspace_version=seq.version)
            self._outbox.append((seq.stream, self._with_logprobs(seq, output)))
            seq.emitted_chars = len(text)

    @staticmethod
    def _with_logprobs(seq: _Sequence, output: GenerationOutput) -> GenerationOutput:
        """`output` carrying the log-probabilities not sent yet: the prompt's in the first event, then the
        generated tokens' since the previous one."""
        output.prompt_logprobs, seq.prompt_logprobs = seq.prompt_logprobs, None
        output.logprobs, seq.logprobs_sent = seq.logprobs[seq.logprobs_sent :], len(seq.logprobs)
        return output

    def _finish(self, seq: _Sequence, reason: str) -> None:
        if seq in self._running:
            self._running.remove(seq)
            heapq.heappush(self._free_slots, seq.slot)
        final = GenerationOutput(
            text="",
            token_ids=list(seq.generated),
            finish_reason=reason,
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=len(seq.generated),
            subspace_version=seq.version,
            routing=seq.routing.tolist() if seq.routing is not None else None,
            queue_seconds=seq.queue_seconds,
            first_token_seconds=seq.first_token_seconds,
        )
        self._outbox.append((seq.stream, self._with_logprobs(seq, final)))

    def _flush(self) -> None:
        """Delivers the step's outputs together: with one wake-up per event loop, not one per token."""
        outbox, self._outbox = self._outbox, []
        if outbox:
            self._deliver(outbox)


def deliver_to_loops(outputs: list[tuple[GenerationStream, GenerationOutput]]) -> None:
    """Hands outputs to their streams, from any thread: one wake-up per event loop, not one per output."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[GenerationStream, GenerationOutput]]] = {}
    for stream, output in outputs:
        by_loop.setdefault(stream.loop, []).append((stream, output))
    for loop, pairs in by_loop.items():
        if not loop.is_closed():
            loop.call_soon_threadsafe(GenerationStream.deliver, pairs)


def check_capacity(sequences: int, config: EngineConfig) -> None:
    """Refuses (RequestTooLong) more sequences at once than the running batch and the queue can ever hold."""
    most = config.max_waiting + config.max_running
    if sequences > most:
        raise RequestTooLong(f"{sequences} sequences (prompts x n) can never be admitted together; the most is {most}")


def check_length(prompt_tokens: int, max_tokens: int, max_context: int) -> None:
    if prompt_tokens + max_tokens > max_context:
        raise RequestTooLong(
            f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
            f"context of {max_context} tokens"
        )


def check_requests(requests: Sequence[SequenceRequest], max_context: int) -> None:
    """Refuses (RequestTooLong) a batch of sequences with an empty prompt or one over the context."""
    for request in requests:
        if not request.prompt_ids:
            raise RequestTooLong("the prompt is empty")
        check_length(len(request.prompt_ids), request.params.max_tokens, max_context)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters to hold back: an unfinished UTF-8 character, or a possible stop prefix."""
    held = 1 if text.endswith("\ufffd") else 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                held = max(held, n)
                break
    return held
