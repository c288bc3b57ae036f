"""Controller figures for operators and the scale benchmark, served on ``controller.stats``.

A request on that subject gets JSON: counters (heartbeats, status reports, passes), the
heartbeat lag (processing time minus the agent's ``sent_at``) over the last samples, pass
durations, and host counts.
"""

from __future__ import annotations

import json
import time
from collections import deque
from typing import Any


def percentiles(values: list[float], points: tuple[float, ...] = (0.5, 0.99)) -> dict[str, float]:
    if not values:
        return {f"p{int(p * 100)}": 0.0 for p in points} | {"max": 0.0}
    ordered = sorted(values)
    out = {f"p{int(p * 100)}": ordered[min(len(ordered) - 1, int(p * len(ordered)))] for p in points}
    return out | {"max": ordered[-1]}


class ControllerStats:
    def __init__(self, samples: int = 20000) -> None:
        self.heartbeats = 0
        self.statuses = 0
        self.host_states = 0
        self.passes = 0
        self.lag: deque[float] = deque(maxlen=samples)
        self.pass_seconds: deque[float] = deque(maxlen=2000)
        self.started = time.monotonic()

    def heartbeat(self, sent_at: float) -> None:
        self.heartbeats += 1
        if sent_at:
            self.lag.append(max(0.0, time.time() - sent_at))

    def reset(self) -> None:
        self.lag.clear()
        self.pass_seconds.clear()

    def snapshot(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"heartbeats": self.heartbeats, "statuses": self.statuses, "host_states": self.host_states,
                "passes": self.passes, "uptime": time.monotonic() - self.started,
                "heartbeat_lag": percentiles(list(self.lag)),
                "pass_seconds": percentiles(list(self.pass_seconds)), **(extra or {})}

    def encode(self, extra: dict[str, Any] | None = None) -> bytes:
        return json.dumps(self.snapshot(extra)).encode()
