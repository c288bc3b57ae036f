"""``service_gc.tune_for_service``: run in a child process, since a freeze lasts as long as the
process does."""

import subprocess
import sys

PROBE = """
import gc
from cloudland.service_gc import SERVICE_THRESHOLDS, tune_for_service
kept = [[i] for i in range(1000)]
tune_for_service()
tune_for_service()
assert gc.get_threshold() == SERVICE_THRESHOLDS, gc.get_threshold()
assert gc.get_freeze_count() >= len(kept), gc.get_freeze_count()
a = []; a.append(a); del a  # a cycle made later is still collected
assert gc.collect() >= 1
print("ok")
"""


def test_service_processes_freeze_startup_objects_and_collect_less_often() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
