"""Small-scale training of STAR MoE models: causal LMs and text classifiers.

The router's GHA bases are updated inside the training forward (as in the reference) while AdamW trains
everything else with the task loss plus the Switch load-balancing loss. Training is deterministic for a
given seed and resumable: a checkpoint in the output directory is picked up by the next run.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ..model import (
    StarMoeConfig,
    StarMoeForCausalLM,
    StarMoeForSequenceClassification,
    StarMoePreTrainedModel,
)
from ..model.inputs import pad_right
from ..model.loading import require_model_dir, share_checkpoint
from .calibrate import CalibrationConfig, calibrate
from .presets import Preset
from .tokenizer import train_tokenizer

CHECKPOINT = "checkpoint.pt"
SUMMARY = "training_summary.json"

Batch = dict[str, torch.Tensor]


@dataclass
class TrainResult:
    out_dir: Path
    summary: dict[str, Any]


def _build_config(preset: Preset, tokenizer: PreTrainedTokenizerFast, **extra: Any) -> StarMoeConfig:
    return StarMoeConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **{"max_position_embeddings": max(preset.seq_len, 64), **preset.model, **extra},
    )


def _lr_lambda(preset: Preset) -> Callable[[int], float]:
    def schedule(step: int) -> float:
        if step < preset.warmup_steps:
            return (step + 1) / preset.warmup_steps
        progress = (step - preset.warmup_steps) / max(1, preset.steps - preset.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return schedule


def fit(
    model: StarMoePreTrainedModel,
    next_batch: Callable[[torch.Generator], Batch],
    preset: Preset,
    out_dir: Path,
    seed: int,
    desc: str,
    progress: bool,
) -> dict[str, float]:
    """Runs the optimisation loop, resuming from `out_dir/checkpoint.pt` when one is there."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=preset.learning_rate, weight_decay=preset.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(preset))
    generator = torch.Generator().manual_seed(seed)
    step, first_loss, elapsed = 0, float("nan"), 0.0
    checkpoint = out_dir / CHECKPOINT
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        if state["preset"] == preset.to_dict():
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            generator.set_state(state["generator"])
            step, first_loss, elapsed = state["step"], state["first_loss"], state["elapsed"]

    model.train()
    started = time.perf_counter() - elapsed
    loss_ema = float("nan")
    with tqdm(total=preset.steps, initial=step, desc=desc, disable=not progress, unit="step") as bar:
        while step < preset.steps:
            out = model(**next_batch(generator))
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            loss = out.loss.item()
            first_loss = loss if math.isnan(first_loss) else first_loss
            loss_ema = loss if math.isnan(loss_ema) else 0.95 * loss_ema + 0.05 * loss
            bar.update(1)
            bar.set_postfix(loss=f"{loss_ema:.3f}", aux=f"{out.aux_loss.item():.3f}")
            if step % preset.checkpoint_every == 0 and step < preset.steps:
                out_dir.mkdir(parents=True, exist_ok=True)
                tmp = checkpoint.with_suffix(".tmp")
                torch.save(
                    {
                        "preset": preset.to_dict(),
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "generator": generator.get_state(),
                        "step": step,
                        "first_loss": first_loss,
                        "elapsed": time.perf_counter() - started,
                    },
                    tmp,
                )
                tmp.replace(checkpoint)
    model.eval()
    return {
        "first_train_loss": first_loss,
        "final_train_loss": loss_ema,
        "train_seconds": time.perf_counter() - started,
    }


def _finish(
    model: StarMoePreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    out_dir: Path,
    summary: dict[str, Any],
) -> TrainResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / CHECKPOINT).unlink(missing_ok=True)
    share_checkpoint(out_dir)
    return TrainResult(out_dir, summary)


