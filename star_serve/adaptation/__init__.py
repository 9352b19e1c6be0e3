"""Per-tenant routing state: the bank of GHA bases that the engine routes with, and (later) the capture of
statistics, the worker that folds them in, and the snapshot stores. Never imports the engine or the API."""

from .bank import BankView, TenantBank

__all__ = ["BankView", "TenantBank"]
