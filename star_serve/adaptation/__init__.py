"""Per-tenant routing state: the bank of GHA bases that the engine routes with, the capture of GHA
statistics from a tenant's tokens, the guardrails of a step, and the snapshot stores. Never imports the
engine or the API."""

from .bank import BankView, TenantBank
from .capture import CaptureConfig, CaptureCounts, LayerStatistics, capture
from .guardrails import Guardrails, StepReport, guarded_step, load_entropy
from .store import CorruptSnapshot, LocalDirStore, Snapshot, SnapshotStore
from .worker import AdaptationConfig, AdaptationStats, Adapter, TenantHealth

__all__ = [
    "AdaptationConfig",
    "AdaptationStats",
    "Adapter",
    "BankView",
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
