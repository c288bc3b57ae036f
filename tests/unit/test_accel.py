from pathlib import Path

import pytest

from cloudland.agent.drivers.compute.accel import accel_args, choose_accel, kvm_usable


def _host(tmp_path: Path, device: bool, pvm: bool) -> tuple[Path, Path]:
    dev = tmp_path / "kvm"
    if device:
        dev.write_bytes(b"")
    sys_module = tmp_path / "module"
    (sys_module / "kvm").mkdir(parents=True)
    if pvm:
        (sys_module / "kvm_pvm").mkdir()
    return dev, sys_module


def test_forced_setting_wins(tmp_path: Path) -> None:
    dev, mod = _host(tmp_path, device=False, pvm=True)
    assert choose_accel("kvm", dev, mod) == "kvm"
    assert choose_accel("tcg", dev, mod) == "tcg"


def test_auto_uses_kvm_when_usable(tmp_path: Path) -> None:
    dev, mod = _host(tmp_path, device=True, pvm=False)
    assert kvm_usable(dev, mod)
    assert choose_accel("auto", dev, mod) == "kvm"


def test_auto_falls_back_without_device(tmp_path: Path) -> None:
    dev, mod = _host(tmp_path, device=False, pvm=False)
    assert choose_accel("auto", dev, mod) == "tcg"


def test_auto_falls_back_on_kvm_pvm(tmp_path: Path) -> None:
    dev, mod = _host(tmp_path, device=True, pvm=True)
    assert choose_accel("auto", dev, mod) == "tcg"


def test_unknown_setting_rejected() -> None:
    with pytest.raises(ValueError):
        choose_accel("xen")


def test_accel_args() -> None:
    assert accel_args("tcg") == ["-accel", "tcg"]
    assert accel_args("kvm")[:2] == ["-accel", "kvm"]
