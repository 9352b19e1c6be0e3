"""The one `Settings` object: built at start-up from defaults, an optional config file, `STAR_*`
environment variables and command-line flags (in increasing priority), then passed down."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "star-serve"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STAR_", extra="forbid")

    cache_dir: Path = Field(default_factory=_default_cache_dir, description="Where demo models are built and kept.")
    demo_preset: str = Field("demo", description="Training preset of the embedded demo models.")
    device: str = Field("auto", description="'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="'auto' is bfloat16 on CUDA and float32 on CPU."
    )
    seed: int = Field(0, description="Seed for anything random at start-up.")

    @classmethod
    def load(cls, config_file: Path | None = None, **overrides: Any) -> Settings:
        """Settings from an optional JSON file, under the environment, under explicit overrides."""
        file_values: dict[str, Any] = json.loads(config_file.read_text()) if config_file else {}
        env_values = cls().model_dump(exclude_unset=True)
        given = {k: v for k, v in overrides.items() if v is not None}
        return cls(**{**file_values, **env_values, **given})
