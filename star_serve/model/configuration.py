"""Configuration of STAR Mixture-of-Experts decoders (`model_type = "star_moe"`)."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

ROUTER_TYPES = ("star", "star_gha_only", "linear", "mpi")


class StarMoeConfig(PretrainedConfig):
    """A LLaMA-style decoder whose every feed-forward block is a Mixture of Experts with a STAR router.

    Field names follow transformers' conventions (Mixtral, LLaMA). The router-specific fields:

    - `router_type`: `"star"` (linear gate interpolated with the GHA subspace gate), `"star_gha_only"`
      (subspace gate alone), `"linear"` (plain top-k gate) or `"mpi"` (linear gate whose rows are pulled
      towards their experts' principal directions by power-then-retract during training).
    - `gha_learning_rate`: step size of the Hebbian basis update during training.
    - `router_aux_loss_coef`: weight of the Switch load-balancing loss in the training loss.
    - `mpi_row_norm`: the norm that MPI retracts router rows to.
    - `classifier_pooling`: how the sequence-classification head pools tokens, `"mean"` or `"last"`.
    """

    model_type = "star_moe"
    keys_to_ignore_at_inference = ["cache"]

    def __init__(
        self,
        vocab_size: int = 51200,
        hidden_size: int = 768,
        intermediate_size: int = 3072,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        num_key_value_heads: int = 4,
        head_dim: int | None = None,
        num_local_experts: int = 8,
        num_experts_per_tok: int = 1,
        router_type: str = "star",
        gha_learning_rate: float = 5e-5,
        router_aux_loss_coef: float = 1e-2,
        mpi_row_norm: float = 1.0,
        rope_theta: float = 1e6,
        max_position_embeddings: int = 1024,
        rms_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        classifier_pooling: str = "mean",
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        tie_word_embeddings: bool = False,
        **kwargs: Any,
    ) -> None:
        if router_type not in ROUTER_TYPES:
            raise ValueError(f"router_type must be one of {ROUTER_TYPES}, got {router_type!r}")
        if not 1 <= num_experts_per_tok <= num_local_experts:
            raise ValueError("num_experts_per_tok must be between 1 and num_local_experts")
        if num_attention_heads % num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if num_local_experts > hidden_size:
            raise ValueError("the GHA basis has one row per expert, so num_local_experts <= hidden_size")
        if classifier_pooling not in ("mean", "last"):
            raise ValueError("classifier_pooling must be 'mean' or 'last'")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.num_local_experts = num_local_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.router_type = router_type
        self.gha_learning_rate = gha_learning_rate
        self.router_aux_loss_coef = router_aux_loss_coef
        self.mpi_row_norm = mpi_row_norm
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.classifier_pooling = classifier_pooling
        self.use_cache = use_cache
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
