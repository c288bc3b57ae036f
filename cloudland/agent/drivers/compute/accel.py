"""Choose QEMU's accelerator: KVM only where it can really boot guests, TCG otherwise."""

from __future__ import annotations

import os
from pathlib import Path

KVM_DEVICE = Path("/dev/kvm")
SYS_MODULE = Path("/sys/module")


def kvm_usable(device: Path = KVM_DEVICE, sys_module: Path = SYS_MODULE) -> bool:
    """/dev/kvm opens read-write and the host module is not kvm_pvm.

    kvm_pvm (paravirtualised nested KVM) accepts KVM_CREATE_VM but stock guest kernels hang
    early in boot, so it counts as unusable.
    """
    if (sys_module / "kvm_pvm").exists():
        return False
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def choose_accel(setting: str, device: Path = KVM_DEVICE, sys_module: Path = SYS_MODULE) -> str:
    """"kvm" or "tcg": a forced setting wins; "auto" uses KVM when usable."""
    if setting in ("kvm", "tcg"):
        return setting
    if setting != "auto":
        raise ValueError(f"unknown accelerator setting {setting!r} (auto, kvm, tcg)")
    return "kvm" if kvm_usable(device, sys_module) else "tcg"


def accel_args(accel: str) -> list[str]:
    """QEMU arguments for the accelerator (and the CPU model that goes with it)."""
    if accel == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg"]
