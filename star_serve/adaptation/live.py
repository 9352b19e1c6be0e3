"""The live quality of each tenant's served version, without labels: the engine measures the next-token loss
of a sampled share of prompts during prefill, from the forward that served them (the LM head on those
prompts' positions only), and routes a smaller share of those again with the trained bases (shadow), so
that each tenant has its served loss and, on the same tokens, what the trained bases would have scored.
A tenant served by the trained bases scores the same both ways and costs no second forward.

The records start again at each new version of a tenant. Once a version has been measured against the
trained bases on `window` tokens and scores worse than them by more than `margin` (nats/token), it is
handed to `on_degraded` once (the server rolls the tenant back to the trained bases). This is the check
on served traffic; the quality gate (quality.py) is the check before a version is committed.
"""

from __future__ import annotations

import random
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ..config import Settings


@dataclass(frozen=True)
class LiveConfig:
    sample_rate: float = Settings.default("adaptation_loss_sample_rate")  # share of prompts measured
    shadow_rate: float = Settings.default("adaptation_loss_shadow_rate")  # of those, the share also routed trained
    window: int = Settings.default("adaptation_loss_window")  # paired tokens before a version is judged
    margin: float = Settings.default("adaptation_rollback_loss_increase")  # nats/token
    tenants: int = 4096  # tenants with a record at once; the least recently measured go first
    seed: int = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> LiveConfig:
        return cls(
            sample_rate=settings.adaptation_loss_sample_rate,
            shadow_rate=settings.adaptation_loss_shadow_rate,
            window=settings.adaptation_loss_window,
            margin=settings.adaptation_rollback_loss_increase,
        )


@dataclass
class LiveLoss:
    """One tenant's measurements since `version` became the one that serves it (sums of nats)."""

    version: int
    served: float = 0.0  # every measured token, under the served version
    tokens: int = 0
    paired_served: float = 0.0  # the tokens also scored with the trained bases, under the served version
    paired_trained: float = 0.0  # the same tokens under the trained bases
    paired_tokens: int = 0
    degraded: bool = False  # handed to `on_degraded`

    @property
    def excess(self) -> float | None:
        """How much worse than the trained bases the served version scores on the paired tokens."""
        return (self.paired_served - self.paired_trained) / self.paired_tokens if self.paired_tokens else None

    def as_dict(self) -> dict[str, object]:
        return {
            "since_version": self.version,
            "tokens": self.tokens,
            "served": self.served / self.tokens if self.tokens else None,
            "paired_tokens": self.paired_tokens,
            "served_paired": self.paired_served / self.paired_tokens if self.paired_tokens else None,
            "trained_paired": self.paired_trained / self.paired_tokens if self.paired_tokens else None,
            "degraded": self.degraded,
        }


class LiveQuality:
    """Safe from any thread: the engine thread adds measurements, the API and the metrics read them."""

    def __init__(self, config: LiveConfig, on_degraded: Callable[[str, int], None] | None = None) -> None:
        self.config, self.on_degraded = config, on_degraded
        self._records: OrderedDict[str, LiveLoss] = OrderedDict()
        self._lock = threading.Lock()
        self._random = random.Random(config.seed)

    def measure(self) -> bool:
        """Whether the next prompt is measured (engine thread)."""
        return self._random.random() < self.config.sample_rate

    def shadow(self) -> bool:
        """Whether a measured prompt is also routed with the trained bases (engine thread)."""
        return self._random.random() < self.config.shadow_rate

    def add(self, tenant: str, version: int, served: float, tokens: int, trained: float | None) -> None:
        """One prompt's `tokens` next-token losses summed under the served `version` (`served`), and under
        the trained bases when it was scored with them too (`trained`)."""
        degraded = False
        with self._lock:
            record = self._records.get(tenant)
            if record is None or record.version != version:
                record = self._records[tenant] = LiveLoss(version)
            self._records.move_to_end(tenant)
            while len(self._records) > self.config.tenants:
                self._records.popitem(last=False)
            record.served += served
            record.tokens += tokens
            if trained is not None:
                record.paired_served += served
                record.paired_trained += trained
                record.paired_tokens += tokens
            excess = record.excess
            if (
                version > 0
                and not record.degraded
                and record.paired_tokens >= self.config.window
                and excess is not None
                and excess > self.config.margin
            ):
                record.degraded = degraded = True
        if degraded and self.on_degraded is not None:
            self.on_degraded(tenant, version)

    def describe(self, tenant: str) -> dict[str, object] | None:
        with self._lock:
            record = self._records.get(tenant)
            return None if record is None else record.as_dict()

    def top(self, n: int) -> list[tuple[str, LiveLoss]]:
        """The `n` tenants with the most measured tokens (copies of their records)."""
        with self._lock:
            ranked = sorted(self._records.items(), key=lambda item: -item[1].tokens)[:n]
            return [(tenant, LiveLoss(**vars(record))) for tenant, record in ranked]
