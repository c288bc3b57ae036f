"""Raw QEMU boot time of the test guest: the floor for Cloudland's create→boot-marker time.

Boots the cached test guest with plain qemu-system-x86_64 (the driver's machine type,
accelerator, memory and virtio-blk qcow2 overlay disk; serial on stdio) N times and reports
seconds from process start to BOOT_MARKER on the serial console.

    .venv/bin/python bench/raw_qemu_boot.py [--runs 10] [--memory 256] [--vcpus 1] [--accel auto]
"""

from __future__ import annotations

import argparse
import os
import platform
import selectors
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cloudland.agent.drivers.compute.accel import choose_accel
from cloudland.agent.drivers.compute.qemu import disk_args, machine_args
from cloudland.guest import BOOT_MARKER
from cloudland.guest.build import build_test_guest


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def qemu_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    return out.splitlines()[0]


def boot_once(binary: str, base: Path, accel: str, memory_mb: int, vcpus: int, extra: list[str],
              timeout: float, verbose: bool) -> float:
    with tempfile.TemporaryDirectory(prefix="cloudland-bench-") as tmp:
        disk = Path(tmp) / "disk.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base),
                        str(disk)], check=True)
        args = [binary, *machine_args(accel, memory_mb, vcpus), "-display", "none",
                "-serial", "stdio", *disk_args(disk), *extra]
        start = time.perf_counter()
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        seen = b""
        try:
            while BOOT_MARKER.encode() not in seen:
                left = timeout - (time.perf_counter() - start)
                if left <= 0 or not sel.select(left):
                    raise TimeoutError(f"no boot marker after {timeout}s:\n{seen.decode(errors='replace')}")
                chunk = proc.stdout.read1(65536)  # type: ignore[attr-defined]
                if not chunk:
                    raise RuntimeError(f"QEMU exited: {seen.decode(errors='replace')}")
                seen += chunk
            elapsed = time.perf_counter() - start
        finally:
            proc.kill()
            proc.wait()
            sel.close()
        if verbose:
            print(seen.decode(errors="replace"), file=sys.stderr)
        return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--memory", type=int, default=256, help="MiB")
    parser.add_argument("--vcpus", type=int, default=1)
    parser.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"])
    parser.add_argument("--qemu", default="qemu-system-x86_64")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--vga", action="store_true", help="add -device VGA as the driver does")
    parser.add_argument("--verbose", action="store_true", help="print each boot's console")
    args = parser.parse_args(argv)

    base = build_test_guest()
    accel = choose_accel(args.accel)
    extra = ["-device", "VGA"] if args.vga else []
    print(f"machine: {cpu_model()}, {len(os.sched_getaffinity(0))} cores")
    print(f"qemu:    {qemu_version(args.qemu)}, accel {accel}, q35, {args.memory} MiB, "
          f"{args.vcpus} vCPU, virtio-blk qcow2 overlay{', VGA' if args.vga else ''}")
    print(f"image:   {base.name}")
    print(f"load:    {' '.join(f'{x:.2f}' for x in os.getloadavg())} (other load skews TCG timings)")
    times = []
    for i in range(args.runs):
        t = boot_once(args.qemu, base, accel, args.memory, args.vcpus, extra, args.timeout, args.verbose)
        times.append(t)
        print(f"run {i + 1:2d}: {t:.3f}s", flush=True)
    print(f"start→'{BOOT_MARKER}': median {statistics.median(times):.3f}s, "
          f"min {min(times):.3f}s, max {max(times):.3f}s over {len(times)} runs; "
          f"load after {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
