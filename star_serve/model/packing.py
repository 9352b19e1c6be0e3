"""Weights kept a second time in oneDNN's blocked layout, for inference on a CPU.

A decode step multiplies each weight by a few to a few dozen rows. MKL's sgemm reads a row-major weight
at a fraction of the memory bandwidth there; through oneDNN's blocked layout the same product runs about
twice as fast (2-core AMD EPYC with AVX-512, 2 threads: an expert's gate and up projections at 4 rows
18.9 -> 7.5 ms for 8 experts; a 51200 x 768 LM head at 32 rows 38 -> 14 ms; a 768 x 768 projection at 32
rows 1.5x; in bfloat16 on a CPU with AVX-512 BF16, 8 experts' gate and up projections at 4 rows
6.5 -> 2.4 ms). Below PACKED_MIN_ELEMENTS oneDNN's cost per call outweighs it.

One row in float32 (a decode step of one sequence, or an expert that one token routes to) is multiplied by
the weight itself: MKL's matrix-vector product reads it faster than oneDNN's blocked one (8 experts' gate and
up projections of the star-182m shape at one row: 4.5 against 5.4 ms). In bfloat16 the packed copy is much
the faster at one row too (4.2 against 18 ms).

Inference only: a packed copy does not follow later changes of its weight, and a forward that records
gradients multiplies by the weight itself. It costs the packed weights' memory again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The rows that packed weights are blocked for: decode steps give a weight a few to a few dozen.
PACKED_ROWS_HINT = 16
# Packing pays from weights of 1 MiB in float32 (an expert of hidden 256 and FFN 512: 1.5-1.8x at 4 to 32
# rows, 0.9x at one); below, oneDNN's cost per call outweighs it (the demo LM's experts: 0.6-0.9x).
PACKED_MIN_ELEMENTS = 1 << 18


def packable(weight: torch.Tensor) -> bool:
    """Whether packing `weight` (out, in) pays: on a CPU with oneDNN, PACKED_MIN_ELEMENTS or more, in float32,
    or in bfloat16 where the CPU multiplies it natively (AVX-512 BF16 or AMX)."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available() or weight.numel() < PACKED_MIN_ELEMENTS:
        return False
    if weight.dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return weight.dtype == torch.float32


def pack(weight: torch.Tensor) -> torch.Tensor:
    """`weight` (out, in) reordered for `packed_linear`."""
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACKED_ROWS_HINT)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T (+ bias), W given packed by `pack`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def uses_packed(x: torch.Tensor) -> bool:
    """Whether to multiply `x` (..., in) by the packed copy: with no gradient recorded, and more than one row
    unless in bfloat16."""
    return not torch.is_grad_enabled() and (x.numel() > x.shape[-1] or x.dtype != torch.float32)


class PackedLinear(nn.Module):
    """An `nn.Linear` that also keeps its weight packed, and multiplies through it where `uses_packed`. Its
    parameters are the linear's own, under the same names."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        self.packed = pack(linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if uses_packed(x):
            return packed_linear(x, self.packed, self.bias)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed for the CPU"


def pack_linears(module: nn.Module, names: tuple[str, ...]) -> bool:
    """Replaces each `nn.Linear` child of `module` named in `names` whose weight is `packable` by a
    `PackedLinear`; True if any was."""
    replaced = False
    for name in names:
        child = getattr(module, name)
        if isinstance(child, nn.Linear) and packable(child.weight):
            setattr(module, name, PackedLinear(child))
            replaced = True
    return replaced
