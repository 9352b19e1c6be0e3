"""STAR MoE decoder: a LLaMA-style transformer (RMSNorm, RoPE, grouped-query attention) whose every
feed-forward block is a sparse MoE with a STAR router, plus causal-LM and sequence-classification heads.

The whole model is one file, as transformers' model files are, so that a reader follows a token from the
embedding to the heads without leaving it.

Per-tenant routing travels as data: one `routing` argument (`routing.Routing`) says how every sequence of
the batch routes at every layer; the heads pass it through to the backbone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.utils import ModelOutput
from transformers.utils.deprecation import deprecate_kwarg

from .configuration import StarMoeConfig
from .moe import StarMoeExperts, StarMoeSparseBlock
from .packing import pack_linears
from .router import StarGate, StarMoeRouter, switch_load_balancing_loss
from .routing import TRAINED, Routing


class StarMoeRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x / rms(x) computed in float32, cast back, times the weight: one fused call in float32 (the same
        bits as the seven calls it replaces), the weight applied after the cast otherwise."""
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


def rope_inv_freq(config: StarMoeConfig) -> torch.Tensor:
    """RoPE's inverse frequencies (hd/2,)."""
    exponents = torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim
    return 1.0 / config.rope_theta**exponents


class StarMoeRotaryEmbedding(nn.Module):
    def __init__(self, config: StarMoeConfig) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    inv_freq: torch.Tensor

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(position_ids.device)  # (B, S, hd/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (B, S, hd)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates (B, H, S, hd) queries or keys by their positions' angles (cos, sin: (B, S, hd))."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


def build_attention_mask(
    attention_mask: torch.Tensor | None, query_len: int, key_len: int, device: torch.device
) -> torch.Tensor | None:
    """A boolean (B, 1, Q, K) mask, True where a query may attend, from a 2-D padding mask (B, K).

    The Q queries are the last Q of the K key positions. Every query may attend to itself, so that a
    padding position never sees an all-masked row (whose softmax would be NaN). A 4-D mask is passed
    through unchanged; with no padding mask and no cache, None tells the caller to use `is_causal`.
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask.bool()
    if attention_mask is None and query_len == key_len:
        return None
    q_pos = torch.arange(key_len - query_len, key_len, device=device)[:, None]  # (Q, 1)
    k_pos = torch.arange(key_len, device=device)[None, :]  # (1, K)
    mask = (k_pos <= q_pos)[None, None]  # (1, 1, Q, K)
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, None, :]
    return mask | (k_pos == q_pos)[None, None]


class StarMoeAttention(nn.Module):
    def __init__(self, config: StarMoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # (B, S, D)
        rotary: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,  # (B, 1, S, K) bool
        cache: Cache | None,
    ) -> torch.Tensor:
        b, s, _ = x.shape
        heads = self._attend(b, s, self.q_proj(x), self.k_proj(x), self.v_proj(x), rotary, mask, cache)
        return self.o_proj(heads)

    def forward_batches(
        self,
        x: torch.Tensor,  # (T, D): the tokens of every batch, batch after batch
        batches: Sequence[tuple[int, int, tuple[torch.Tensor, torch.Tensor], torch.Tensor | None, Cache | None]],
    ) -> torch.Tensor:
        """Attention over several batches at once, each (B, S, rotary, mask, cache) its own shape: the
        projections multiply every token at once, and each batch attends over its own keys."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        out, start = [], 0
        for b, s, rotary, mask, cache in batches:
            end = start + b * s
            heads = self._attend(b, s, q[start:end], k[start:end], v[start:end], rotary, mask, cache)
            out.append(heads.reshape(b * s, -1))
            start = end
        return self.o_proj(out[0] if len(out) == 1 else torch.cat(out))

    def _attend(
        self,
        b: int,
        s: int,
        q: torch.Tensor,  # (B, S, H*hd) or (B*S, H*hd)
        k: torch.Tensor,
        v: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        """The projected queries, keys and values of one batch to its heads' outputs (B, S, H*hd)."""
        q = q.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, S, hd)
        k = k.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, hd)
        v = v.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rotary
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, Hkv, K, hd)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and s > 1,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return out.transpose(1, 2).reshape(b, s, -1)


