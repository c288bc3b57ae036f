"""Garbage-collector settings for a long-running service process (API worker, controller,
relay, agent, simulated hypervisors).

CPython's defaults (a young collection every 700 net allocations, an older one every 10 of
those, a full one every 10 of those once the heap grew by a quarter) suit small scripts. A
service holds a large, slowly growing heap (the controller's indexes, an API worker's
SQLAlchemy and pydantic machinery, a simulated hypervisor process's 500 agents), and every
full collection walks all of it: at 2,000 simulated hypervisors a third of their CPU went to
collections, the controller's and API's about a tenth.

After startup: what is alive is frozen (never scanned again; it lives as long as the process),
and collections run less often. Reference counting frees almost everything at once anyway; the
collector only finds cycles. A young collection (up to 50,000 objects) then takes up to a few
tens of milliseconds (measured ~35 ms in a simulated-hypervisor process), a few times a minute.
"""

from __future__ import annotations

import gc

SERVICE_THRESHOLDS = (50_000, 20, 10)

_tuned = False


def tune_for_service() -> None:
    """Once per process, after startup: freeze the objects alive now, then collect less often.
    Not for tests (they build many services in one process: what a freeze holds stays)."""
    global _tuned
    if _tuned:
        return
    _tuned = True
    gc.collect()
    gc.freeze()
    gc.set_threshold(*SERVICE_THRESHOLDS)
