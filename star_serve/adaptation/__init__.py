"""Per-tenant routing state: the bank of GHA bases that the engine routes with, the capture of GHA
statistics from a tenant's tokens, the guardrails of a step, the snapshot stores, and the one interface
(`AdaptationHandle`) through which the rest of the server sees a model's adaptation, in this process or
in one of its own. Never imports the engine or the API."""

from .bank import BasesSink, BatchRouter, RoutingPlan, TenantBank
from .capture import CaptureConfig, CaptureCounts, LayerStatistics, capture
from .errors import AdaptationError, AdaptationUnavailable, CommitConflict, VersionNotKept
from .guardrails import Guardrails, StepReport, guarded_step, load_entropy
from .handle import AdaptationHandle, adapts, open_adaptation
from .local import LocalAdaptation
from .observer import ForwardSink, Observer
from .process import AdaptationProcess
from .store import CorruptSnapshot, LocalDirStore, Snapshot, SnapshotStore
from .worker import AdaptationConfig, AdaptationReport, AdaptationStats, Adapter, TenantHealth

__all__ = [
    "AdaptationConfig",
    "AdaptationError",
    "AdaptationHandle",
    "AdaptationProcess",
    "AdaptationReport",
    "AdaptationStats",
    "AdaptationUnavailable",
    "Adapter",
    "BasesSink",
    "BatchRouter",
    "CaptureConfig",
    "CaptureCounts",
    "CommitConflict",
    "CorruptSnapshot",
    "ForwardSink",
    "Guardrails",
    "LayerStatistics",
    "LocalAdaptation",
    "LocalDirStore",
    "Observer",
    "RoutingPlan",
    "Snapshot",
    "SnapshotStore",
    "StepReport",
    "TenantBank",
    "TenantHealth",
    "VersionNotKept",
    "adapts",
    "capture",
    "guarded_step",
    "load_entropy",
    "open_adaptation",
]