def _token_stream(tokenizer: PreTrainedTokenizerFast, docs: Sequence[str]) -> torch.Tensor:
    """All documents' tokens, each followed by the end-of-text token, as one 1-D tensor."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(list(docs), add_special_tokens=False)["input_ids"]
    return torch.tensor([t for doc in ids for t in (*doc, eos)], dtype=torch.long)


def lm_sampler(stream: torch.Tensor, seq_len: int, batch_size: int) -> Callable[[torch.Generator], Batch]:
    """Draws batches of random windows of `stream` as next-token training batches."""

    def next_batch(generator: torch.Generator) -> Batch:
        starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=generator)
        ids = torch.stack([stream[s : s + seq_len] for s in starts.tolist()])
        return {"input_ids": ids, "labels": ids}

    return next_batch


def lm_passes(stream: torch.Tensor, seq_len: int, batch_size: int, tokens: int) -> list[Batch]:
    """Evenly spaced windows of `stream`, about `tokens` tokens in all, batched: one calibration pass."""
    count = max(1, min(tokens, len(stream) - seq_len) // seq_len)
    starts = torch.linspace(0, len(stream) - seq_len, count).long().tolist()
    windows = torch.stack([stream[s : s + seq_len] for s in starts])
    return [{"input_ids": chunk} for chunk in windows.split(batch_size)]


def classifier_sampler(
    ids: Sequence[list[int]], labels: torch.Tensor, pad_id: int, batch_size: int
) -> Callable[[torch.Generator], Batch]:
    """Draws padded batches of labelled examples."""

    def next_batch(generator: torch.Generator) -> Batch:
        picks = torch.randint(0, len(ids), (batch_size,), generator=generator).tolist()
        batch, mask = pad_right([ids[i] for i in picks], pad_id)
        return {"input_ids": batch, "attention_mask": mask, "labels": labels[picks]}

    return next_batch


def classifier_passes(ids: Sequence[list[int]], pad_id: int, batch_size: int, tokens: int) -> list[Batch]:
    """The first examples, about `tokens` tokens in all, as padded batches: one calibration pass."""
    taken, count = [], 0
    for example in ids:
        if count >= tokens:
            break
        taken.append(example)
        count += len(example)
    batches = []
    for start in range(0, len(taken), batch_size):
        batch, mask = pad_right(taken[start : start + batch_size], pad_id)
        batches.append({"input_ids": batch, "attention_mask": mask})
    return batches


@torch.no_grad()
def _heldout_lm_loss(
    model: StarMoeForCausalLM, stream: torch.Tensor, seq_len: int, max_tokens: int
) -> tuple[float, torch.Tensor]:
    """Mean next-token cross entropy (nats) over non-overlapping windows, and the targets it scored."""
    if len(stream) < seq_len:
        raise ValueError(f"held-out data has {len(stream)} tokens, fewer than one sequence of {seq_len}")
    n_windows = max(1, min(len(stream) // seq_len, max_tokens // seq_len))
    windows = stream[: n_windows * seq_len].view(n_windows, seq_len)
    total, targets = 0.0, []
    for chunk in windows.split(16):
        logits = model(input_ids=chunk).logits[:, :-1]
        total += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), chunk[:, 1:].reshape(-1), reduction="sum"
        ).item()
        targets.append(chunk[:, 1:].reshape(-1))
    scored = torch.cat(targets)
    return total / len(scored), scored


def unigram_cross_entropy(train_stream: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> float:
    """Cross entropy (nats) of `targets` under the add-one-smoothed unigram distribution of training."""
    counts = torch.bincount(train_stream, minlength=vocab_size).double() + 1
    log_probs = (counts / counts.sum()).log()
    return -log_probs[targets].mean().item()


def train_lm(
    train_docs: Sequence[str],
    eval_docs: Sequence[str],
    out_dir: Path,
    preset: Preset,
    tokenizer: PreTrainedTokenizerFast | None = None,
    seed: int = 0,
    progress: bool = True,
    calibration: CalibrationConfig | None = None,
) -> TrainResult:
    """Trains a STAR MoE causal LM on documents; reports held-out loss against a unigram baseline. With
    `calibration`, training ends with a calibration phase (`calibrate.py`), measured before and after."""
    torch.manual_seed(seed)
    tokenizer = tokenizer or train_tokenizer(train_docs, preset.vocab_size, model_max_length=preset.seq_len * 4)
    train_stream = _token_stream(tokenizer, train_docs)
    eval_stream = _token_stream(tokenizer, eval_docs)
    if len(train_stream) <= preset.seq_len:
        raise ValueError(f"training data has {len(train_stream)} tokens, fewer than one sequence of {preset.seq_len}")
    model = StarMoeForCausalLM(_build_config(preset, tokenizer))
    next_batch = lm_sampler(train_stream, preset.seq_len, preset.batch_size)

    summary: dict[str, Any] = {"task": "lm", "preset": preset.name, "seed": seed}
    summary |= fit(model, next_batch, preset, out_dir, seed, f"train lm ({preset.name})", progress)
    if calibration is not None:
        uncalibrated, _ = _heldout_lm_loss(model, eval_stream, preset.seq_len, preset.eval_tokens)
        summary["uncalibrated_heldout_loss"] = uncalibrated
        passes = lm_passes(train_stream, preset.seq_len, preset.batch_size, calibration.pass_tokens)
        summary["calibration"] = calibrate(model, passes, next_batch, preset, calibration, seed, progress)
    heldout, targets = _heldout_lm_loss(model, eval_stream, preset.seq_len, preset.eval_tokens)
    summary |= {
        "train_tokens": len(train_stream),
        "heldout_tokens_scored": len(targets),
        "heldout_loss": heldout,
        "unigram_heldout_loss": unigram_cross_entropy(train_stream, targets, len(tokenizer)),
    }
    return _finish(model, tokenizer, out_dir, summary)


@torch.no_grad()
def _accuracy(
    model: StarMoeForSequenceClassification, ids: Sequence[list[int]], labels: torch.Tensor, pad_id: int
) -> float:
    predictions = []
    for start in range(0, len(ids), 64):
        batch, mask = pad_right(list(ids[start : start + 64]), pad_id)
        predictions.append(model(input_ids=batch, attention_mask=mask).logits.argmax(-1))
    return (torch.cat(predictions) == labels).float().mean().item()


def train_classifier(
    train_examples: Sequence[tuple[str, int]],
    eval_examples: Sequence[tuple[str, int]],
    label_names: Sequence[str],
    out_dir: Path,
    preset: Preset,
    tokenizer: PreTrainedTokenizerFast | None = None,
    seed: int = 0,
    progress: bool = True,
    init_from: Path | None = None,
    calibration: CalibrationConfig | None = None,
) -> TrainResult:
    """Trains a STAR MoE sequence classifier; reports held-out accuracy against the majority class.

    With `init_from` (a causal-LM checkpoint), the classifier starts from that model's backbone and
    tokenizer and only its head is new: fine-tuning a pretrained LM rather than training from scratch.
    With `calibration`, training ends with a calibration phase (`calibrate.py`).
    """
    torch.manual_seed(seed)
    labels = {
        "num_labels": len(label_names),
        "id2label": dict(enumerate(label_names)),
        "label2id": {name: i for i, name in enumerate(label_names)},
    }
    if init_from is not None:
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(init_from)
        model = StarMoeForSequenceClassification.from_pretrained(init_from, **labels)
    else:
        tokenizer = tokenizer or train_tokenizer(
            [t for t, _ in train_examples], preset.vocab_size, model_max_length=preset.seq_len * 4
        )
        model = StarMoeForSequenceClassification(_build_config(preset, tokenizer, **labels))

    def encode(examples: Sequence[tuple[str, int]]) -> tuple[list[list[int]], torch.Tensor]:
        texts = [t for t, _ in examples]
        ids = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=preset.seq_len)
        return ids["input_ids"], torch.tensor([y for _, y in examples], dtype=torch.long)

    train_ids, train_labels = encode(train_examples)
    eval_ids, eval_labels = encode(eval_examples)

    next_batch = classifier_sampler(train_ids, train_labels, tokenizer.pad_token_id, preset.batch_size)
    summary: dict[str, Any] = {
        "task": "classifier",
        "preset": preset.name,
        "seed": seed,
        "labels": list(label_names),
    }
    summary |= fit(model, next_batch, preset, out_dir, seed, f"train classifier ({preset.name})", progress)
    if calibration is not None:
        summary["uncalibrated_heldout_accuracy"] = _accuracy(model, eval_ids, eval_labels, tokenizer.pad_token_id)
        passes = classifier_passes(train_ids, tokenizer.pad_token_id, preset.batch_size, calibration.pass_tokens)
        summary["calibration"] = calibrate(model, passes, next_batch, preset, calibration, seed, progress)
    accuracy = _accuracy(model, eval_ids, eval_labels, tokenizer.pad_token_id)
    majority_label, _ = Counter(train_labels.tolist()).most_common(1)[0]
    summary |= {
        "train_examples": len(train_ids),
        "heldout_examples": len(eval_ids),
        "heldout_accuracy": accuracy,
        "majority_baseline_accuracy": (eval_labels == majority_label).float().mean().item(),
    }
    return _finish(model, tokenizer, out_dir, summary)


def calibrate_checkpoint(
    model_dir: Path,
    train_records: Sequence[dict[str, Any]],
    eval_records: Sequence[dict[str, Any]],
    out_dir: Path,
    calibration: CalibrationConfig | None = None,
    seq_len: int = 128,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> TrainResult:
    """Calibrates an existing checkpoint (a causal LM on `{text}` records, a classifier on `{text, label}`
    records with the checkpoint's labels) and writes it to `out_dir`, measured before and after."""
    calibration = calibration or CalibrationConfig()
    torch.manual_seed(seed)
    config = StarMoeConfig.from_pretrained(require_model_dir(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    seq_len = min(seq_len, config.max_position_embeddings)
    preset = Preset("calibrate", seq_len=seq_len, batch_size=batch_size)
    classifier = any(name.endswith("ForSequenceClassification") for name in config.architectures or ())
    summary: dict[str, Any] = {"task": "calibrate", "model": model_dir.name, "seed": seed}
    if not classifier:
        lm = StarMoeForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        train_stream = _token_stream(tokenizer, [r["text"] for r in train_records])
        eval_stream = _token_stream(tokenizer, [r["text"] for r in eval_records])
        if len(train_stream) <= seq_len:
            raise ValueError(f"calibration data has {len(train_stream)} tokens, fewer than one sequence of {seq_len}")
        before, _ = _heldout_lm_loss(lm, eval_stream, seq_len, preset.eval_tokens)
        passes = lm_passes(train_stream, seq_len, batch_size, calibration.pass_tokens)
        summary["calibration"] = calibrate(
            lm, passes, lm_sampler(train_stream, seq_len, batch_size), preset, calibration, seed, progress
        )
        after, _ = _heldout_lm_loss(lm, eval_stream, seq_len, preset.eval_tokens)
        summary |= {"uncalibrated_heldout_loss": before, "heldout_loss": after}
        return _finish(lm, tokenizer, out_dir, summary)

    model = StarMoeForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    label2id = model.config.label2id

    def encode(records: Sequence[dict[str, Any]]) -> tuple[list[list[int]], torch.Tensor]:
        unknown = {str(r["label"]) for r in records} - label2id.keys()
        if unknown:
            raise ValueError(f"labels not among the checkpoint's ({sorted(label2id)}): {sorted(unknown)}")
        ids = tokenizer([r["text"] for r in records], add_special_tokens=False, truncation=True, max_length=seq_len)
        return ids["input_ids"], torch.tensor([label2id[str(r["label"])] for r in records], dtype=torch.long)

    train_ids, train_labels = encode(train_records)
    eval_ids, eval_labels = encode(eval_records)
    pad_id = tokenizer.pad_token_id
    before = _accuracy(model, eval_ids, eval_labels, pad_id)
    passes = classifier_passes(train_ids, pad_id, batch_size, calibration.pass_tokens)
    summary["calibration"] = calibrate(
        model,
        passes,
        classifier_sampler(train_ids, train_labels, pad_id, batch_size),
        preset,
        calibration,
        seed,
        progress,
    )
    summary |= {
        "uncalibrated_heldout_accuracy": before,
        "heldout_accuracy": _accuracy(model, eval_ids, eval_labels, pad_id),
    }
    return _finish(model, tokenizer, out_dir, summary)
