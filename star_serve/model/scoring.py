"""How well a model does on token sequences with given routing bases, without labels: the mean next-token
loss of a causal LM, the mean predictive entropy of a classifier (a proxy: lower is a more confident model,
not always a more accurate one). Every row of a bank of bases is scored on the same sequences in one
batched forward, so that candidate, current and trained bases are compared on exactly the same tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .modeling import StarMoeForCausalLM, StarMoeForSequenceClassification, StarMoePreTrainedModel
from .routing import Routing

BATCH_TOKENS = 8192  # padded tokens per forward at most


def score_sequences(
    model: StarMoePreTrainedModel,
    sequences: list[torch.Tensor],  # each (S_i,) token ids
    bank: torch.Tensor,  # (T, L, E, D): the bases to score, one row each
) -> list[float]:
    """Each bank row's score on `sequences`: mean next-token loss (nats/token) for a causal LM, mean
    predictive entropy (nats/sequence) for a classifier. Lower is better for both."""
    totals, counts = sequence_scores(model, sequences, bank)
    return (totals.sum(1) / counts.sum().clamp_min(1)).tolist()


@torch.inference_mode()
def sequence_scores(
    model: StarMoePreTrainedModel,
    sequences: list[torch.Tensor],  # each (S_i,) token ids
    bank: torch.Tensor,  # (T, L, E, D)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row and sequence, in the order given: the summed score (T, N) float64 (next-token losses, or a
    classifier's predictive entropy) and what it sums over (N,) (predicted tokens, or 1), so that scores of
    different sequences add up."""
    if not sequences:
        raise ValueError("no sequences to score")
    device = next(model.parameters()).device
    rows = bank.shape[0]
    bank = bank.to(device, model.dtype)
    totals = torch.zeros(rows, len(sequences), dtype=torch.float64)
    counts = torch.zeros(len(sequences), dtype=torch.float64)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for chunk in _chunks(order, [len(s) for s in sequences], BATCH_TOKENS // rows):
        ids, mask = _padded([sequences[i] for i in chunk], device)  # (B, S)
        b = ids.shape[0]
        tenant = torch.arange(rows, device=device).repeat_interleave(b)  # (T*B,): every row on every sequence
        ids, mask = ids.repeat(rows, 1), mask.repeat(rows, 1)
        routing = Routing(bank=bank, index=tenant)
        if isinstance(model, StarMoeForCausalLM):
            logits = model(input_ids=ids, attention_mask=mask, routing=routing).logits
            losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
            losses = (losses * mask[:, 1:]).sum(1)  # (T*B,)
            counts[chunk] = mask[:b, 1:].sum(1).double().cpu()
        elif isinstance(model, StarMoeForSequenceClassification):
            logits = model(input_ids=ids, attention_mask=mask, routing=routing).logits
            losses = torch.special.entr(logits.float().softmax(-1)).sum(-1)  # (T*B,) predictive entropy
            counts[chunk] = 1.0
        else:
            raise TypeError(f"cannot score a {type(model).__name__}")
        totals[:, chunk] = losses.view(rows, b).double().cpu()
    return totals, counts


def _chunks(order: list[int], lengths: list[int], tokens: int) -> list[list[int]]:
    """The sequences' indices (`order`, by length) in groups of at most `tokens` padded tokens (at least one)."""
    chunks: list[list[int]] = [[]]
    for i in order:
        if chunks[-1] and (len(chunks[-1]) + 1) * lengths[i] > tokens:
            chunks.append([])
        chunks[-1].append(i)
    return chunks


def _padded(sequences: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S) ids, right-padded with 0, and the (B, S) mask of real tokens."""
    lengths = torch.tensor([len(s) for s in sequences])
    ids = torch.zeros(len(sequences), int(lengths.max()), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = s
    mask = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
    return ids.to(device), mask.to(device, torch.long)
