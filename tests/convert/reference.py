"""Checkpoints shaped exactly as the authors' Megatron-LM fork saves them, and its model's forward.

Megatron itself is not installed: a `Reference` is the model's tensors in one canonical form (per layer,
experts stacked as `fc1 (E, 2F, D)`, `fc2 (E, D, F)`), written under Megatron's own names in each format and
expert layout it uses (docs/megatron.md), and `forward` is a direct re-implementation of the reference's
forward from those names: Transformer Engine's fused input norm, grouped-query QKV fused per group,
rotate-half RoPE, the STAR gate `s (x Wᵀ) + (1 − s) x (R V)ᵀ`, a float32 softmax over all experts, top-1
weighted by its probability, and SwiGLU experts whose fused fc1 holds the gate rows first.

Megatron's pickled classes (its enums in `args`, `MCoreMetadata` in a distributed checkpoint's index) are
written with stand-in modules of the same names, present only while the files are written, as a converter
on a machine without Megatron meets them.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import io
import json
import pickle
import sys
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from tokenizers.pre_tokenizers import ByteLevel
from torch.distributed.checkpoint.metadata import Metadata

EXPERT_LAYOUTS = ("te_grouped", "grouped_gemm", "local_experts")


@dataclass
class Shape:
    layers: int = 2
    hidden: int = 32
    ffn: int = 16
    heads: int = 4
    groups: int = 2
    experts: int = 4
    topk: int = 1
    padded_vocab: int = 512
    rotary_base: float = 1e6
    eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass
class Reference:
    shape: Shape
    vocab: int  # the tokenizer's tokens; the embedding has `shape.padded_vocab` rows
    embedding: torch.Tensor
    output: torch.Tensor
    final_norm: torch.Tensor
    layers: list[dict[str, torch.Tensor]]
    args_overrides: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def random(cls, shape: Shape, vocab: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> Reference:
        gen = torch.Generator().manual_seed(seed)

        def randn(*size: int, std: float = 0.1) -> torch.Tensor:
            return (torch.randn(*size, generator=gen) * std).to(dtype)

        d, f, e, hd = shape.hidden, shape.ffn, shape.experts, shape.head_dim
        layers = []
        for _ in range(shape.layers):
            mixing = torch.linalg.qr(torch.randn(e, e, generator=gen))[0]
            layers.append(
                {
                    "input_norm": (1 + randn(d)),
                    "qkv": randn((shape.heads + 2 * shape.groups) * hd, d),
                    "proj": randn(d, shape.heads * hd),
                    "mlp_norm": (1 + randn(d)),
                    "router": randn(e, d, std=0.5),
                    "alpha": randn(e, std=1.0),
                    "mixing": mixing.to(dtype),
                    "basis": F.normalize(torch.randn(e, d, generator=gen), dim=1).to(dtype),
                    "fc1": randn(e, 2 * f, d),
                    "fc2": randn(e, d, f),
                }
            )
        return cls(
            shape,
            vocab,
            embedding=randn(shape.padded_vocab, d, std=1.0),
            output=randn(shape.padded_vocab, d),
            final_norm=1 + randn(d),
            layers=layers,
        )

    # -- Megatron's names ---------------------------------------------------------------------------------

    def layer_tensors(self, layer: dict[str, torch.Tensor], experts: str) -> dict[str, torch.Tensor]:
        """One layer's tensors under Megatron's names (relative to `decoder.layers.<i>.`)."""
        named = {
            "self_attention.linear_qkv.layer_norm_weight": layer["input_norm"],
            "self_attention.linear_qkv.weight": layer["qkv"],
            "self_attention.linear_proj.weight": layer["proj"],
            "pre_mlp_layernorm.weight": layer["mlp_norm"],
            "mlp.router.weight": layer["router"],
            "mlp.router.star_gate.mixing_coef": layer["mixing"],
            "mlp.router.star_gate.alpha": layer["alpha"],
            "mlp.router.star_gate.gha.basis": layer["basis"],
        }
        fc1, fc2 = layer["fc1"], layer["fc2"]
        if experts == "stacked":  # torch_dist: one key for every implementation
            named["mlp.experts.experts.linear_fc1.weight"] = fc1
            named["mlp.experts.experts.linear_fc2.weight"] = fc2
        elif experts == "te_grouped":
            for e in range(len(fc1)):
                named[f"mlp.experts.linear_fc1.weight{e}"] = fc1[e]
                named[f"mlp.experts.linear_fc2.weight{e}"] = fc2[e]
        elif experts == "grouped_gemm":  # (D, E*2F) and (E*F, D), which Megatron views as (E, D, 2F), (E, F, D)
            named["mlp.experts.weight1"] = fc1.transpose(1, 2).contiguous().reshape(self.shape.hidden, -1)
            named["mlp.experts.weight2"] = fc2.transpose(1, 2).contiguous().reshape(-1, self.shape.hidden)
        else:
            for e in range(len(fc1)):
                named[f"mlp.experts.local_experts.{e}.linear_fc1.weight"] = fc1[e]
                named[f"mlp.experts.local_experts.{e}.linear_fc2.weight"] = fc2[e]
        return named

    def outside_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "embedding.word_embeddings.weight": self.embedding,
            "decoder.final_layernorm.weight": self.final_norm,
            "output_layer.weight": self.output,
        }

    def args(self) -> argparse.Namespace:
        """The run's `args`, as `scripts/train_llama_182m_star.sh` sets them (an enum of Megatron's included)."""
        s = self.shape
        values = {
            "num_layers": s.layers,
            "hidden_size": s.hidden,
            "ffn_hidden_size": s.ffn,
            "moe_ffn_hidden_size": s.ffn,
            "num_attention_heads": s.heads,
            "group_query_attention": True,
            "num_query_groups": s.groups,
            "kv_channels": s.head_dim,
            "num_experts": s.experts,
            "moe_router_topk": s.topk,
            "moe_router_pre_softmax": True,
            "moe_router_load_balancing_type": "aux_loss",
            "moe_aux_loss_coeff": 1e-2,
            "moe_star_routing": True,
            "moe_star_gha_lr": 5e-5,
            "moe_grouped_gemm": True,
            "swiglu": True,
            "normalization": "RMSNorm",
            "norm_epsilon": s.eps,
            "position_embedding_type": "rope",
            "rotary_base": int(s.rotary_base),
            "rotary_percent": 1.0,
            "max_position_embeddings": 64,
            "seq_length": 64,
            "untie_embeddings_and_output_weights": True,
            "add_bias_linear": False,
            "make_vocab_size_divisible_by": 256,
            "padded_vocab_size": s.padded_vocab,
            "init_method_std": 0.01,
            "params_dtype": torch.bfloat16,
            "ckpt_format": "torch_dist",
        }
        values.update(self.args_overrides)
        return argparse.Namespace(**values)

    # -- the forward ------------------------------------------------------------------------------------------

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits (S, vocab) of one sequence `ids` (S,), and each layer's chosen experts (S, k)."""
        s = self.shape
        hd, per_group = s.head_dim, s.heads // s.groups
        n = len(ids)
        x = self.embedding[ids].float()
        pos = torch.arange(n, dtype=torch.float32)
        inv_freq = 1.0 / s.rotary_base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
        angles = torch.cat([pos[:, None] * inv_freq] * 2, dim=-1)  # (S, hd), rotate-half halves
        cos, sin = angles.cos(), angles.sin()

        def rope(t: torch.Tensor) -> torch.Tensor:  # (S, heads, hd)
            first, second = t.chunk(2, dim=-1)
            return t * cos[:, None] + torch.cat([-second, first], dim=-1) * sin[:, None]

        def rms(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + s.eps) * w.float()

        chosen = []
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        for layer in self.layers:
            p = {k: v.float() for k, v in layer.items()}
            mixed = (rms(x, p["input_norm"]) @ p["qkv"].T).view(n, s.groups, (per_group + 2) * hd)
            q, k, v = mixed.split([per_group * hd, hd, hd], dim=-1)
            q = rope(q.reshape(n, s.heads, hd))  # head g * per_group + j: group g's j-th query head
            k, v = rope(k), v  # (S, groups, hd)
            heads = []
            for h in range(s.heads):
                g = h // per_group
                scores = (q[:, h] @ k[:, g].T) / hd**0.5
                heads.append(scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v[:, g])
            x = x + torch.cat(heads, dim=-1) @ p["proj"].T

            h_in = rms(x, p["mlp_norm"])
            alpha = torch.sigmoid(p["alpha"])
            logits = alpha * (h_in @ p["router"].T) + (1 - alpha) * (h_in @ (p["mixing"] @ p["basis"]).T)
            probs = logits.float().softmax(-1)
            weights, experts = probs.topk(s.topk, dim=-1)
            chosen.append(experts)
            out = torch.zeros_like(x)
            for t in range(n):
                for slot in range(s.topk):
                    e = int(experts[t, slot])
                    gate, up = (p["fc1"][e] @ h_in[t]).chunk(2)
                    out[t] += weights[t, slot] * (p["fc2"][e] @ (F.silu(gate) * up))
            x = x + out
        logits = rms(x, self.final_norm) @ self.output.float().T
        return logits[:, : self.vocab], chosen

    # -- the two formats --------------------------------------------------------------------------------------

    def save_legacy(self, load: Path, experts: str, iteration: int = 10) -> Path:
        """`--ckpt-format torch`: `iter_XXXXXXX/mp_rank_00/model_optim_rng.pt`, layers named one by one."""
        model = dict(self.outside_tensors())
        for i, layer in enumerate(self.layers):
            for name, tensor in self.layer_tensors(layer, experts).items():
                model[f"decoder.layers.{i}.{name}"] = tensor
            model[f"decoder.layers.{i}.self_attention.linear_qkv._extra_state"] = io.BytesIO(b"te")
        path = load / f"iter_{iteration:07d}" / "mp_rank_00" / "model_optim_rng.pt"
        path.parent.mkdir(parents=True)
        with megatron_classes() as classes:
            args = self.args()
            args.model_type = classes.ModelType.encoder_or_decoder
            torch.save({"args": args, "checkpoint_version": 3.0, "iteration": iteration, "model": model}, path)
        (load / "latest_checkpointed_iteration.txt").write_text(str(iteration))
        return path.parent.parent

    def save_torch_dist(
        self, load: Path, iteration: int = 10, extra: dict[str, Any] | None = None, drop: tuple[str, ...] = ()
    ) -> Path:
        """`--ckpt-format torch_dist`: torch's distributed checkpoint with Megatron's index class, every layer
        tensor stacked on a leading layer axis (experts on an expert axis after it). `extra` tensors are added
        and the layer tensors named in `drop` left out, to make checkpoints that cannot be mapped."""
        state: dict[str, Any] = dict(self.outside_tensors())
        per_layer = [self.layer_tensors(layer, "stacked") for layer in self.layers]
        for name in per_layer[0]:
            if name not in drop:
                state[f"decoder.layers.{name}"] = torch.stack([layer[name] for layer in per_layer])
        state["decoder.layers.self_attention.linear_qkv._extra_state"] = io.BytesIO(b"te")
        state["optimizer.state.exp_avg.embedding.word_embeddings.weight"] = torch.zeros_like(self.embedding)
        state["rng_state"] = io.BytesIO(b"rng")
        state.update(extra or {})
        directory = load / f"iter_{iteration:07d}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(state, checkpoint_id=directory, no_dist=True)
        with megatron_classes() as classes:
            index = pickle.loads((directory / ".metadata").read_bytes())
            notes = {key: {"nd_reformulated_orig_global_shape": None} for key in state}
            mcore = classes.MCoreMetadata(mcore_data=notes, **vars(index))  # as Megatron's save planner does
            (directory / ".metadata").write_bytes(pickle.dumps(mcore))
            args = self.args()
            args.model_type = classes.ModelType.encoder_or_decoder
            torch.save({"args": args, "checkpoint_version": 3.0, "iteration": iteration}, directory / "common.pt")
        (directory / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
        (load / "latest_checkpointed_iteration.txt").write_text(str(iteration))
        return directory


def gpt2_files(directory: Path, size: int | None = None) -> tuple[Path, Path, int]:
    """A GPT-2-style vocabulary (the 256 byte symbols, a few merges, `<|endoftext|>` last) and its merges;
    with `size`, merges of symbol pairs fill it to that many tokens (GPT-2's own has 50,257)."""
    alphabet = sorted(ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    merges = [("Ġ", "t"), ("Ġt", "h"), ("Ġth", "e"), ("e", "r")]
    pairs = ((a, b) for a in alphabet for b in alphabet if a + b not in ("Ġt", "er"))
    while size is not None and len(vocab) + len(merges) < size - 1:
        merges.append(next(pairs))
    for first, second in merges:
        vocab[first + second] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    vocab_file, merge_file = directory / "gpt2-vocab.json", directory / "gpt2-merges.txt"
    vocab_file.write_text(json.dumps(vocab))
    merge_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vocab_file, merge_file, len(vocab)


@contextlib.contextmanager
def megatron_classes() -> Iterator[types.SimpleNamespace]:
    """Modules named as Megatron's, with the classes its checkpoints pickle, for as long as files are
    written; afterwards nothing of that name can be imported."""

    class ModelType(enum.Enum):
        encoder_or_decoder = 1

    @dataclass
    class MCoreMetadata(Metadata):
        mcore_data: dict[str, dict[str, Any]] | None = None

    strategies = "megatron.core.dist_checkpointing.strategies.torch"
    names = ("megatron", "megatron.core", "megatron.core.enums", "megatron.core.dist_checkpointing")
    modules = {name: types.ModuleType(name) for name in (*names, strategies.rpartition(".")[0], strategies)}
    for cls, module in ((ModelType, "megatron.core.enums"), (MCoreMetadata, strategies)):
        cls.__module__, cls.__qualname__ = module, cls.__name__
        setattr(modules[module], cls.__name__, cls)
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield types.SimpleNamespace(ModelType=ModelType, MCoreMetadata=MCoreMetadata)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
