"""Loading checkpoints onto a device: CUDA with bfloat16 when there is one, the CPU in float32 otherwise."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from .modeling import StarMoePreTrainedModel

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def load_model(
    path: str | Path, task: str, device: torch.device, dtype: torch.dtype
) -> tuple[StarMoePreTrainedModel, PreTrainedTokenizerBase]:
    """Loads a `star_moe` checkpoint directory for `task` ("generate" or "classify"), in eval mode."""
    auto = {"generate": AutoModelForCausalLM, "classify": AutoModelForSequenceClassification}[task]
    require_model_dir(path)
    model = auto.from_pretrained(str(path), dtype=dtype, local_files_only=True).to(device).eval()
    if not isinstance(model, StarMoePreTrainedModel):
        raise ValueError(f"{path} is a {type(model).__name__}, not a star_moe model")
    return model, AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def require_model_dir(path: str | Path) -> Path:
    """`path` as a checkpoint directory on this machine: a name that is not one is an error here, never a
    download from a hub."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json there)")
    return path


def share_checkpoint(directory: Path) -> None:
    """Gives the files of a written checkpoint the permissions a plain new file gets (0o666 less the umask).
    safetensors writes its file through a private temporary one (0o600), which a server running as another user,
    such as the container image's, could not read from a mounted folder."""
    umask = os.umask(0)
    os.umask(umask)
    mode = 0o666 & ~umask
    for path in directory.iterdir():
        if path.is_file() and path.stat().st_mode & 0o777 != mode:
            path.chmod(mode)
