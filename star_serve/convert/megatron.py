"""Megatron-LM STAR checkpoints (the authors' reference fork) to star-serve model directories.

The layout mapped here is written down in docs/megatron.md. In short: `torch_dist` checkpoints stack every
layer's tensors on a leading layer axis (experts on a second, expert axis) under one key per tensor; legacy
`mp_rank_00/model_optim_rng.pt` checkpoints name each layer (`decoder.layers.<i>.…`) and keep experts as
the module that trained them had them. Both become one set of per-layer tensors first, then star-serve's.

Nothing here imports Megatron. Its pickled objects (the run's `args` with Megatron enums, the `.metadata`
index of a distributed checkpoint) are read with inert stand-ins for its classes: no code of the checkpoint
runs, and a tensor the converter cannot place stops the conversion with its name.
"""

from __future__ import annotations

import json
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from ..model import StarMoeConfig, StarMoeForCausalLM
from ..model.loading import share_checkpoint

END_OF_TEXT = "<|endoftext|>"  # GPT-2's end-of-document token, Megatron's `eod`


class UnmappableCheckpoint(ValueError):
    """A checkpoint, or one of its tensors, that has no exact counterpart in a star-serve model."""


# -- reading pickles without Megatron -------------------------------------------------------------------------


class _StandIn:
    """An object of a class the converter does not import (Megatron's enums and configs, and anything else
    a run's `args` pickled): built inert, it keeps its constructor arguments and its state, runs no code."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and all(isinstance(p, dict | None) for p in state):
            state = {**(state[0] or {}), **(state[1] or {})}  # (__dict__, __slots__ values)
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state


_stand_ins: dict[str, type] = {}


def _stand_in(path: str) -> type:
    module, _, name = path.rpartition(".")
    if path not in _stand_ins:
        _stand_ins[path] = type(name, (_StandIn,), {"__module__": module, "__qualname__": name})
    return _stand_ins[path]


def _torch_load(path: Path) -> Any:
    """`torch.load` with torch's weights-only unpickler, every other global replaced by an inert stand-in."""
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    with torch.serialization.safe_globals([_stand_in(name) for name in unsafe]):
        return torch.load(path, map_location="cpu", weights_only=True)


@dataclass
class _MCoreMetadata(Metadata):
    """Megatron's `MCoreMetadata`: torch's checkpoint index with Megatron's notes about each tensor."""

    mcore_data: dict[str, dict[str, Any]] | None = None


_INDEX_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath")}


class _IndexUnpickler(pickle.Unpickler):
    """The `.metadata` index of a distributed checkpoint: torch's classes, Megatron's as stand-ins."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("megatron."):
            return _MCoreMetadata if name == "MCoreMetadata" else _stand_in(f"{module}.{name}")
        if module.startswith("torch.distributed.checkpoint") or (module, name) in _INDEX_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"the checkpoint index names {module}.{name}, which no index holds")


class _IndexReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        with open(Path(self.path) / ".metadata", "rb") as file:
            metadata: Metadata = _IndexUnpickler(file).load()
        metadata.storage_meta = metadata.storage_meta or StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# -- the two formats ------------------------------------------------------------------------------------------


@dataclass
class MegatronCheckpoint:
    format: str  # "torch_dist" or "torch" (legacy)
    directory: Path  # the iteration's directory
    args: Any  # the run's argparse namespace, as stand-ins
    tensors: dict[str, torch.Tensor]  # the model's tensors under Megatron's names


def _iteration_dir(load: Path) -> Path:
    """`--load` as Megatron takes it (the directory with `latest_checkpointed_iteration.txt`), or one
    iteration's directory."""
    tracker = load / "latest_checkpointed_iteration.txt"
    if not tracker.is_file():
        return load
    iteration = tracker.read_text().strip()
    return load / ("release" if iteration == "release" else f"iter_{int(iteration):07d}")


def _is_model_tensor(key: str) -> bool:
    return not key.startswith(("optimizer.", "rng_state")) and not key.endswith("_extra_state")


