"""The config drive ISO, read back with pycdlib, and how QEMU gets it."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pycdlib

from cloudland.agent.drivers.compute import configdrive
from cloudland.agent.drivers.compute.qemu import QemuDriver
from cloudland.bus.messages import FixedIp, InstanceSpec, PortSpec

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBOGbOAb6jCFxh3gjpGnYNBbvUZW/1JZ7ky5bA3GPr8T k@x"


def spec(**extra) -> InstanceSpec:  # type: ignore[no-untyped-def]
    port = PortSpec(port_id="p1234567890123", network_id="n1", mac_address="fa:16:3e:00:00:01",
                    fixed_ips=[FixedIp(ip_address="10.0.0.5", subnet_id="s", cidr="10.0.0.0/24",
                                       gateway_ip="10.0.0.1")])
    return InstanceSpec(id="0b6f8c2e-4a57-4a3c-9d6e-1c1f5a3f7e01", name="vm 1", project_id="proj",
                        vcpus=1, memory_mb=128, disk_gb=1, image=None, ports=[port], key_name="k",
                        key_data=KEY, metadata={"a": "b"}, **extra)


def read(iso_bytes: bytes, path: str, joliet: bool = False) -> bytes:
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(iso_bytes))
    out = io.BytesIO()
    if joliet:
        iso.get_file_from_iso_fp(out, joliet_path=path)
    else:
        iso.get_file_from_iso_fp(out, rr_path=path)
    label = iso.pvd.volume_identifier.decode().strip()
    iso.close()
    assert label == "config-2"
    return out.getvalue()


def test_iso_layout_and_content() -> None:
    data = configdrive.build_iso(spec(user_data=base64.b64encode(b"#!/bin/sh\necho hi\n").decode()))
    md = json.loads(read(data, "/openstack/latest/meta_data.json"))
    assert md["uuid"] == "0b6f8c2e-4a57-4a3c-9d6e-1c1f5a3f7e01" and md["hostname"] == "vm-1"
    assert md["public_keys"] == {"k": KEY} and md["meta"] == {"a": "b"}
    assert read(data, "/openstack/latest/user_data") == b"#!/bin/sh\necho hi\n"
    assert read(data, "/openstack/latest/user_data", joliet=True) == b"#!/bin/sh\necho hi\n"
    nd = json.loads(read(data, "/openstack/latest/network_data.json"))
    assert nd["networks"][0]["ip_address"] == "10.0.0.5"
    assert json.loads(read(data, "/openstack/latest/vendor_data.json")) == {}


def test_no_user_data_no_file() -> None:
    assert "openstack/latest/user_data" not in configdrive.files(spec())


def test_qemu_attaches_it_read_only(tmp_path: Path) -> None:
    driver = QemuDriver(tmp_path, accel="tcg")
    args = driver.command(spec(config_drive=True))
    drive = next(a for a in args if "id=config2" in a)
    assert "readonly=on" in drive and "format=raw" in drive and "config-drive.iso" in drive
    assert "virtio-blk-pci,drive=config2" in args
    assert not any("config2" in a for a in driver.command(spec()))
