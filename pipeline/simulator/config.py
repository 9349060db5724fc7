"""What the simulator is told (`SimConfig`) and what it counts (`SimStats`).

config = SimConfig(rpm=600, tpm=100_000, fault_rate=0.05, faults=("500", "reset"))
sim = Simulator(config)
...
sim.stats.as_dict()   # {"requests": 10, "ok": 9, "faults": 1, ...}, as GET /_sim/stats
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from pipeline.simulator.fault_injection import KINDS


@dataclass(frozen=True)
class SimConfig:
    """How the simulator behaves; the defaults are an unlimited, faultless, instant API."""

    rpm: int | None = None
    tpm: int | None = None
    latency_ms: float = 0.0
    seed: int = 0
    fault_rate: float = 0.0
    faults: tuple[str, ...] = ("500", "503", "reset", "truncated", "malformed")
    api_key: str | None = None
    # Count every body in `SimStats.by_body`. Off, only bodies carrying a `<<sim:...>>`
    # directive are counted, which keeps a multi-million-row run's memory flat.
    track_bodies: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be between 0 and 1, got {self.fault_rate}")
        unknown = [kind for kind in self.faults if kind not in KINDS]
        if unknown:
            raise ValueError(f"unknown fault kinds {unknown}; valid: {sorted(KINDS)}")
        if self.fault_rate > 0 and not self.faults:
            raise ValueError("fault_rate > 0 needs at least one kind in faults")
        for name in ("rpm", "tpm"):
            limit = getattr(self, name)
            if limit is not None and limit < 1:
                raise ValueError(f"{name} must be a positive integer or None, got {limit}")


@dataclass
class SimStats:
    """Live counters; `requests == ok + rate_limited + faults + errors` once idle.

    `rate_limited` counts the 429s the RPM/TPM buckets sent; injected 429s (a fault or
    a directive) count in `faults`, with every other injected answer, "slow" included.
    `errors` counts the requests refused for what they were: bad JSON, missing fields,
    a wrong key, an unknown path.
    """

    requests: int = 0
    ok: int = 0
    rate_limited: int = 0
    faults: int = 0
    errors: int = 0
    #: Tokens the admitted requests were charged against TPM (prompt + max output).
    tokens: int = 0
    #: GET /models and /models/{id}: not API calls, and not in `requests`.
    listings: int = 0
    #: Wall clock (`time.time()`) of the first request counted in `requests`; listings
    #: do not set it. None until one comes: how a benchmark measures a client's start-up.
    first_request_at: float | None = None
    by_body: collections.Counter[str] = field(default_factory=collections.Counter)

    def as_dict(self) -> dict[str, Any]:
        """The counters as plain JSON-ready values, as `GET /_sim/stats` returns them."""
        # dict() of a Counter is one C call under the GIL: safe while the server counts.
        return {
            "requests": self.requests,
            "ok": self.ok,
            "rate_limited": self.rate_limited,
            "faults": self.faults,
            "errors": self.errors,
            "tokens": self.tokens,
            "listings": self.listings,
            "first_request_at": self.first_request_at,
            "by_body": dict(self.by_body),
        }
