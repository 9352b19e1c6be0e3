import inspect
import json
from collections import Counter
from pathlib import PurePosixPath

import pytest

from star_serve.training import corpus
from star_serve.training.corpus import classifier_dataset, lm_corpus, stdlib_root


def _rebuild() -> None:
    for cached in (corpus._documents, corpus._lm_records, corpus._classifier_records):
        cached.cache_clear()


def test_stdlib_root_is_the_running_stdlib() -> None:
    assert (stdlib_root() / "ast.py").is_file()
    assert (stdlib_root() / "pydoc_data" / "topics.py").is_file()


def test_builds_are_deterministic() -> None:
    first_lm, first_cls = lm_corpus(), classifier_dataset()
    _rebuild()
    assert lm_corpus() == first_lm
    assert classifier_dataset() == first_cls


def test_callers_get_copies() -> None:
    train, _ = lm_corpus()
    train.clear()
    assert lm_corpus()[0]


def test_lm_corpus_content() -> None:
    train, heldout = lm_corpus()
    docs = train + heldout
    assert len(docs) > 5000
    assert len(set(docs)) == len(docs)
    assert min(map(len, docs)) >= corpus.MIN_DOC_CHARS
    assert any(doc.startswith('The "if" statement') for doc in docs)
    assert inspect.cleandoc(json.dumps.__doc__ or "") in docs


def test_lm_split_is_by_file_and_about_five_percent() -> None:
    train, heldout = corpus._lm_records()
    train_files, heldout_files = {rel for _, rel in train}, {rel for _, rel in heldout}
    assert heldout_files and not train_files & heldout_files
    for rel in train_files | heldout_files:
        parts = PurePosixPath(rel).parts[:-1]
        assert not {"test", "tests", "idle_test", "site-packages"} & set(parts), rel
    held_chars = sum(len(text) for text, _ in heldout)
    total_chars = held_chars + sum(len(text) for text, _ in train)
    assert 0.04 <= held_chars / total_chars <= 0.06


def test_classifier_labels_and_paragraphs() -> None:
    train, heldout, labels = classifier_dataset()
    assert len(labels) == len(set(labels)) >= 5
    assert all(label == label.lower() and label.isidentifier() and len(label) <= 12 for label in labels)
    texts = [text for text, _ in train + heldout]
    assert len(set(texts)) == len(texts)
    lo, hi = corpus.PARAGRAPH_CHARS
    assert all(lo <= len(text) <= hi and text == " ".join(text.split()) for text in texts)
    assert {index for _, index in train + heldout} == set(range(len(labels)))


def test_classifier_split_is_by_file_with_every_class_held_out() -> None:
    train, heldout = corpus._classifier_records()
    assert not {rel for _, rel, _ in train} & {rel for _, rel, _ in heldout}
    labels = list(corpus.FAMILIES)
    assert all(corpus._family_of(rel) == labels[index] for _, rel, index in train + heldout)
    train_counts = Counter(index for _, _, index in train)
    heldout_counts = Counter(index for _, _, index in heldout)
    for index in range(len(corpus.FAMILIES)):
        share = heldout_counts[index] / (heldout_counts[index] + train_counts[index])
        assert 0.08 <= share <= 0.2, (index, share)


@pytest.mark.parametrize("split", ["all", "heldout"])
def test_classifier_classes_are_balanced(split: str) -> None:
    train, heldout, _ = classifier_dataset()
    examples = heldout if split == "heldout" else train + heldout
    counts = Counter(index for _, index in examples)
    assert max(counts.values()) / len(examples) <= 0.3
    assert max(counts.values()) <= corpus.MAX_PER_CLASS
    if split == "all":
        assert min(counts.values()) >= 300
