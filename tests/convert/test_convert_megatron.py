"""`star-serve convert megatron`: reference-shaped checkpoints in both formats and every expert layout convert
to a model whose logits equal the reference forward's (float32, 1e-4) with the same experts chosen, served
through the API with the same log-probabilities; what cannot be mapped is refused by name."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from star_serve.api.app import create_app
from star_serve.cli import main
from star_serve.config import Settings
from star_serve.convert import UnmappableCheckpoint, convert_megatron
from star_serve.model.loading import load_model

from .reference import EXPERT_LAYOUTS, Reference, Shape, gpt2_files

ATOL = 1e-4
PROMPT_IDS = [256, 72, 257, 3, 100, 258, 17, 259, 5, 200, 44, 9]


@pytest.fixture
def tokenizer_files(tmp_path: Path) -> tuple[Path, Path, int]:
    return gpt2_files(tmp_path)


def _convert(reference: Reference, load: Path, files: tuple[Path, Path, int], out: Path) -> dict[str, Any]:
    vocab_file, merge_file, _ = files
    return convert_megatron(load, vocab_file, merge_file, out, progress=False)


def _assert_equivalent(reference: Reference, out: Path) -> None:
    model, _ = load_model(out, "generate", torch.device("cpu"), torch.float32)
    ids = torch.tensor(PROMPT_IDS)
    expected, chosen = reference.forward(ids)
    with torch.no_grad():
        got = model(input_ids=ids[None], output_routing=True)
    assert got.logits.shape == (1, len(ids), reference.vocab)
    assert (got.logits[0] - expected).abs().max() < ATOL
    for layer, experts in enumerate(chosen):
        assert torch.equal(got.expert_indices[layer][0], experts), f"layer {layer} routes differently"


@pytest.mark.parametrize("experts", EXPERT_LAYOUTS)
def test_a_legacy_checkpoint_converts_to_the_reference_model(
    experts: str, tmp_path: Path, tokenizer_files: tuple[Path, Path, int]
) -> None:
    reference = Reference.random(Shape(), vocab=tokenizer_files[2], seed=1)
    reference.save_legacy(tmp_path / "run", experts)
    summary = _convert(reference, tmp_path / "run", tokenizer_files, tmp_path / "out")
    assert summary["format"] == "torch"
    assert summary["vocabulary"] == {"tokens": reference.vocab, "checkpoint_rows": reference.shape.padded_vocab}
    _assert_equivalent(reference, tmp_path / "out")


def test_a_distributed_checkpoint_converts_to_the_reference_model_without_megatron(
    tmp_path: Path, tokenizer_files: tuple[Path, Path, int]
) -> None:
    reference = Reference.random(Shape(layers=3, topk=2), vocab=tokenizer_files[2], seed=2)
    iteration = reference.save_torch_dist(tmp_path / "run")
    assert not any(name.startswith("megatron") for name in sys.modules)  # its classes pickled, not importable
    summary = _convert(reference, tmp_path / "run", tokenizer_files, tmp_path / "out")
    assert summary["format"] == "torch_dist" and summary["source"] == str(iteration)
    assert summary["router_type"] == "star" and summary["layers"] == 3 and summary["experts"] == 4
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["rope_theta"] == 1e6 and config["num_key_value_heads"] == 2 and config["num_experts_per_tok"] == 2
    _assert_equivalent(reference, tmp_path / "out")


def test_bf16_weights_stay_bf16_and_the_gha_only_runs_drop_the_unused_linear_gate(
    tmp_path: Path, tokenizer_files: tuple[Path, Path, int]
) -> None:
    reference = Reference.random(Shape(), vocab=tokenizer_files[2], dtype=torch.bfloat16)
    reference.args_overrides["moe_star_gha_only"] = True
    reference.save_torch_dist(tmp_path / "run")
    summary = _convert(reference, tmp_path / "run", tokenizer_files, tmp_path / "out")
    assert summary["dtype"] == "bfloat16" and summary["router_type"] == "star_gha_only"
    model, _ = load_model(tmp_path / "out", "generate", torch.device("cpu"), torch.float32)
    router = model.model.layers[0].mlp.router
    assert not hasattr(router, "weight")
    assert torch.equal(router.basis, reference.layers[0]["basis"].float())


def test_the_tokenizer_is_gpt2_bpe_from_the_two_files(tmp_path: Path, tokenizer_files: tuple[Path, Path, int]) -> None:
    from transformers import AutoTokenizer

    reference = Reference.random(Shape(), vocab=tokenizer_files[2])
    reference.save_legacy(tmp_path / "run", "te_grouped")
    _convert(reference, tmp_path / "run", tokenizer_files, tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    vocab = json.loads(tokenizer_files[0].read_text())
    ids = tokenizer.encode(" the other", add_special_tokens=False)
    assert ids[0] == vocab["Ġthe"] and vocab["er"] in ids  # the merges apply, spaces are byte symbols
    assert tokenizer.decode(ids) == " the other"
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == vocab["<|endoftext|>"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["eos_token_id"] == config["bos_token_id"] == vocab["<|endoftext|>"]
    assert config["vocab_size"] == len(vocab)


def test_the_converted_model_serves_the_reference_log_probabilities(
    tmp_path: Path, tokenizer_files: tuple[Path, Path, int]
) -> None:
    reference = Reference.random(Shape(), vocab=tokenizer_files[2], seed=3)
    reference.save_torch_dist(tmp_path / "run")
    _convert(reference, tmp_path / "run", tokenizer_files, tmp_path / "out")
    settings = Settings(
        models=[f"star-ref={tmp_path / 'out'}"],
        state_dir=tmp_path / "state",
        cache_dir=tmp_path / "cache",
        device="cpu",
        cpu_threads=torch.get_num_threads(),
        adaptation="off",
    )
    body = {"model": "star-ref", "prompt": PROMPT_IDS, "max_tokens": 0, "echo": True, "logprobs": 0}
    with TestClient(create_app(settings)) as client:
        answer = client.post("/v1/completions", json=body)
    assert answer.status_code == 200, answer.text
    served = answer.json()["choices"][0]["logprobs"]["token_logprobs"]
    expected = reference.forward(torch.tensor(PROMPT_IDS))[0].log_softmax(-1)
    want = [expected[i - 1, token].item() for i, token in enumerate(PROMPT_IDS) if i > 0]
    assert served[0] is None
    assert max(abs(a - b) for a, b in zip(served[1:], want, strict=True)) < ATOL


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"extra": "decoder.layers.self_attention.linear_qkv.bias"}, "decoder.layers.0.self_attention.linear_qkv.bias"),
        ({"extra": "decoder.layers.mlp.shared_experts.linear_fc1.weight"}, "layers.0.mlp.shared_experts.linear_fc1"),
        ({"extra": "embedding.position_embeddings.weight"}, "embedding.position_embeddings.weight"),
        ({"drop": "mlp.router.star_gate.alpha"}, "decoder.layers.0.mlp.router.star_gate.alpha"),
        ({"args": {"moe_router_pre_softmax": False}}, "--moe-router-pre-softmax"),
        ({"args": {"normalization": "LayerNorm"}}, "RMSNorm"),
        ({"args": {"swiglu": False}}, "SwiGLU"),
        ({"args": {"num_query_groups": 4}}, "self_attention.linear_qkv.weight has shape"),
        ({"args": {"ffn_hidden_size": 8, "moe_ffn_hidden_size": 8}}, "mlp.experts.experts.linear_fc1.weight gives"),
        ({"rows": 100}, "vocabulary has 100 rows"),
    ],
)
def test_what_cannot_be_mapped_is_refused_by_name(
    change: dict[str, Any], named: str, tmp_path: Path, tokenizer_files: tuple[Path, Path, int]
) -> None:
    reference = Reference.random(Shape(), vocab=tokenizer_files[2])
    reference.args_overrides.update(change.get("args", {}))
    if "rows" in change:
        reference.embedding = reference.embedding[: change["rows"]]
    extra = {}
    if "extra" in change:
        layered = change["extra"].startswith("decoder.layers.")
        extra[change["extra"]] = torch.zeros(reference.shape.layers, 8) if layered else torch.zeros(8)
    drop = (change["drop"],) if "drop" in change else ()
    reference.save_torch_dist(tmp_path / "run", extra=extra, drop=drop)
    with pytest.raises(UnmappableCheckpoint, match=re.escape(named)):
        _convert(reference, tmp_path / "run", tokenizer_files, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written of a refused checkpoint


def test_the_command_line_converts_and_refuses_with_a_message(
    tmp_path: Path, tokenizer_files: tuple[Path, Path, int], capsys: pytest.CaptureFixture[str]
) -> None:
    vocab_file, merge_file, vocab = tokenizer_files
    reference = Reference.random(Shape(), vocab=vocab)
    reference.save_legacy(tmp_path / "run", "local_experts")
    files = ["--vocab-file", str(vocab_file), "--merge-file", str(merge_file)]
    main(["convert", "megatron", "--load", str(tmp_path / "run"), *files, "--out", str(tmp_path / "out")])
    model, _ = load_model(tmp_path / "out", "generate", torch.device("cpu"), torch.float32)
    assert json.loads(capsys.readouterr().out)["parameters"] == sum(t.numel() for t in model.state_dict().values())
    with pytest.raises(SystemExit, match="not a Megatron checkpoint"):
        main(["convert", "megatron", "--load", str(tmp_path), *files, "--out", str(tmp_path / "other")])
