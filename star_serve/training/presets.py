"""Named training presets: a model shape and the optimisation schedule that goes with it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..model import StarMoeConfig


@dataclass(frozen=True)
class Preset:
    """A model shape (fields of `StarMoeConfig`) and a training schedule."""

    name: str
    model: dict[str, Any] = field(default_factory=dict)
    vocab_size: int = 4096
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 1000
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    eval_tokens: int = 50_000
    checkpoint_every: int = 200

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        # Unit tests: seconds on a laptop core.
        Preset(
            name="tiny",
            model=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                num_local_experts=4,
                num_experts_per_tok=1,
                gha_learning_rate=1e-3,
            ),
            vocab_size=512,
            seq_len=64,
            batch_size=8,
            steps=40,
            learning_rate=3e-3,
            warmup_steps=5,
            eval_tokens=4096,
            checkpoint_every=20,
        ),
        # The embedded demo models: a few minutes on 2 CPU cores.
        Preset(
            name="demo",
            model=dict(
                hidden_size=128,
                intermediate_size=256,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=2,
                num_local_experts=8,
                num_experts_per_tok=1,
                gha_learning_rate=1e-3,
                max_position_embeddings=512,
            ),
            vocab_size=4096,
            seq_len=128,
            batch_size=16,
            steps=800,
            learning_rate=3e-3,
            warmup_steps=60,
            eval_tokens=65_536,
        ),
        # The reference models of the STAR paper (a GPU and a real corpus are needed to train these).
        Preset(
            name="star-182m",
            model=dict(
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                num_key_value_heads=4,
                num_local_experts=8,
                num_experts_per_tok=1,
                gha_learning_rate=5e-5,
                max_position_embeddings=1024,
            ),
            vocab_size=51200,
            seq_len=1024,
            batch_size=32,
            steps=50_000,
            learning_rate=6e-4,
            warmup_steps=2000,
            eval_tokens=1_000_000,
            checkpoint_every=1000,
        ),
        Preset(
            name="star-469m",
            model=dict(
                hidden_size=1024,
                intermediate_size=4096,
                num_hidden_layers=24,
                num_attention_heads=16,
                num_key_value_heads=4,
                num_local_experts=8,
                num_experts_per_tok=1,
                gha_learning_rate=5e-5,
                max_position_embeddings=1024,
            ),
            vocab_size=51200,
            seq_len=1024,
            batch_size=32,
            steps=50_000,
            learning_rate=3e-4,
            warmup_steps=2000,
            eval_tokens=1_000_000,
            checkpoint_every=1000,
        ),
    )
}


def tiny_config(**overrides: Any) -> StarMoeConfig:
    """The `tiny` preset's model as a `StarMoeConfig`, with `overrides` (a test's vocabulary, context, router
    type, ...): the one tiny model that the test suite builds, whatever it tests."""
    tiny = PRESETS["tiny"]
    return StarMoeConfig(
        **{"vocab_size": tiny.vocab_size, "max_position_embeddings": tiny.seq_len, **tiny.model, **overrides}
    )


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None
