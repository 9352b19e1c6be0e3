"""A STAR MoE checkpoint written as a `MixtralForCausalLM` one, for servers that know Mixtral (vLLM, TGI).

The decoder is the same architecture: RMSNorm, grouped-query attention with RoPE, SwiGLU experts, a linear
top-k gate, untied embeddings. Only the gate's linear half carries over: the STAR subspace half (V, R, a) has
no place in Mixtral, so a STAR checkpoint routes differently there, and only a `linear`-router checkpoint
computes the same routing. One difference remains for any checkpoint: Mixtral renormalises the top-k
probabilities it combines the experts with, while STAR's reference uses them as they are (at k = 1, Mixtral
weighs the chosen expert 1, STAR its probability). So the two compute the same work per token, on the same
weights, but not the same outputs: a comparison of speed, not of text.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from ..model import StarMoeConfig
from ..model.loading import share_checkpoint


def write_mixtral(star_dir: Path, out: Path) -> Path:
    config = StarMoeConfig.from_pretrained(str(star_dir))
    state = load_file(str(star_dir / "model.safetensors"))
    f = config.intermediate_size
    tensors: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": state["model.embed_tokens.weight"],
        "model.norm.weight": state["model.norm.weight"],
        "lm_head.weight": state.get("lm_head.weight", state["model.embed_tokens.weight"]),
    }
    for i in range(config.num_hidden_layers):
        ours, theirs = f"model.layers.{i}.", f"model.layers.{i}."
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"):
            tensors[f"{theirs}{name}.weight"] = state[f"{ours}{name}.weight"]
        for name in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"{theirs}{name}.weight"] = state[f"{ours}{name}.weight"]
        tensors[f"{theirs}block_sparse_moe.gate.weight"] = state[f"{ours}mlp.router.weight"]
        gate_up, down = state[f"{ours}mlp.experts.gate_up_proj"], state[f"{ours}mlp.experts.down_proj"]
        for e in range(config.num_local_experts):
            expert = f"{theirs}block_sparse_moe.experts.{e}."
            tensors[expert + "w1.weight"] = gate_up[e, :f]  # the gate
            tensors[expert + "w3.weight"] = gate_up[e, f:]  # the up projection
            tensors[expert + "w2.weight"] = down[e]
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"), {"format": "pt"})
    mixtral = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": f,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "num_local_experts": config.num_local_experts,
        "num_experts_per_tok": config.num_experts_per_tok,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "sliding_window": None,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "torch_dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch."),
    }
    (out / "config.json").write_text(json.dumps(mixtral, indent=2) + "\n")
    AutoTokenizer.from_pretrained(str(star_dir), local_files_only=True).save_pretrained(str(out))
    share_checkpoint(out)
    return out