def read_megatron(load: Path) -> MegatronCheckpoint:
    directory = _iteration_dir(load)
    if (directory / ".metadata").is_file():
        return _read_torch_dist(directory)
    legacy = directory / "mp_rank_00" / "model_optim_rng.pt"
    if legacy.is_file():
        parallel = sorted(p.name for p in directory.glob("mp_rank_*") if p.name != "mp_rank_00")
        if parallel:
            raise UnmappableCheckpoint(
                f"{directory} is split across model-parallel ranks ({', '.join(parallel)}); convert it to one "
                "rank first, or save it with --ckpt-format torch_dist"
            )
        saved = _torch_load(legacy)
        if "model" not in saved:
            raise UnmappableCheckpoint(f"{legacy} holds no `model` (virtual pipeline stages are not supported)")
        tensors = {k: v for k, v in saved["model"].items() if isinstance(v, torch.Tensor) and _is_model_tensor(k)}
        return MegatronCheckpoint("torch", directory, saved.get("args"), tensors)
    raise UnmappableCheckpoint(
        f"{directory} is not a Megatron checkpoint: neither a distributed checkpoint (.metadata) nor "
        "mp_rank_00/model_optim_rng.pt is there"
    )


def _read_torch_dist(directory: Path) -> MegatronCheckpoint:
    common = directory / "common.pt"
    args = _torch_load(common).get("args") if common.is_file() else None
    reader = _IndexReader(directory)
    index = reader.read_metadata().state_dict_metadata
    tensors = {
        key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        for key, meta in index.items()
        if isinstance(meta, TensorStorageMetadata) and _is_model_tensor(key)
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... assuming a single process": it is
        dcp.load(tensors, storage_reader=reader, no_dist=True)
    return MegatronCheckpoint("torch_dist", directory, args, tensors)


# -- from Megatron's names to one dictionary per layer ---------------------------------------------------------

_LAYERS = "decoder.layers."


def _split_layers(tensors: dict[str, torch.Tensor], stacked: bool) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The tensors outside the decoder's layers, and each layer's tensors under names relative to it."""
    outside = {k: v for k, v in tensors.items() if not k.startswith(_LAYERS)}
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith(_LAYERS):
            continue
        name = key.removeprefix(_LAYERS)
        if stacked:  # one tensor for all layers, the layer axis first
            for i, layer_value in enumerate(value.unbind(0)):
                layers.setdefault(i, {})[name] = layer_value
        else:
            index, _, name = name.partition(".")
            if not index.isdigit():
                raise UnmappableCheckpoint(f"tensor {key}: no layer number after {_LAYERS}")
            layers.setdefault(int(index), {})[name] = value
    if sorted(layers) != list(range(len(layers))):
        raise UnmappableCheckpoint(f"the checkpoint's layers are not numbered 0..n-1: {sorted(layers)}")
    return outside, [layers[i] for i in range(len(layers))]


def _take(tensors: dict[str, torch.Tensor], prefix: str, *names: str) -> tuple[str, torch.Tensor]:
    """The first of `names` that `tensors` holds, removed from it, with its full name (`prefix` + name)."""
    for name in names:
        if name in tensors:
            return prefix + name, tensors.pop(name)
    raise UnmappableCheckpoint(f"the checkpoint has none of {', '.join(prefix + n for n in names)}")


def _experts(
    layer: dict[str, torch.Tensor], num_experts: int, prefix: str
) -> tuple[tuple[str, torch.Tensor], tuple[str, torch.Tensor]]:
    """A layer's experts as fc1 (E, 2F, D) and fc2 (E, D, F), each with the name it had, popped from `layer`
    in whichever layout the checkpoint has them."""

    def pop(name: str) -> torch.Tensor:
        return _take(layer, prefix, name)[1]

    stacked = "mlp.experts.experts.linear_fc{n}.weight"  # torch_dist, every implementation
    if stacked.format(n=1) in layer:
        return _take(layer, prefix, stacked.format(n=1)), _take(layer, prefix, stacked.format(n=2))
    if "mlp.experts.weight1" in layer:  # legacy GroupedMLP: (D, E*2F) and (E*F, D), read as (E, D, 2F), (E, F, D)
        w1, w2 = pop("mlp.experts.weight1"), pop("mlp.experts.weight2")
        d = w1.shape[0]
        if w1.numel() % (num_experts * d) or tuple(w2.shape[1:]) != (d,) or w2.shape[0] % num_experts:
            raise UnmappableCheckpoint(
                f"{prefix}mlp.experts.weight1/weight2 of shapes {tuple(w1.shape)}, {tuple(w2.shape)} do not hold "
                f"{num_experts} experts"
            )
        fc1 = w1.reshape(num_experts, d, -1).transpose(1, 2)
        fc2 = w2.reshape(num_experts, -1, d).transpose(1, 2)
        return (prefix + "mlp.experts.weight1", fc1), (prefix + "mlp.experts.weight2", fc2)
    patterns = ("mlp.experts.linear_fc{n}.weight{e}", "mlp.experts.local_experts.{e}.linear_fc{n}.weight")
    for pattern in patterns:  # legacy TEGroupedMLP, SequentialMLP: one matrix per expert
        if pattern.format(n=1, e=0) in layer:
            fc1, fc2 = (torch.stack([pop(pattern.format(n=n, e=e)) for e in range(num_experts)]) for n in (1, 2))
            return (prefix + pattern.format(n=1, e="*"), fc1), (prefix + pattern.format(n=2, e="*"), fc2)
    raise UnmappableCheckpoint(f"{prefix}mlp.experts holds no expert weights in a layout the converter knows")


# -- the run's configuration -----------------------------------------------------------------------------------


def _arg(args: Any, name: str, default: Any = None) -> Any:
    return getattr(args, name, default)


def star_config(args: Any, vocab_size: int) -> StarMoeConfig:
    """The star-serve configuration of the run's `args`, refusing what star-serve's model does not compute."""
    if args is None:
        raise UnmappableCheckpoint("the checkpoint has no `args`: its model's shape cannot be known")
    refusals = [
        (_arg(args, "num_experts") is None, "it is not a Mixture of Experts (--num-experts unset)"),
        (not _arg(args, "swiglu", False), "its MLP is not SwiGLU (--swiglu)"),
        (_arg(args, "normalization", "LayerNorm") != "RMSNorm", "its normalisation is not RMSNorm"),
        (_arg(args, "apply_layernorm_1p", False), "it uses zero-centred norm weights (--apply-layernorm-1p)"),
        (_arg(args, "position_embedding_type", "learned_absolute") != "rope", "its positions are not RoPE"),
        (_arg(args, "rotary_percent", 1.0) != 1.0, "RoPE rotates only part of each head (--rotary-percent)"),
        (_arg(args, "rotary_interleaved", False), "its RoPE is interleaved (--rotary-interleaved)"),
        (_arg(args, "moe_router_score_function", "softmax") != "softmax", "its router scores are not a softmax"),
        (
            not _arg(args, "moe_router_pre_softmax", False),
            "its router's softmax runs over the chosen experts only (--moe-router-pre-softmax unset), where "
            "star-serve weighs each expert by its probability over all of them",
        ),
        (_arg(args, "moe_router_topk_scaling_factor") is not None, "its router scales the top-k probabilities"),
        (_arg(args, "moe_layer_freq", 1) not in (1, None), "not every layer is a MoE layer (--moe-layer-freq)"),
    ]
    for refused, why in refusals:
        if refused:
            raise UnmappableCheckpoint(f"star-serve cannot serve this checkpoint: {why}")
    heads = _arg(args, "num_attention_heads")
    router_type = "linear"
    if _arg(args, "moe_star_routing", False):
        router_type = "star_gha_only" if _arg(args, "moe_star_gha_only", False) else "star"
    return StarMoeConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=_arg(args, "moe_ffn_hidden_size") or args.ffn_hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=_arg(args, "num_query_groups") if _arg(args, "group_query_attention") else heads,
        head_dim=_arg(args, "kv_channels") or args.hidden_size // heads,
        num_local_experts=args.num_experts,
        num_experts_per_tok=_arg(args, "moe_router_topk", 2),
        router_type=router_type,
        gha_learning_rate=_arg(args, "moe_star_gha_lr", 2e-5),
        router_aux_loss_coef=_arg(args, "moe_aux_loss_coeff", 0.0) or 0.0,
        rope_theta=float(_arg(args, "rotary_base", 10000)),
        max_position_embeddings=_arg(args, "max_position_embeddings") or args.seq_length,
        rms_norm_eps=_arg(args, "norm_epsilon", 1e-5),
        initializer_range=_arg(args, "init_method_std", 0.02),
        tie_word_embeddings=False,
    )


# -- the mapping -------------------------------------------------------------------------------------------------


Mapped = dict[str, tuple[str, torch.Tensor]]  # star-serve's name -> (Megatron's name, tensor)


def _layer_tensors(layer: dict[str, torch.Tensor], i: int, config: StarMoeConfig) -> Mapped:
    """Layer i's star-serve tensors, popped from Megatron's `layer`."""
    ours, theirs = f"model.layers.{i}.", f"{_LAYERS}{i}."
    mapped: Mapped = {}

    def take(*names: str) -> tuple[str, torch.Tensor]:
        return _take(layer, theirs, *names)

    fused_norm = "self_attention.linear_qkv.layer_norm_weight"  # Transformer Engine's; the local spec's is apart
    mapped[ours + "input_layernorm.weight"] = take(fused_norm, "input_layernorm.weight")
    groups, hd, d = config.num_key_value_heads, config.head_dim, config.hidden_size
    per_group = config.num_attention_heads // groups
    source, qkv = take("self_attention.linear_qkv.weight")
    if tuple(qkv.shape) != ((per_group + 2) * groups * hd, d):
        raise UnmappableCheckpoint(
            f"{source} has shape {tuple(qkv.shape)}; the run's args ({config.num_attention_heads} heads in "
            f"{groups} groups of head size {hd}) give {((per_group + 2) * groups * hd, d)}"
        )
    q, k, v = qkv.reshape(groups, -1, d).split([per_group * hd, hd, hd], dim=1)  # per group: queries, key, value
    for name, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
        mapped[ours + f"self_attn.{name}.weight"] = source, part.reshape(-1, d)
    mapped[ours + "self_attn.o_proj.weight"] = take("self_attention.linear_proj.weight")
    mapped[ours + "post_attention_layernorm.weight"] = take("pre_mlp_layernorm.weight")

    router = take("mlp.router.weight")
    if config.router_type != "star_gha_only":  # the GHA-only runs keep the linear gate, frozen and unused
        mapped[ours + "mlp.router.weight"] = router
    if config.router_type in ("star", "star_gha_only"):
        for name in ("mixing_coef", "alpha", "gha.basis"):
            mapped[ours + f"mlp.router.star_gate.{name}"] = take(f"mlp.router.star_gate.{name}")
    fc1, fc2 = _experts(layer, config.num_local_experts, theirs)
    mapped[ours + "mlp.experts.gate_up_proj"] = fc1  # rows: the gate (through SiLU), then the up projection
    mapped[ours + "mlp.experts.down_proj"] = fc2
    if layer:
        raise UnmappableCheckpoint(f"tensor {theirs}{sorted(layer)[0]} has no counterpart in a star-serve model")
    return mapped


def star_state_dict(
    checkpoint: MegatronCheckpoint, config: StarMoeConfig, progress: bool = True
) -> dict[str, torch.Tensor]:
    """The star-serve state dict of `checkpoint`, every tensor's shape checked against `config`'s model.
    Vocabulary rows past `config.vocab_size` (Megatron's padding to a multiple) are dropped."""
    outside, layers = _split_layers(checkpoint.tensors, stacked=checkpoint.format == "torch_dist")
    if len(layers) != config.num_hidden_layers:
        raise UnmappableCheckpoint(f"the checkpoint has {len(layers)} layers, its args say {config.num_hidden_layers}")

    embedding = "embedding.word_embeddings.weight"
    if "output_layer.weight" not in outside and embedding in outside:  # the run shared its embedding
        outside["output_layer.weight"] = outside[embedding]
    state: Mapped = {
        "model.embed_tokens.weight": _take(outside, "", embedding),
        "lm_head.weight": _take(outside, "", "output_layer.weight"),
        "model.norm.weight": _take(outside, "", "decoder.final_layernorm.weight"),
    }
    if outside:
        raise UnmappableCheckpoint(f"tensor {sorted(outside)[0]} has no counterpart in a star-serve model")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        source, rows = state[name]
        if rows.shape[0] < config.vocab_size:
            raise UnmappableCheckpoint(
                f"{source}: the checkpoint's vocabulary has {rows.shape[0]} rows, the tokenizer {config.vocab_size}"
            )
        state[name] = source, rows[: config.vocab_size]  # padding rows: never a token, never sampled
    for i, layer in enumerate(tqdm(layers, desc="convert: layers", unit="layer", disable=not progress)):
        state.update(_layer_tensors(layer, i, config))

    with torch.device("meta"):
        expected = StarMoeForCausalLM(config).state_dict()
    for name, (source, tensor) in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise UnmappableCheckpoint(
                f"{source} gives star-serve's {name} shape {tuple(tensor.shape)}; the run's args give "
                f"{tuple(expected[name].shape)}"
            )
    missing = sorted(expected.keys() - state.keys())
    if missing:
        raise UnmappableCheckpoint(f"the checkpoint has nothing for star-serve's {missing[0]}")
    return {name: tensor.contiguous() for name, (_, tensor) in state.items()}


# -- the tokenizer -----------------------------------------------------------------------------------------------


def gpt2_tokenizer(vocab_file: Path, merge_file: Path, max_length: int) -> PreTrainedTokenizerFast:
    """GPT-2's byte-level BPE from its two files (`gpt2-vocab.json`, `gpt2-merges.txt`), as Megatron's
    `GPT2BPETokenizer` reads them: the end-of-text token is the beginning, end and padding of a document."""
    tokenizer = Tokenizer(models.BPE.from_file(str(vocab_file), str(merge_file)))
    if tokenizer.token_to_id(END_OF_TEXT) is None:
        raise UnmappableCheckpoint(f"{vocab_file} has no {END_OF_TEXT} token: not a GPT-2 vocabulary")
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens([AddedToken(END_OF_TEXT, special=True)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        model_max_length=max_length,
    )


# -- the whole conversion ---------------------------------------------------------------------------------------


def convert_megatron(
    load: Path, vocab_file: Path, merge_file: Path, out: Path, progress: bool = True
) -> dict[str, Any]:
    """Writes `out` (config.json, model.safetensors, the tokenizer) from the Megatron checkpoint at `load`;
    returns a summary of what was converted."""
    with tqdm(total=3, desc="convert: read checkpoint", unit="step", disable=not progress) as bar:
        checkpoint = read_megatron(load)
        bar.update()
        bar.set_description("convert: tokenizer")
        max_length = _arg(checkpoint.args, "max_position_embeddings") or _arg(checkpoint.args, "seq_length", 1024)
        tokenizer = gpt2_tokenizer(vocab_file, merge_file, max_length)
        config = star_config(checkpoint.args, len(tokenizer))
        eod = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
        config.bos_token_id = config.eos_token_id = eod
        bar.update()
        bar.set_description("convert: tensors")
        padded_rows = checkpoint.tensors.get("embedding.word_embeddings.weight", torch.empty(0)).shape[0]
        state = star_state_dict(checkpoint, config, progress)
        bar.update()
    dtypes = {tensor.dtype for tensor in state.values()}
    config.dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
    summary = {
        "source": str(checkpoint.directory),
        "format": checkpoint.format,
        "router_type": config.router_type,
        "layers": config.num_hidden_layers,
        "experts": config.num_local_experts,
        "vocabulary": {"tokens": config.vocab_size, "checkpoint_rows": padded_rows},
        "parameters": sum(t.numel() for t in state.values()),
        "dtype": str(config.dtype).removeprefix("torch."),
    }
    (out / "conversion.json").write_text(json.dumps(summary, indent=2) + "\n")
    share_checkpoint(out)
    return summary
