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

    # Serving
    host: str = Field("127.0.0.1", description="Address the HTTP server binds to.")
    port: int = Field(8000, ge=0, le=65535, description="Port of the HTTP server.")
    models: list[str] = Field(
        default_factory=list,
        description="Checkpoints to serve, as NAME=DIR or DIR (named after the directory); none: the demo models.",
    )
    admin_key: str | None = Field(None, description="Enables auth: the key of the admin API. Unset: no auth.")
    state_dir: Path | None = Field(None, description="Where tenants and keys persist (default: CACHE_DIR/state).")
    max_running: int = Field(32, ge=1, description="Sequences decoded together (KV-cache slots) per model.")
    max_waiting: int = Field(128, ge=0, description="Requests queued beyond the running ones before 429s.")
    max_prefill_batch: int = Field(16, ge=1, description="Newcomers prefilled in one forward.")
    prefix_cache_blocks: int = Field(
        256,
        ge=0,
        description="Prompt blocks whose keys and values a generation engine keeps for later prompts that start "
        "with the same tokens and route with the same bases (0: no prefix caching).",
    )
    prefix_cache_block_size: int = Field(16, ge=1, description="Tokens per prefix-cache block.")
    classify_max_batch: int = Field(32, ge=1, description="Inputs classified in one forward.")
    classify_max_wait_ms: float = Field(5.0, ge=0, description="How long a classify batch waits to fill.")
    request_timeout: float = Field(300.0, gt=0, description="Seconds a request may take before it is ended.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Request bodies beyond this size get 413.")
    connection_idle_timeout: int = Field(
        10,
        ge=1,
        description="Seconds a connection may wait for a complete request head, when new or after a response, "
        "before the server closes it (uvicorn's keep-alive timeout, extended to a connection's first request). "
        "Longer than clients keep idle connections (httpx and the openai client: 5 s), so that a client never "
        "sends a request on a connection the server is closing.",
    )
    max_connections: int | None = Field(
        1024, ge=2, description="Open connections beyond which requests get 503 (uvicorn's limit_concurrency)."
    )
    max_n: int = Field(16, ge=1, description="Largest `n` (choices per request) accepted.")
    cpu_threads: int | None = Field(
        None,
        ge=1,
        description="Torch threads on CPU. Default: every core when a served model's hidden size is 512 or more "
        "(on 2 cores at 32 clients, every core measured 1.6-1.9x one core on a 182M-shape model), else all "
        "cores but one, which the HTTP loop needs (the demo LM measured 0.88-1.08x with every core).",
    )
    engine_process: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Run a language model's generation engine in a process of its own, as vLLM runs its engine "
        "core, so that the HTTP loop never holds the interpreter lock the engine's forward needs. `auto`: for a "
        "language model without adaptation (a model that adapts keeps its engine beside its tenant bank and "
        "adaptation); `on`: the same, and an error at start for a model that adapts.",
    )
    cpu_packed_weights: bool = Field(
        True,
        description="On a CPU (float32, or bfloat16 where the CPU multiplies it natively), also keep the weights "
        "of 1 MiB or more that a decode step multiplies by few rows (experts, attention projections, LM head) in "
        "oneDNN's blocked layout, through which they multiply about twice as fast; it costs their memory again.",
    )
    redis_url: str | None = Field(
        None, description="Snapshots in Redis (shared by replicas); unset: in STATE_DIR/snapshots on local disk."
    )
    adaptation: Literal["async", "sync", "shadow", "off"] = Field(
        "async",
        description="Per-tenant test-time subspace adaptation: `async` (the default) by a background worker, "
        "behind the quality gate; `sync` before routing each batch (STAR.md); `shadow` (adapted, gated and "
        "versioned as in `async`, but every tenant is served the trained bases); or `off`.",
    )
    adaptation_process: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Run `async` or `shadow` adaptation (capture, GHA steps, snapshot writes) in a process of its "
        "own, so that it never holds the serving process's interpreter lock: `auto` does on a CPU, where the "
        "engine is bound by that lock; on a GPU the capture runs on the device, in the serving process.",
    )
    adaptation_process_niceness: int = Field(
        10,
        ge=0,
        le=19,
        description="How much lower than the serving process's the adaptation process's CPU priority is (its "
        "nice increment): its work is background work, so on a busy CPU the engine and HTTP go first and "
        "adaptation takes the idle time; 0 runs both alike.",
    )
    adaptation_learning_rate: float = Field(0.05, gt=0, le=1, description="A new tenant's GHA learning rate.")
    adaptation_align_linear_gate: bool = Field(
        True,
        description="A tenant's inputs reach the frozen linear half of a `star` gate aligned to the tenant's "
        "subspace (its coordinates in the adapted basis put back on the trained one), so that the whole gate, "
        "not only its subspace half, follows a shift that the basis followed; off: STAR.md's gate as written. "
        "The trained bases route alike either way.",
    )
    adaptation_max_tenants: int = Field(
        10_000,
        ge=1,
        description="Tenants whose adaptation state a replica keeps in memory, the least recently used beyond "
        "it forgotten (their committed versions and settings stay in the store and load on their next request).",
    )
    adaptation_tenant_idle: float = Field(
        3600.0, gt=0, description="Seconds without a request after which a tenant's adaptation state is forgotten."
    )
    adaptation_min_tokens: int = Field(512, ge=1, description="Tokens of statistics that make one GHA step.")
    adaptation_min_interval: float = Field(
        1.0, ge=0, description="Seconds between a tenant's GHA steps at least, however busy it is."
    )
    adaptation_sample_rate: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Fraction of forwards whose router inputs adapt their tenants' bases (whole forwards are "
        "sampled): less costs less, but a tenant then needs that much more traffic for a step.",
    )
    adaptation_token_budget: int = Field(
        4096,
        ge=1,
        description="Tokens of one tenant that count from one capture pass (the forwards captured together) at "
        "most; the rest are dropped.",
    )
    adaptation_quality_gate: bool = Field(
        True,
        description="Commit a tenant's new version only if, on a held-back sample of its own recent prompts, "
        "it scores better than its current version and the trained bases, beyond the sample's noise "
        "(`adaptation_quality_confidence`; loss for a language model, predictive entropy for a classifier); "
        "`async` and `shadow` modes.",
    )
    adaptation_max_loss_increase: float = Field(
        0.0,
        ge=0,
        description="How much worse (nats/token) than the better of the current and trained bases a candidate "
        "may score on the held-back sample, with `adaptation_quality_confidence` standard errors added, and "
        "still be committed.",
    )
    adaptation_quality_confidence: float = Field(
        1.645,
        ge=0,
        description="Standard errors of a candidate's paired difference from the better of the current and "
        "trained bases, measured over the held-back sequences, that its score must clear besides the margin: "
        "1.645 commits a candidate only when it is better with 95% confidence (one-sided); 0 commits any that "
        "scores no worse.",
    )
    adaptation_rollback_loss_increase: float = Field(
        0.01,
        ge=0,
        description="How much worse (nats/token) than the trained bases a tenant's committed version may score on "
        "its held-back sample before the tenant is rolled back to the trained bases. Above the commit margin, so "
        "that a version just committed is not rolled back on the next sample's noise.",
    )
    adaptation_holdback_tokens: int = Field(
        2048, ge=1, description="Tokens of each tenant's recent prompts held back for the quality gate."
    )
    adaptation_holdback_rate: float = Field(
        0.125,
        ge=0,
        le=1,
        description="Once a tenant's held-back sample is full, the share of its prompts held back to keep it "
        "recent, chosen by each prompt's digest (held-back prompts, sent again or not, never count in the "
        "statistics).",
    )
    adaptation_loss_sample_rate: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Share of prompts whose next-token loss the engine measures during prefill, under the bases "
        "that served them (language models): each tenant's live quality, in GET /v1/subspace and the metrics.",
    )
    adaptation_loss_shadow_rate: float = Field(
        0.25,
        ge=0,
        le=1,
        description="Of the measured prompts of a tenant served by its own version, the share routed again with "
        "the trained bases (one more forward of that prompt), to compare the two on the same tokens.",
    )
    adaptation_loss_window: int = Field(
        2048,
        ge=1,
        description="Tokens a version must be measured on against the trained bases before it is judged: one "
        "that scores worse than them by more than STAR_ADAPTATION_ROLLBACK_LOSS_INCREASE is rolled back.",
    )
    adaptation_partitions: int = Field(
        16, ge=1, description="Redis Streams that tenants' statistics are sharded over, each with one owner."
    )
    max_token_norm: float = Field(64.0, gt=0, description="Router inputs longer than this are clipped to it.")
    snapshot_keep: int = Field(10, ge=1, description="Versions of each tenant's bases kept for rollback.")
    metrics_top_tenants: int = Field(
        20, ge=0, description="Tenants with metrics of their own (the busiest); the rest are one 'other'."
    )
    drain_timeout: float = Field(30.0, ge=0, description="On SIGTERM, how long in-flight requests may finish.")

    @classmethod
    def default(cls, field: str) -> Any:
        """The default of `field`: what an internal config that mirrors a setting defaults to, written once."""
        return cls.model_fields[field].get_default(call_default_factory=True)

    @property
    def resolved_state_dir(self) -> Path:
        return self.state_dir or self.cache_dir / "state"

    @classmethod
    def load(cls, config_file: Path | None = None, **overrides: Any) -> Settings:
        """Settings from an optional JSON file, under the environment, under explicit overrides."""
        file_values: dict[str, Any] = json.loads(config_file.read_text()) if config_file else {}
        env_values = cls().model_dump(exclude_unset=True)
        given = {k: v for k, v in overrides.items() if v is not None}
        return cls(**{**file_values, **env_values, **given})
