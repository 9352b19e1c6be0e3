"""Deterministic offline datasets built from the text that ships with Python 3.11 itself.

The demo models need a language-modelling corpus and a real labelled task, but the machines that train them
have no network access.  The standard library's docstrings and pydoc help topics are about two megabytes of
English technical prose that every interpreter carries, so both datasets are derived from them.

Held-out splits are made per source file (a pydoc topic counts as its own file), so that near-duplicate
docstrings of one module never straddle the split.  Files are visited in the order of a SHA-1 hash of their
relative path and fill the held-out budget; files that would overshoot it are skipped, which keeps the
held-out share close to its target even though a few files (``tkinter/__init__.py``) are huge.  Exact
duplicate texts are kept once only, for the same reason.  Outputs are ordered by a hash of their text: fixed
from run to run, independent of filesystem order, and any prefix is a fair sample.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import os
import re
import sysconfig
import warnings
from collections import Counter
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

MIN_DOC_CHARS = 40
LM_HELDOUT_FRACTION = 0.05
CLS_HELDOUT_FRACTION = 0.15
PARAGRAPH_CHARS = (60, 600)
MAX_PER_CLASS = 600

_Item = TypeVar("_Item", bound=tuple)

_SKIP_DIRS = frozenset({"site-packages", "test", "tests", "idle_test", "__pycache__"})
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)

FAMILIES: dict[str, tuple[str, ...]] = {
    "asyncio": ("asyncio",),
    "email": ("email",),
    "net": (
        "http",
        "urllib",
        "xmlrpc",
        "wsgiref",
        "cgi",
        "ftplib",
        "smtplib",
        "smtpd",
        "imaplib",
        "poplib",
        "nntplib",
        "telnetlib",
        "socket",
        "socketserver",
        "ssl",
    ),
    "testing": ("unittest", "doctest"),
    "concurrency": (
        "multiprocessing",
        "concurrent",
        "threading",
        "_threading_local",
        "queue",
        "sched",
        "subprocess",
    ),
    "tkinter": ("tkinter",),
}
"""Label name -> top-level stdlib modules/packages.  Each family has 300+ paragraphs in CPython 3.11."""


def stdlib_root() -> Path:
    """Directory of the pure-Python standard library of the running interpreter (also inside a venv)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _stable_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def _hash_order(items: Iterable[_Item]) -> list[_Item]:
    return sorted(items, key=lambda item: (_stable_hash(item[0]), item))


def _source_files(root: Path) -> list[str]:
    """Relative POSIX paths of the stdlib's own ``.py`` files, without tests and third-party packages."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        rel_dir = Path(dirpath).relative_to(root)
        found.extend((rel_dir / name).as_posix() for name in filenames if name.endswith(".py"))
    return sorted(found)


def _definitions(node: ast.AST) -> Iterable[ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef]:
    """Pre-order walk over statements only: much faster than ``ast.walk`` and finds every docstring owner."""
    if isinstance(node, _DOC_NODES):
        yield node
    for field in ("body", "orelse", "finalbody", "handlers", "cases"):
        children = getattr(node, field, None)
        if isinstance(children, list):
            for child in children:
                yield from _definitions(child)


def _file_docstrings(path: Path) -> list[str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return []
    docs = (ast.get_docstring(node, clean=False) for node in _definitions(tree))
    return [inspect.cleandoc(doc) for doc in docs if doc]


@lru_cache(maxsize=1)
def _documents() -> tuple[tuple[str, str], ...]:
    """``(source file, text)`` for every docstring and pydoc topic, each distinct text once."""
    from pydoc_data.topics import topics

    root = stdlib_root()
    pairs = [(rel, doc) for rel in _source_files(root) for doc in _file_docstrings(root / rel)]
    pairs += [(f"pydoc_data/topics/{name}", inspect.cleandoc(topics[name])) for name in sorted(topics)]
    seen: set[str] = set()
    unique = []
    for rel, text in pairs:
        if text not in seen:
            seen.add(text)
            unique.append((rel, text))
    return tuple(unique)


def _heldout_files(sizes: dict[str, int], fraction: float) -> set[str]:
    """Files taken in stable-hash order while they fit in ``fraction`` of the total size."""
    budget = fraction * sum(sizes.values())
    held: set[str] = set()
    used = 0
    for name in sorted(sizes, key=lambda name: (_stable_hash(name), name)):
        if used + sizes[name] <= budget:
            held.add(name)
            used += sizes[name]
    return held


@lru_cache(maxsize=1)
def _lm_records() -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
    """``(train, heldout)`` as ``(text, source file)`` pairs in hash order."""
    docs = [(rel, text) for rel, text in _documents() if len(text) >= MIN_DOC_CHARS]
    sizes: Counter[str] = Counter()
    for rel, text in docs:
        sizes[rel] += len(text)
    held = _heldout_files(sizes, LM_HELDOUT_FRACTION)
    ordered = _hash_order((text, rel) for rel, text in docs)
    return (
        tuple(item for item in ordered if item[1] not in held),
        tuple(item for item in ordered if item[1] in held),
    )


def lm_corpus() -> tuple[list[str], list[str]]:
    """``(train_docs, heldout_docs)``: stdlib docstrings and pydoc topics, ~5% of characters held out."""
    train, heldout = _lm_records()
    return [text for text, _ in train], [text for text, _ in heldout]


def _family_of(rel: str) -> str | None:
    top = rel.split("/", 1)[0].removesuffix(".py")
    return next((label for label, modules in FAMILIES.items() if top in modules), None)


def _paragraphs(text: str) -> list[str]:
    lo, hi = PARAGRAPH_CHARS
    chunks = (" ".join(chunk.split()) for chunk in re.split(r"\n\s*\n", text))
    return [chunk for chunk in chunks if lo <= len(chunk) <= hi]


@lru_cache(maxsize=1)
def _classifier_records() -> tuple[tuple[tuple[str, str, int], ...], tuple[tuple[str, str, int], ...]]:
    """``(train, heldout)`` as ``(paragraph, source file, label index)`` triples in hash order."""
    labels = list(FAMILIES)
    by_label: dict[str, list[tuple[str, str]]] = {label: [] for label in labels}
    seen: set[str] = set()
    for rel, text in _documents():
        label = _family_of(rel)
        if label is None:
            continue
        for paragraph in _paragraphs(text):
            if paragraph not in seen:
                seen.add(paragraph)
                by_label[label].append((paragraph, rel))

    train: list[tuple[str, str, int]] = []
    heldout: list[tuple[str, str, int]] = []
    for index, label in enumerate(labels):
        kept = _hash_order(by_label[label])[:MAX_PER_CLASS]
        held = _heldout_files(Counter(rel for _, rel in kept), CLS_HELDOUT_FRACTION)
        for paragraph, rel in kept:
            (heldout if rel in held else train).append((paragraph, rel, index))
    return tuple(_hash_order(train)), tuple(_hash_order(heldout))


def classifier_dataset() -> tuple[list[tuple[str, int]], list[tuple[str, int]], list[str]]:
    """``(train, heldout, label_names)`` for "which stdlib module family is this docstring paragraph from".

    Paragraphs are blank-line-separated docstring chunks of 60-600 characters with whitespace collapsed.
    Classes larger than ``MAX_PER_CLASS`` are subsampled by text hash so no class dominates; ~15% of each
    class is held out, by source file.
    """
    train, heldout = _classifier_records()
    return (
        [(text, index) for text, _, index in train],
        [(text, index) for text, _, index in heldout],
        list(FAMILIES),
    )
