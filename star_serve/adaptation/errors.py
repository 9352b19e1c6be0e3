"""The adaptation layer's errors, one rooted hierarchy (as redis-py's `RedisError`): the API maps each to
an HTTP status in one place (`api/errors.py`), and nothing bare (`KeyError`, `ConnectionError`) crosses
the layer. Each pickles with its arguments, so that the adaptation process can raise it to the caller."""

from __future__ import annotations


class AdaptationError(Exception):
    """The root of the adaptation layer's errors."""


class VersionNotKept(AdaptationError):
    """A rollback to a version that the store does not keep (never committed, or beyond `snapshot_keep`)."""

    def __init__(self, tenant: str, version: int) -> None:
        super().__init__(tenant, version)
        self.tenant, self.version = tenant, version

    def __str__(self) -> str:
        return f"version {self.version} is not kept for tenant {self.tenant!r}"


class CommitConflict(AdaptationError):
    """A compare-and-set commit lost to another writer; the caller may retry."""

    def __str__(self) -> str:
        return f"{super().__str__()}; retry"


class AdaptationUnavailable(AdaptationError):
    """The adaptation of a model cannot answer now (its process is restarting, or does not answer in time);
    serving goes on with the bases committed so far, and the caller may retry after `retry_after` s."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message, retry_after)
        self.message, self.retry_after = message, retry_after

    def __str__(self) -> str:
        return self.message