class StarMoeDecoderLayer(nn.Module):
    def __init__(self, config: StarMoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = StarMoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = StarMoeAttention(config, layer_idx)
        self.post_attention_layernorm = StarMoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = StarMoeSparseBlock(config)

    def attend(
        self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None, cache: Cache | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention half: the new residual stream and the router's inputs (B, S, D)."""
        x = x + self.self_attn(self.input_layernorm(x), rotary, mask, cache)
        return x, self.post_attention_layernorm(x)  # the router and GHA see the normalised stream

    def route(
        self,
        x: torch.Tensor,
        router_input: torch.Tensor,
        bases: torch.Tensor | None,
        token_mask: torch.Tensor | None,
        gate: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The MoE half: the new hidden states, the router's logits and the chosen experts."""
        moe = self.mlp(router_input, bases=bases, token_mask=token_mask, gate=gate)
        return x + moe.hidden_states, moe.router_logits, moe.expert_indices


@dataclass
class StarMoeModelOutput(ModelOutput):
    """Backbone outputs. `router_inputs` and `expert_indices` are filled when `output_routing=True`."""

    last_hidden_state: torch.Tensor | None = None
    cache: Cache | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None  # L x (B*S, E)
    router_inputs: tuple[torch.Tensor, ...] | None = None  # L x (B, S, D)
    expert_indices: tuple[torch.Tensor, ...] | None = None  # L x (B, S, k)


@dataclass(frozen=True)
class Batch:
    """One batch of a `StarMoeModel.forward_batches` pass."""

    input_ids: torch.Tensor  # (B, S)
    position_ids: torch.Tensor  # (B, S)
    mask: torch.Tensor  # (B, 1, S, K) bool: what each new token attends to
    cache: Any  # where its keys and values go, and what its attention reads: `update(k, v, layer)`
    routing: Routing = TRAINED


@dataclass
class StarMoeCausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Cache | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    router_inputs: tuple[torch.Tensor, ...] | None = None
    expert_indices: tuple[torch.Tensor, ...] | None = None


@dataclass
class StarMoeSequenceClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    router_inputs: tuple[torch.Tensor, ...] | None = None
    expert_indices: tuple[torch.Tensor, ...] | None = None


class StarMoePreTrainedModel(PreTrainedModel):
    config_class = StarMoeConfig
    config: StarMoeConfig
    base_model_prefix = "model"
    _no_split_modules = ["StarMoeDecoderLayer"]
    _skip_keys_device_placement = ["cache"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, StarMoeExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, StarMoeRouter) and hasattr(module, "weight"):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, StarGate):
            init.orthogonal_(module.mixing_coef)
            init.zeros_(module.alpha)
            init.orthogonal_(module.gha.basis)  # unit-norm, orthogonal rows
        elif isinstance(module, StarMoeRotaryEmbedding):
            init.copy_(module.inv_freq, rope_inv_freq(self.config))

    def _routers(self) -> list[StarMoeRouter]:
        backbone = self.base_model
        assert isinstance(backbone, StarMoeModel)
        return [layer.mlp.router for layer in backbone.decoder_layers()]

    def trained_bases(self) -> torch.Tensor:
        """The model's own GHA bases stacked as one tenant's bank row, (L, E, D) in float32."""
        routers = self._routers()
        if not routers[0].uses_subspace:
            raise ValueError(f"router_type {self.config.router_type!r} has no GHA subspace")
        return torch.stack([r.basis.detach().float() for r in routers])

    @torch.no_grad()
    def router_gates(self, bases: torch.Tensor) -> torch.Tensor:
        """Every MoE layer's whole gate folded with `bases` (..., L, E, D), as `Routing.gates` takes them:
        (..., L, E, D) in the model's dtype."""
        return torch.stack([r.gate(bases[..., i, :, :]) for i, r in enumerate(self._routers())], dim=-3)

    def align_linear_gates(self, enabled: bool) -> None:
        """Whether the linear half of every STAR gate reads a tenant's inputs aligned to its subspace
        (`StarMoeRouter.align_linear`); fold gates again after changing it."""
        for router in self._routers():
            router.align_linear = enabled

    def pack_for_cpu(self) -> bool:
        """Keeps the weights that a decode step multiplies by few rows packed for a CPU where that pays
        (`packing.py`): every MoE layer's experts, the attention projections and the LM head. False where
        none is (another device or dtype, or weights too small to gain; float32 experts too small to pack
        are kept transposed instead, `StarMoeExperts.pack_for_cpu`)."""
        backbone = self.base_model
        assert isinstance(backbone, StarMoeModel)
        packed = [pack_linears(self, ("lm_head",))] if hasattr(self, "lm_head") else []
        for layer in backbone.decoder_layers():
            packed.append(layer.mlp.experts.pack_for_cpu())
            packed.append(pack_linears(layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")))
        return any(packed)

    def router_alignment(self) -> list[float | None]:
        """Per MoE layer, the mean |cosine| between each linear-gate row and its expert's principal input
        direction (the top right-singular vector of the expert's gate and up projections): 1 when every
        router row points where its expert is most sensitive. None for a layer without a linear gate."""
        backbone = self.base_model
        assert isinstance(backbone, StarMoeModel)
        alignment: list[float | None] = []
        for layer in backbone.decoder_layers():
            router, experts = layer.mlp.router, layer.mlp.experts
            if getattr(router, "weight", None) is None:
                alignment.append(None)
                continue
            w = experts.gate_up_proj.detach().float()  # (E, 2F, D)
            _, vectors = torch.linalg.eigh(w.transpose(1, 2) @ w)  # (E, D, D), eigenvalues ascending
            principal = vectors[..., -1]  # (E, D)
            rows = router.weight.detach().float()  # (E, D)
            alignment.append(float(F.cosine_similarity(rows, principal, dim=-1).abs().mean()))
        return alignment


class StarMoeModel(StarMoePreTrainedModel):
    def __init__(self, config: StarMoeConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(StarMoeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = StarMoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = StarMoeRotaryEmbedding(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def decoder_layers(self) -> list[StarMoeDecoderLayer]:
        return [layer for layer in self.layers if isinstance(layer, StarMoeDecoderLayer)]

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    @deprecate_kwarg("past_key_values", "6.0.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,  # (B, S)
        attention_mask: torch.Tensor | None = None,  # (B, K) padding mask, or (B, 1, S, K) bool
        position_ids: torch.Tensor | None = None,  # (B, S)
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        routing: Routing = TRAINED,
        output_routing: bool = False,  # also return each layer's router inputs and chosen experts
        **kwargs: object,
    ) -> StarMoeModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, S, D)
        b, s, _ = x.shape
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + s, device=x.device).expand(b, s)
        mask = build_attention_mask(attention_mask, s, past + s, x.device)
        token_mask = attention_mask[:, -s:].bool() if attention_mask is not None and attention_mask.dim() == 2 else None
        routing.check(len(self.layers))

        rotary = self.rotary_emb(position_ids, x.dtype)
        all_logits, all_inputs, all_experts = [], [], []
        for i, layer in enumerate(self.decoder_layers()):
            x, router_input = layer.attend(x, rotary, mask, cache)
            bases, gate = routing.layer(i, router_input)
            x, logits, experts = layer.route(x, router_input, bases, token_mask, gate)
            all_logits.append(logits)
            if output_routing:
                all_inputs.append(router_input)
                all_experts.append(experts)
        return StarMoeModelOutput(
            last_hidden_state=self.norm(x),
            cache=cache if use_cache else None,
            router_logits=tuple(all_logits),
            router_inputs=tuple(all_inputs) if output_routing else None,
            expert_indices=tuple(all_experts) if output_routing else None,
        )

    def forward_batches(self, batches: Sequence[Batch]) -> list[StarMoeModelOutput]:
        """Several batches in one pass, as the engine runs a step's prefills beside its decodes: each batch
        attends over its own cache binding and routes with its own `routing`, while the embedding, the norms,
        the projections and the experts take every token at once, a product per weight for all. Each batch's
        output is what `forward` gives it alone (with `output_routing`)."""
        shapes = [tuple(batch.input_ids.shape) for batch in batches]
        sizes = [b * s for b, s in shapes]
        x = self.embed_tokens(torch.cat([batch.input_ids.reshape(-1) for batch in batches]))  # (T, D)
        attention = [
            (b, s, self.rotary_emb(batch.position_ids, x.dtype), batch.mask, batch.cache)
            for (b, s), batch in zip(shapes, batches, strict=True)
        ]
        for batch in batches:
            batch.routing.check(len(self.layers))
        all_logits, all_inputs, all_experts = [], [], []
        for i, layer in enumerate(self.decoder_layers()):
            x = x + layer.self_attn.forward_batches(layer.input_layernorm(x), attention)
            router_input = layer.post_attention_layernorm(x)
            parts = [part.view(b, s, -1) for part, (b, s) in zip(router_input.split(sizes), shapes, strict=True)]
            routes = [(part, *batch.routing.layer(i, part)) for part, batch in zip(parts, batches, strict=True)]
            out, logits, experts = layer.mlp.forward_batches(router_input, routes)
            x = x + out
            all_logits.append(logits)
            all_inputs.append(parts)
            all_experts.append(experts)
        hidden = self.norm(x).split(sizes)
        return [
            StarMoeModelOutput(
                last_hidden_state=hidden[j].view(b, s, -1),
                cache=batches[j].cache,
                router_logits=tuple(layer[j] for layer in all_logits),
                router_inputs=tuple(layer[j] for layer in all_inputs),
                expert_indices=tuple(layer[j] for layer in all_experts),
            )
            for j, (b, s) in enumerate(shapes)
        ]

    def load_balancing_loss(
        self, router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Switch loss summed over layers (as the reference adds each layer's loss), over real tokens."""
        k = self.config.num_experts_per_tok
        token_mask = attention_mask.reshape(-1).bool() if attention_mask is not None else None
        losses = [
            switch_load_balancing_loss(logits, logits.topk(k, dim=-1).indices, token_mask) for logits in router_logits
        ]
        return torch.stack(losses).sum()


class StarMoeForCausalLM(StarMoePreTrainedModel, GenerationMixin):
    def __init__(self, config: StarMoeConfig) -> None:
        super().__init__(config)
        self.model = StarMoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    @deprecate_kwarg("past_key_values", "6.0.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        routing: Routing = TRAINED,
        output_routing: bool = False,
        logits_to_keep: int = 0,
        **kwargs: object,
    ) -> StarMoeCausalLMOutput:
        """`labels` (B, S) are the input ids themselves (shifted here); -100 marks positions to ignore."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            routing=routing,
            output_routing=output_routing,
        )
        hidden = out.last_hidden_state
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)  # (B, S, V)

        loss = aux_loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
            padding = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
            aux_loss = self.model.load_balancing_loss(out.router_logits, padding)
            loss = loss + self.config.router_aux_loss_coef * aux_loss
        return StarMoeCausalLMOutput(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            cache=out.cache,
            router_logits=out.router_logits if output_router_logits else None,
            router_inputs=out.router_inputs,
            expert_indices=out.expert_indices,
        )


class StarMoeForSequenceClassification(StarMoePreTrainedModel):
    def __init__(self, config: StarMoeConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = StarMoeModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,  # (B, S) padding mask
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,  # (B,)
        output_router_logits: bool | None = None,
        routing: Routing = TRAINED,
        output_routing: bool = False,
        **kwargs: object,
    ) -> StarMoeSequenceClassifierOutput:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            routing=routing,
            output_routing=output_routing,
        )
        hidden = out.last_hidden_state  # (B, S, D)
        b, s, _ = hidden.shape
        valid = (
            attention_mask.bool()
            if attention_mask is not None
            else torch.ones(b, s, dtype=torch.bool, device=hidden.device)
        )
        if self.config.classifier_pooling == "mean":
            weights = valid.to(hidden.dtype)[..., None]
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)
        else:
            last = s - 1 - valid.flip(1).int().argmax(1)  # index of the last real token
            pooled = hidden[torch.arange(b, device=hidden.device), last]
        logits = self.score(pooled)  # (B, C)

        loss = aux_loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float(), labels)
            aux_loss = self.model.load_balancing_loss(out.router_logits, attention_mask)
            loss = loss + self.config.router_aux_loss_coef * aux_loss
        return StarMoeSequenceClassifierOutput(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            router_logits=out.router_logits if output_router_logits else None,
            router_inputs=out.router_inputs,
            expert_indices=out.expert_indices,
        )
