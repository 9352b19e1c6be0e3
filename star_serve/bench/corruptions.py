"""Text corruptions for `bench adaptation`'s corruption shift, at severities 0 (identity) to 5 in the
spirit of ImageNet-C's levels and GLUE-X's perturbations: typos, deletions, case flips, word shuffles and
injected junk."""

from __future__ import annotations

import random
import string
from collections.abc import Callable

# Per corruption, its parameter at severities 0 (identity) to 5, in the spirit of ImageNet-C's levels.
SEVERITY_LEVELS: dict[str, tuple[float, ...]] = {
    "char_swap": (0.0, 0.03, 0.06, 0.1, 0.15, 0.25),  # chance that a letter swaps with the next letter
    "char_delete": (0.0, 0.03, 0.06, 0.1, 0.15, 0.25),  # chance that a non-space character is deleted
    "case_flip": (0.0, 0.05, 0.1, 0.2, 0.3, 0.5),  # chance that a letter flips case
    "word_shuffle": (1, 2, 3, 4, 6, 10),  # words shuffled within windows of this many words
    "noise_inject": (0.0, 0.05, 0.1, 0.2, 0.3, 0.5),  # chance that a junk string follows a word
}
_JUNK = string.ascii_letters + string.digits + "#$%&*@^~"


def _char_swap(text: str, p: float, rng: random.Random) -> str:
    chars = list(text)
    i = 0
    while i < len(chars) - 1:
        if chars[i].isalpha() and chars[i + 1].isalpha() and rng.random() < p:
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
            i += 2
        else:
            i += 1
    return "".join(chars)


def _char_delete(text: str, p: float, rng: random.Random) -> str:
    return "".join(c for c in text if c.isspace() or rng.random() >= p)


def _case_flip(text: str, p: float, rng: random.Random) -> str:
    return "".join(c.swapcase() if c.isalpha() and rng.random() < p else c for c in text)


def _word_shuffle(text: str, window: float, rng: random.Random) -> str:
    words, size = text.split(" "), int(window)
    shuffled: list[str] = []
    for start in range(0, len(words), size):
        piece = words[start : start + size]
        rng.shuffle(piece)
        shuffled += piece
    return " ".join(shuffled)


def _noise_inject(text: str, p: float, rng: random.Random) -> str:
    words: list[str] = []
    for word in text.split(" "):
        words.append(word)
        if rng.random() < p:
            words.append("".join(rng.choice(_JUNK) for _ in range(rng.randint(2, 6))))
    return " ".join(words)


_CORRUPT: dict[str, Callable[[str, float, random.Random], str]] = {
    "char_swap": _char_swap,
    "char_delete": _char_delete,
    "case_flip": _case_flip,
    "word_shuffle": _word_shuffle,
    "noise_inject": _noise_inject,
}
CORRUPTIONS = tuple(_CORRUPT)


def corrupt(text: str, corruption: str, severity: int, seed: int = 0) -> str:
    """`text` under `corruption` at `severity` (0: unchanged, up to 5). Deterministic for a seed: the
    random draws depend only on the seed, the corruption, the severity and the text itself."""
    if severity == 0:
        return text
    rng = random.Random(f"{seed}:{corruption}:{severity}:{text}")
    return _CORRUPT[corruption](text, SEVERITY_LEVELS[corruption][severity], rng)
