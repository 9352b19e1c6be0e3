"""Byte-level BPE tokenizer training for the demo models.

Byte-level BPE (as in GPT-2) needs no unknown token: every string, whatever its script, is encoded as bytes
and decodes back to itself exactly.  Training uses the ``tokenizers`` library and is deterministic for a
given text sequence and vocabulary size, so a retrained tokenizer matches a saved checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

END_OF_TEXT = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int, model_max_length: int = 1024) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE with ``vocab_size`` entries (fewer if the texts run out of merges).

    ``<|endoftext|>`` has id 0 and serves as bos, eos and pad token; nothing is added to encodings
    automatically, so callers choose where documents are separated.
    """
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    minimum = len(byte_alphabet) + 1
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum}: the 256 bytes and {END_OF_TEXT}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=byte_alphabet,
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
