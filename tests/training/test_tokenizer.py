from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from star_serve.training.corpus import lm_corpus
from star_serve.training.tokenizer import END_OF_TEXT, train_tokenizer

VOCAB_SIZE = 1024

SAMPLES = [
    "",
    "def f(x):\n    return x  # plain ASCII\n",
    "   leading and trailing spaces , . ! ?  ",
    "tabs\tand\r\nwindows newlines\n\n\n",
    "naïve café, Straße, Ærø, œuvre",
    "日本語のテキスト、中文文本와 한국어",
    "emoji 🙂👍🏽 and flags 🇳🇿, zero\u200bwidth, e\u0301 combining",
    "control \x00\x01\x7f and the replacement char \ufffd",
    f"two docs{END_OF_TEXT}joined",
]


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return lm_corpus()[0][:1500]


@pytest.fixture(scope="module")
def tokenizer(docs: list[str]) -> PreTrainedTokenizerFast:
    return train_tokenizer(docs, VOCAB_SIZE, model_max_length=512)


@pytest.mark.parametrize("text", SAMPLES)
def test_decode_inverts_encode(tokenizer: PreTrainedTokenizerFast, text: str) -> None:
    ids = tokenizer.encode(text)
    assert all(0 <= i < len(tokenizer) for i in ids)
    assert tokenizer.decode(ids) == text


def test_special_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    assert tokenizer.bos_token == tokenizer.eos_token == tokenizer.pad_token == END_OF_TEXT
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    assert tokenizer.model_max_length == 512
    assert tokenizer.eos_token_id not in tokenizer("Return the value.")["input_ids"]
    assert tokenizer.encode(f"a{END_OF_TEXT}b").count(tokenizer.eos_token_id) == 1


def test_vocab_size_respected(docs: list[str], tokenizer: PreTrainedTokenizerFast) -> None:
    assert len(tokenizer) == VOCAB_SIZE
    small = train_tokenizer(["tiny corpus, tiny corpus"], 4096)
    assert 257 < len(small) < 4096
    with pytest.raises(ValueError):
        train_tokenizer(docs, 200)


def test_merges_compress_text(tokenizer: PreTrainedTokenizerFast) -> None:
    heldout = lm_corpus()[1][:100]
    chars = sum(map(len, heldout))
    tokens = sum(len(ids) for ids in tokenizer(heldout)["input_ids"])
    assert chars / tokens > 2.5


def test_training_is_deterministic(docs: list[str], tokenizer: PreTrainedTokenizerFast) -> None:
    again = train_tokenizer(iter(docs), VOCAB_SIZE, model_max_length=512)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_save_and_auto_load_round_trip(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(loaded, PreTrainedTokenizerFast)
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (END_OF_TEXT,) * 3
    assert loaded.model_max_length == 512
    assert len(loaded) == len(tokenizer)
    texts = [*SAMPLES, *lm_corpus()[1][:50]]
    assert loaded(texts)["input_ids"] == tokenizer(texts)["input_ids"]
    assert all(loaded.decode(loaded.encode(text)) == text for text in SAMPLES)
