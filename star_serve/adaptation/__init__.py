"""Per-tenant routing state: the bank of GHA bases that the engine routes with, the capture of GHA
statistics from a tenant's tokens, the guardrails of a step, and the snapshot stores. Never imports the
engine or the API."""

from .bank import BankView, BasesSink, TenantBank
from .capture import CaptureConfig, CaptureCounts, LayerStatistics, capture
from .guardrails import Guardrails, StepReport, guarded_step, load_entropy
from .store import CorruptSnapshot, LocalDirStore, Snapshot, SnapshotStore
from .worker import AdaptationConfig, AdaptationReport, AdaptationStats, Adapter, TenantHealth

__all__ = [
    "AdaptationConfig",
    "AdaptationReport",
    "AdaptationStats",
    "Adapter",
    "BankView",
    "BasesSink",
    "CaptureConfig",
    "CaptureCounts",
    "CorruptSnapshot",
    "Guardrails",
    "LayerStatistics",
    "LocalDirStore",
    "Snapshot",
    "SnapshotStore",
    "StepReport",
    "TenantBank",
    "TenantHealth",
    "capture",
    "guarded_step",
    "load_entropy",
]
