"""The serving engine: continuous batching for generation, dynamic batching for classification, the slot
KV cache and sampling. It knows no HTTP; it asks the adaptation layer for each tenant's bases."""

from .classification import BatcherConfig, ClassificationEngine
from .generation import EngineConfig, GenerationEngine
from .types import (
    ClassificationResult,
    EngineDraining,
    EngineError,
    EngineOverloaded,
    GenerationOutput,
    RequestTooLong,
    SamplingParams,
)

__all__ = [
    "BatcherConfig",
    "ClassificationEngine",
    "ClassificationResult",
    "EngineConfig",
    "EngineDraining",
    "EngineError",
    "EngineOverloaded",
    "GenerationEngine",
    "GenerationOutput",
    "RequestTooLong",
    "SamplingParams",
]
