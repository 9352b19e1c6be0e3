"""Dynamic batching for classification: requests wait at most `max_wait` to share a forward."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from ..adaptation.bank import BatchRouter
from ..adaptation.observer import ForwardSink
from ..model import StarMoeForSequenceClassification
from ..model.inputs import pad_right
from .load import ExpertLoad
from .types import ClassificationResult, EngineDraining, EngineOverloaded, EngineStats, StepStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatcherConfig:
    max_batch: int = 32
    max_wait: float = 0.005  # seconds the first request of a batch waits for company
    max_waiting: int = 512
    max_input_tokens: int = 512


@dataclass
class _Item:
    ids: list[int]
    tenant: str
    return_routing: bool
    future: asyncio.Future[ClassificationResult]
    loop: asyncio.AbstractEventLoop


def collate(pending: queue.Queue[_Item], max_batch: int, max_wait: float, idle: float = 0.5) -> list[_Item]:
    """Waits up to `idle` for one item, then gathers more until the batch is full or `max_wait` has passed.
    Returns an empty batch when nothing came."""
    try:
        batch = [pending.get(timeout=idle)]
    except queue.Empty:
        return []
    deadline = time.monotonic() + max_wait
    while len(batch) < max_batch:
        remaining = deadline - time.monotonic()
        try:
            batch.append(pending.get(timeout=remaining) if remaining > 0 else pending.get_nowait())
        except queue.Empty:
            break
    return batch


class ClassificationEngine:
    def __init__(
        self,
        model: StarMoeForSequenceClassification,
        tokenizer: PreTrainedTokenizerBase,
        routing: BatchRouter,  # how each batch routes: the tenant bank, or sync mode's update of it
        config: BatcherConfig = BatcherConfig(),
        on_step: Callable[[StepStats], None] | None = None,
        sink: ForwardSink | None = None,  # where each forward goes for adaptation, if anywhere
    ) -> None:
        self.model, self.tokenizer, self.routing, self.config = model, tokenizer, routing, config
        self.on_step, self._sink = on_step, sink
        self.device = next(model.parameters()).device
        self.expert_load = ExpertLoad(model.config.num_hidden_layers, model.config.num_local_experts, self.device)
        self.max_context = min(model.config.max_position_embeddings, config.max_input_tokens)
        self.labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        self._pending: queue.Queue[_Item] = queue.Queue(maxsize=config.max_waiting)
        self.draining = False
        self._thread = threading.Thread(target=self._loop, name="classification-engine", daemon=True)
        self._stopping = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stops the thread; requests still queued fail with EngineDraining rather than hang."""
        self._stopping = self.draining = True
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if self._sink is not None:
            self._sink.close()  # the last forwards' statistics reach the adaptation
        while True:
            try:
                item = self._pending.get_nowait()
            except queue.Empty:
                break
            if not item.loop.is_closed():
                item.loop.call_soon_threadsafe(_set_exception, item.future, EngineDraining())

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stats(self) -> EngineStats:
        return EngineStats(0, self._pending.qsize(), expert_load=self.expert_load.snapshot())

    async def classify(self, texts: list[str], tenant: str, return_routing: bool = False) -> list[ClassificationResult]:
        if self.draining:
            raise EngineDraining()
        loop = asyncio.get_running_loop()
        encoded = self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=self.max_context)
        items: list[_Item] = []
        for ids in encoded["input_ids"]:
            item = _Item(ids or [self.tokenizer.eos_token_id], tenant, return_routing, loop.create_future(), loop)
            try:
                self._pending.put_nowait(item)
            except queue.Full:
                for queued in items:
                    queued.future.cancel()
                raise EngineOverloaded(retry_after=1.0) from None
            items.append(item)
        return list(await asyncio.gather(*(item.future for item in items)))

    def _loop(self) -> None:
        while not self._stopping:
            batch = collate(self._pending, self.config.max_batch, self.config.max_wait)
            batch = [item for item in batch if not item.future.cancelled()]
            if not batch:
                continue
            try:
                results = self._run(batch)
            except Exception as exc:
                log.exception("classification batch failed")
                for item in batch:
                    item.loop.call_soon_threadsafe(_set_exception, item.future, exc)
                continue
            for item, result in zip(batch, results, strict=True):
                item.loop.call_soon_threadsafe(_set_result, item.future, result)

    @torch.inference_mode()
    def _run(self, batch: list[_Item]) -> list[ClassificationResult]:
        ids, mask = pad_right([item.ids for item in batch], self.tokenizer.pad_token_id or 0)
        tenants, lengths = [item.tenant for item in batch], [len(item.ids) for item in batch]
        plan = self.routing.plan(tenants, lengths)
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            output_routing=True,  # the routers' choices are made anyway: returning them is free
            routing=plan.routing,
        )
        if self.on_step is not None:
            self.on_step(StepStats("classify", len(batch), int(mask.sum())))
        self.expert_load.add(out.expert_indices, mask)
        if self._sink is not None:
            self._sink.submit(tenants, lengths, plan, out, ids)
        probs = out.logits.float().softmax(-1).cpu()
        results = []
        for i, item in enumerate(batch):
            best = int(probs[i].argmax())
            routing = None
            if item.return_routing:
                n, e = len(item.ids), self.model.config.num_local_experts
                routing = [
                    torch.bincount(layer[i, :n].reshape(-1).cpu(), minlength=e).tolist() for layer in out.expert_indices
                ]
            results.append(
                ClassificationResult(
                    label=self.labels[best],
                    score=float(probs[i, best]),
                    scores={label: float(p) for label, p in zip(self.labels, probs[i], strict=True)},
                    subspace_version=plan.versions[i],
                    routing=routing,
                    tokens=len(item.ids),
                )
            )
        return results


def _set_result(future: asyncio.Future[ClassificationResult], result: ClassificationResult) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[ClassificationResult], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
