"""The scale benchmark at a small size, so it cannot rot: a NATS tree, simulated hypervisor
processes, API workers and the controller on PostgreSQL, servers launched through the API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cloudland.bench.scale import ScaleOptions, report, run_scale

FIGURES = ("vms_per_second", "create_to_active_p50_s", "create_to_active_p99_s", "success_rate",
           "list_page_median_s", "controller_cpu_percent", "controller_peak_rss_mb", "api_cpu_percent",
           "api_peak_rss_mb", "heartbeat_lag_p99_s", "down_detection_s", "control_plane_cpu_ms_per_create")


@pytest.mark.e2e  # ~15 s of processes; keeps the fast set under 2 minutes
async def test_small_scale_run(tmp_path: Path, postgres: Any) -> None:
    url = postgres.create_database("scale_bench").replace("postgresql+asyncpg://", "postgresql://")
    out = tmp_path / "figures.json"
    figures = await run_scale(ScaleOptions(
        hypervisors=50, vms=500, db=url, json_path=out, work_dir=tmp_path / "work", clients=16,
        kill_group=10, heartbeat_seconds=1.0, host_down_seconds=4.0, timeout=120, log=lambda m: None))
    print(report(figures))
    assert json.loads(out.read_text()) == figures
    assert figures["database"] == "postgresql"
    assert figures["success_rate"] == 1.0 and figures["succeeded"] == 500
    assert all(figures[name] is not None for name in FIGURES)
    assert figures["list_servers_seen"] == 500 and figures["list_pages"] >= 2
    assert figures["down_group"] == 10 and figures["down_detection_s"] > 3.0
    assert figures["vms_per_second"] > 0 and figures["controller_peak_rss_mb"] > 0
    assert figures["control_plane_cpu_ms_per_create"] > 0
