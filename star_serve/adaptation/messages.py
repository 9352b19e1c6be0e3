"""The typed messages between the serving process and a model's adaptation process (`process.py`).

    serving process ── Call(key, request) ─────────────► adaptation process
                    ── ReportRequest(key) ────────────►
                    ◄── Reply(key, value, error) ──────
                    ◄── Report(key, report, lags) ─────  (also unasked, every second)
                    ◄── Publish(tenant, bases, version)  (each committed version, for the bank)
                    ◄── Ready() ───────────────────────  (once, when it serves)

Forwards travel apart, through the shared ring (`ring.py`), each named by a `RingForward` on a pipe of its
own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .worker import AdaptationReport


@dataclass(frozen=True)
class EnsureLoaded:
    tenant: str


@dataclass(frozen=True)
class Describe:
    tenant: str


@dataclass(frozen=True)
class Configure:
    tenant: str
    frozen: bool | None
    learning_rate: float | None


@dataclass(frozen=True)
class Rollback:
    tenant: str
    version: int | None  # None: the previous version; 0: the trained bases


@dataclass(frozen=True)
class Stop:
    """Capture what was submitted, hand pending statistics over, exit."""


Request = EnsureLoaded | Describe | Configure | Rollback | Stop


@dataclass(frozen=True)
class Call:
    key: int
    request: Request


@dataclass(frozen=True)
class ReportRequest:
    key: int


@dataclass(frozen=True)
class Reply:
    key: int
    value: object
    error: BaseException | None


@dataclass(frozen=True)
class Report:
    key: int | None  # the request it answers; None: unasked
    report: AdaptationReport
    lags: list[float]  # token-to-commit lags of the commits since the last report


@dataclass(frozen=True)
class Publish:
    tenant: str
    bases: torch.Tensor | None  # (L, E, D) on the host; None: back to the trained bases
    version: int


@dataclass(frozen=True)
class Ready:
    pass


@dataclass(frozen=True)
class RingForward:
    """One forward's real tokens in the ring: `n` tokens from `start`, the ring's write position `end` once
    they are read, each sequence's tenant, real tokens and served version, and whether the ring holds the
    tokens' ids too."""

    start: int
    n: int
    end: int
    tenants: list[str]
    lengths: list[int]
    versions: list[int]
    ids: bool = False
