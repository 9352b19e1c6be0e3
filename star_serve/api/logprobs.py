"""Log-probabilities in OpenAI's two shapes: the legacy completions one (parallel lists, with the prompt's
tokens under `echo`) and chat's (a list of tokens, each with its alternatives).

A token's text is the tokenizer's decoding of that token alone, as vLLM reports it; a token that is part of
a multi-byte character reads as U+FFFD there, and its `bytes` are those of that text."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from ..engine.types import TokenLogprob
from .schemas import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob


class TokenTexts:
    """Each token's text, decoded once per server."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __getitem__(self, token: int) -> str:
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = self.tokenizer.decode([token])
        return text


def completion_logprobs(
    texts: TokenTexts,
    entries: Sequence[TokenLogprob],
    start: int = 0,  # the first token's offset in the choice's text
) -> CompletionLogprobs:
    """The legacy shape: each token's alternatives include the token itself, as vLLM's do. Alternatives are
    keyed by text, so of two tokens that read the same (two halves of different characters) the more likely
    one's value stays: a client comparing the token with the best alternative still sees the truth."""
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    offset = start
    for entry in entries:
        text = texts[entry.token]
        tokens.append(text)
        values.append(entry.logprob)
        top: dict[str, float] = {}
        for token, value in (*entry.top, (entry.token, entry.logprob)):
            top.setdefault(texts[token], value)  # tokens that read the same: the most likely one's
        tops.append(top)
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)


def echoed_logprobs(
    texts: TokenTexts, prompt: Sequence[int], scored: Sequence[TokenLogprob], generated: Sequence[TokenLogprob]
) -> CompletionLogprobs:
    """The legacy shape under `echo`: the prompt's tokens (the first with null log-probability), then the
    generated ones, offsets counted from the start of the prompt."""
    first = texts[prompt[0]]
    rest = completion_logprobs(texts, [*scored, *generated], start=len(first))
    return CompletionLogprobs(
        tokens=[first, *rest.tokens],
        token_logprobs=[None, *rest.token_logprobs],
        top_logprobs=[None, *rest.top_logprobs],
        text_offset=[0, *rest.text_offset],
    )


def chat_logprobs(texts: TokenTexts, entries: Sequence[TokenLogprob]) -> ChatLogprobs:
    def top(token: int, value: float) -> TopLogprob:
        text = texts[token]
        return TopLogprob(token=text, logprob=value, bytes=list(text.encode()))

    content = [
        ChatTokenLogprob(**top(e.token, e.logprob).model_dump(), top_logprobs=[top(t, v) for t, v in e.top])
        for e in entries
    ]
    return ChatLogprobs(content=content)


def mean_logprob(entries: Sequence[TokenLogprob]) -> float:
    """What `best_of` ranks by: the log-probability per generated token (OpenAI's "highest log probability
    per token"); a choice that generated nothing ranks last."""
    return sum(e.logprob for e in entries) / len(entries) if entries else float("-inf")
