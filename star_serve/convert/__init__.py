"""Checkpoints of other frameworks turned into star-serve model directories."""

from .megatron import UnmappableCheckpoint, convert_megatron

__all__ = ["UnmappableCheckpoint", "convert_megatron"]
